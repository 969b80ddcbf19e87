"""Logit parity (fp32): the candidate, loaded with the converted on-disk checkpoint, must give
the reference's next-token distributions on every input case (plain, right/left padded, offset
positions, packed documents), all passed by keyword.

On failure the message names the first diverging submodule pair with its figures, and says
whether forcing the reference's routing into the candidate closes the gap.
"""

import pytest
import torch

from moe_conformance import tolerances
from moe_conformance.checks import ANY_DTYPE, conformance
from moe_conformance.compare import compare_logits, diagnose, routing_flip_rate, run_candidate, run_reference
from moe_conformance.tiny import INPUT_CASES


@pytest.mark.parametrize("inputs", INPUT_CASES)
@conformance(dtypes=ANY_DTYPE)
def test_logit_parity(arch, inputs, record):
    """fp32 semantic parity, or with --dtype bf16 the production profile: both models in bf16
    (what the reference keeps in fp32 kept there), gates from the bf16 noise floor."""
    batch = arch.batches[inputs]
    ref, cand = arch.reference(dtype=arch.dtype), arch.candidate(dtype=arch.dtype)
    profile = tolerances.profile("logit_parity", str(arch.dtype).removeprefix("torch."), arch.spec.tolerances)
    record(thresholds=profile.thresholds())
    with torch.no_grad():
        ref_logits = run_reference(ref, batch)
        cand_logits = run_candidate(cand, batch)
    result = compare_logits(ref_logits, cand_logits, batch.valid)
    figures = dict(result.figures)
    if "routing_flip_rate" in profile.gates:  # the bf16 profile: routing decisions are gated too
        flips = routing_flip_rate(arch, ref, cand, batch)
        if flips is not None:
            figures["routing_flip_rate"] = flips
    record(figures=figures)
    problems = [result.nan_message] if result.nan_message else profile.violations(figures)
    if problems:
        delta = result.figures.get("max_abs_logit_delta")
        pytest.fail(
            f"{arch.id} on '{inputs}' inputs: " + "; ".join(problems) + "\n"
            + diagnose(arch, ref, cand, batch, delta, cand_logits, profile.thresholds()["max_abs_logit_delta"]),
            pytrace=False,
        )
