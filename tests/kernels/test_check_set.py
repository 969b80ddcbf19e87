"""The per-architecture kernel check set (what a conformance suite runs for one arch)."""

import time

import torch

from moe_conformance.kernel_checks import checks
from moe_conformance.kernel_checks.strategies import RoutingConfig


def test_kernel_check_set_for_one_arch_passes_and_reports_figures(device):
    routing = RoutingConfig("sigmoid", n_group=4, topk_group=2, norm_topk_prob=True,
                            routed_scaling_factor=2.5, has_correction_bias=True)
    t0 = time.perf_counter()
    results = checks.run_kernel_checks(routing, device=device)
    elapsed = time.perf_counter() - t0
    figures = [r for r in results if "max_error" in r]
    ops = {(r["op"], r["backend"], r["dtype"]) for r in figures}
    backends = {b for _, b, _ in ops}
    assert "torch" in backends
    if not any("skipped" in r and r["backend"] == "triton" for r in results):
        assert "triton" in backends
    for backend in backends:
        for dtype in ("float32", "float16"):
            assert ("experts", backend, dtype) in ops and ("combine", backend, dtype) in ops
        assert ("route", backend, "float32") in ops and ("permute", backend, "int64") in ops
    for r in figures:
        assert r["gate"] is None or r["max_error"] <= r["gate"]
        assert r["case"] and r["device"] == device
    print(f"kernel check set: {len(figures)} cases in {elapsed:.1f}s")


def test_gates_are_ordered_by_precision():
    g = checks.gate_for
    for op in ("combine", "experts"):
        assert g(op, torch.float32) < g(op, torch.float16) < g(op, torch.bfloat16)


def test_a_gpu_run_under_the_interpreter_says_so():
    """TRITON_INTERPRET=1 (this process: the CPU run's setting) on a GPU device is a named reason,
    not an interpreter crash on GPU tensors."""
    from moe_conformance.native.kernels import _triton_unavailable

    why = _triton_unavailable("cuda", torch.float32)
    assert why is not None and "TRITON_INTERPRET=1" in why and "GPU" in why
    assert _triton_unavailable("cpu", torch.float32) is None
