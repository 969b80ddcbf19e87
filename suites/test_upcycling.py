"""Dense-to-MoE upcycling (family ``upcycling``, F19).

The arch's dense parent (``ArchSpec(upcycling=Upcycling(dense=...))``) gets the adversarial
init and is saved; the team's ``upcycle`` (the project's own otherwise,
moe_conformance.upcycling.upcycle) turns that dense checkpoint into an MoE checkpoint and
config. Checks:

- ``test_upcycled_moe_equals_dense``: at init the upcycled MoE (the candidate loaded through its
  converter, and the reference loaded with from_pretrained) computes the dense parent's logits
  on every input case: the experts are the dense MLP and the chosen experts' weights sum to one
  (a scaling left on shows as the weight sum the router probe reads);
- ``test_upcycled_experts_copy_the_dense_mlp``: every routed expert of every MoE layer holds its
  layer's dense MLP bit for bit (a copy transposed into place is named), the router is fresh
  (finite, not constant), the key set is the MoE checkpoint's.
Runs on the faithful variant.
"""

from __future__ import annotations

import copy
import tempfile
import weakref
from pathlib import Path

import pytest
import torch

from moe_conformance import tolerances, upcycling
from moe_conformance.case import eager, read_checkpoint
from moe_conformance.checkpoint import load_reference, write_checkpoint
from moe_conformance.checks import conformance
from moe_conformance.compare import run_candidate, run_reference
from moe_conformance.contract import convert
from moe_conformance.probing import RoutingTap
from moe_conformance.tiny import adversarial_init_

pytestmark = pytest.mark.arch_variants("faithful")
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def declares_upcycling(case) -> str | None:
    if case.spec.upcycling is not None:
        return None
    return ("ArchSpec.upcycling is not set: declare Upcycling(dense=...) (the arch's dense parent, "
            "moe_conformance.upcycling) to check dense-to-MoE upcycling")


def _saved(model) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return read_checkpoint(Path(tmp))


def _prepared(arch) -> dict:
    if arch not in _CACHE:
        decl = arch.spec.upcycling
        moe_config = eager(decl.moe(copy.deepcopy(arch.config)))
        torch.manual_seed(arch.case_seed)
        dense_model = decl.dense(copy.deepcopy(moe_config))
        eager(dense_model.config)
        adversarial_init_(dense_model, arch.case_seed + 11, arch.init_gains)
        dense_model = dense_model.to(arch.device).eval()
        dense = _saved(dense_model)
        template = _saved(arch.spec.reference(copy.deepcopy(moe_config)))
        moe, config = decl.upcycle(dense, copy.deepcopy(moe_config), template)
        config = eager(config)
        cand = arch.spec.candidate(copy.deepcopy(config))
        cand.load_state_dict(convert(arch.spec.converter.to_candidate, dict(moe), config), strict=True)
        _CACHE[arch] = {"dense_model": dense_model, "dense": dense, "template": template, "moe": moe,
                        "config": config, "candidate": cand.to(arch.device).eval()}
    return _CACHE[arch]


def _weight_sums(arch, model) -> list[float]:
    tap = RoutingTap(model, arch, "cand")
    with torch.no_grad(), tap():
        run_candidate(model, arch.batches["plain"])
    return [float(w.double().sum(-1).mean()) for w in tap.weights]


@conformance(applies=declares_upcycling)
def test_upcycled_moe_equals_dense(arch, record, tmp_path):
    prep = _prepared(arch)
    source = tmp_path / "dense"
    prep["dense_model"].save_pretrained(source)
    folder = write_checkpoint(tmp_path / "upcycled", prep["moe"], source)
    (folder / "config.json").unlink()
    prep["config"].save_pretrained(folder)
    prefix = getattr(arch.spec.converter, "disk_prefix", "")
    reference = load_reference(type(arch.reference()), folder, prefix).to(arch.device)
    gate = tolerances.profile("logit_parity", "float32", arch.spec.tolerances).thresholds()["max_abs_logit_delta"]
    worst = {"candidate": 0.0, "reference": 0.0}
    with torch.no_grad():
        for name, batch in arch.batches.items():
            want = run_reference(prep["dense_model"], batch)
            for side, got in (("candidate", run_candidate(prep["candidate"], batch)), ("reference", run_reference(reference, batch))):
                worst[side] = max(worst[side], float((got - want).abs()[batch.valid].max()))
    sums = _weight_sums(arch, prep["candidate"])
    record(figures={f"{side}_max_abs_logit_delta": v for side, v in worst.items()} | {"routing_weight_sums": sums},
           thresholds={f"{side}_max_abs_logit_delta": gate for side in worst})
    problems = [f"the upcycled {side} differs from the dense parent by up to {v:.3g} (gate: <= {gate:.3g})"
                for side, v in worst.items() if not v <= gate]
    if problems:
        off = [s for s in sums if abs(s - 1.0) > 1e-4]
        if off:
            problems.append(f"the chosen experts' routing weights sum to {off[0]:.4g} per token, not 1: every expert is the "
                            f"dense MLP, so the MoE output is that sum times the dense output (routed_scaling_factor "
                            f"{getattr(prep['config'], 'routed_scaling_factor', 1.0):g} left on, or top-k not renormalized)")
        arch.fail("at init the upcycled MoE does not compute the dense model", problems)


@conformance(applies=declares_upcycling)
def test_upcycled_experts_copy_the_dense_mlp(arch, record):
    prep = _prepared(arch)
    moe, dense, template = prep["moe"], prep["dense"], prep["template"]
    problems = []
    missing, unexpected = sorted(set(template) - set(moe)), sorted(set(moe) - set(template))
    if missing or unexpected:
        problems.append(f"the upcycled checkpoint's key set is not the MoE checkpoint's: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    experts = routers = 0
    for key in sorted(set(moe) & set(template)):
        got, source = moe[key], upcycling.dense_source(key)
        if source is not None:
            experts += 1
            want = dense.get(source)
            if want is None:
                problems.append(f"{key}: the dense checkpoint has no {source} to copy")
            elif got.shape == want.shape and torch.equal(got, want):
                continue
            elif got.shape == want.t().shape and torch.equal(got, want.t()):
                problems.append(f"{key} holds {source} transposed")
            elif got.numel() == want.numel() and torch.equal(got, want.t().reshape(got.shape)):
                problems.append(f"{key} holds {source} transposed and reshaped into place (same shape, values moved)")
            else:
                problems.append(f"{key} is not a copy of {source}")
        elif key.endswith((".gate.weight", ".router.weight")) and got.dim() == 2:
            routers += 1
            if not torch.isfinite(got).all() or float(got.double().std()) == 0.0:
                problems.append(f"{key}: the fresh router is not finite and varied (std {float(got.double().std()):.3g})")
    record(figures={"experts_checked": experts, "routers_checked": routers})
    if not experts:
        problems.append("no routed-expert key of the upcycled checkpoint maps to a dense MLP key "
                        "(moe_conformance.upcycling.dense_source)")
    if problems:
        arch.fail("the upcycled experts are not copies of the dense MLP", problems)
