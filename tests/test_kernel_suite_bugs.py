"""The `kernels` suite fails, by the right checks and naming the case, when the Triton experts
kernel is broken: here it drops one token's output row (what an unwritten grouped-GEMM row
does). Runs in a subprocess: the plugin patches the kernel module for the whole process."""

from __future__ import annotations

import textwrap

from helpers import checks_by_name, run_suites

BROKEN_KERNEL = textwrap.dedent("""
    import dataclasses
    from moe_conformance.native.kernels import triton_moe
    from moe_conformance.registry import discover

    _real = triton_moe.moe_experts_triton

    def _drops_row_3(x, indices, weights, w_gate, w_up, w_down):
        out = _real(x, indices, weights, w_gate, w_up, w_down)
        keep = (torch.arange(out.shape[0], device=out.device) != 3).to(out.dtype)[:, None]
        return out * keep

    import torch
    triton_moe.moe_experts_triton = _drops_row_3
    known, _ = discover()
    ARCH = dataclasses.replace(known["qwen3_moe"].load(), name="qwen3_moe_broken_kernel", kernels=("triton",))
""")


def test_broken_triton_experts_kernel_fails_every_kernel_check(pytester):
    result, reports = run_suites(pytester, "-k", "faithful", suite="test_kernels.py", plugin_source=BROKEN_KERNEL,
                                 plugin_name="broken_kernel", subprocess=True)
    checks = checks_by_name(reports["qwen3_moe_broken_kernel"])
    status = {name.split("[")[0]: c for name, c in checks.items()}
    for name in ("test_kernel_check_set", "test_candidate_on_kernels_matches_reference", "test_reference_with_kernel_experts"):
        assert status[name]["status"] == "failed", (name, status[name])
    check_set = status["test_kernel_check_set"]["message"]
    assert "experts" in check_set and "backend=triton" in check_set and "T=" in check_set, check_set
    assert "max_abs_logit_delta" in status["test_candidate_on_kernels_matches_reference"]["message"]
    assert "max_abs_logit_delta" in status["test_reference_with_kernel_experts"]["message"]
