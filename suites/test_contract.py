"""The candidate contract, checked first (moe_conformance.contract_checks): one check per
convention. A broken convention fails here with its name and what to declare or change; every
other check that depends on it is then reported "blocked by contract" with the same message
instead of failing with misleading numbers."""

import pytest

from moe_conformance.checks import ANY_DTYPE, conformance
from moe_conformance.contract_checks import DEPENDS


def _check(arch, record, item: str) -> None:
    problem = arch.contract.problem(item)
    record(figures={"convention": item, "holds": problem is None})
    if problem:
        pytest.fail(f"{arch.id}: contract ({item}): {problem}", pytrace=False)


@conformance(requires=DEPENDS["forward"], dtypes=ANY_DTYPE)
def test_contract_forward(arch, record):
    """forward(input_ids=, attention_mask=, position_ids=) by keyword returns [B, S, vocab] logits."""
    _check(arch, record, "forward")


@conformance(requires=DEPENDS["converter"], dtypes=ANY_DTYPE)
def test_contract_converter(arch, record):
    """The converter claims every key both ways, loads strictly, and does not mutate its input."""
    _check(arch, record, "converter")


@conformance(requires=DEPENDS["state"], dtypes=ANY_DTYPE)
def test_contract_state(arch, record):
    """deepcopy and a state_dict round-trip keep the candidate's logits."""
    _check(arch, record, "state")


@conformance(requires=DEPENDS["deterministic"], dtypes=ANY_DTYPE)
def test_contract_deterministic(arch, record):
    """Eval mode is deterministic: two forwards on one input are identical."""
    _check(arch, record, "deterministic")


@conformance(requires=DEPENDS["pairs"], dtypes=ANY_DTYPE)
def test_contract_module_pairs(arch, record):
    """Every declared (reference, candidate) module pair exists on both sides."""
    _check(arch, record, "pairs")


@conformance(requires=DEPENDS["routing"], dtypes=ANY_DTYPE)
def test_contract_routing_probe(arch, record):
    """The routing probes give well-formed decisions on every MoE layer."""
    _check(arch, record, "routing")


@conformance(requires=DEPENDS["experts"], dtypes=ANY_DTYPE)
def test_contract_experts_probe(arch, record):
    """The experts probe computes [T, H] for given choices."""
    _check(arch, record, "experts")


@conformance(requires=DEPENDS["capabilities"], dtypes=ANY_DTYPE)
def test_contract_capabilities(arch, record):
    """Declared capabilities agree with the reference config and checkpoint; the routing
    topology is valid."""
    _check(arch, record, "capabilities")
