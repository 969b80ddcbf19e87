"""Correctness of every kernel op on every backend against the slow references, plus the
API's robustness (edge shapes, validation, lazy triton import) and parity with transformers'
routers."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings

from moe_conformance.native import kernels
from moe_conformance.kernel_checks import checks
from moe_conformance.kernel_checks.reference import experts_reference, route_reference
from moe_conformance.kernel_checks.strategies import (
    CI_SETTINGS, ExpertsCase, RouteCase, RoutingConfig, edge_cases, experts_cases, route_cases,
)

BACKENDS = kernels.BACKENDS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

ROUTINGS = {
    "mixtral": RoutingConfig("softmax", norm_topk_prob=True),
    "olmoe": RoutingConfig("softmax", norm_topk_prob=False),
    "deepseek_v3": RoutingConfig("sigmoid", 4, 2, True, 2.5, True),
    "kimi_k25": RoutingConfig("sigmoid", 1, 1, True, 2.827, True),
    "sigmoid_no_norm": RoutingConfig("sigmoid", 3, 1, False, 1.0, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(ROUTINGS))
def test_route_matches_reference(arch, backend, device, require):
    require(backend)
    routing = ROUTINGS[arch]
    E = 12 if routing.n_group in (1, 3, 4) else 8
    for seed, K in ((0, 1), (1, 4)):
        result = checks.check_route(RouteCase(9, E, K, routing, seed), backend=backend, device=device)
        assert result["max_error"] <= result["gate"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_with_bf16_logits_uses_fp32_math(backend, device, require):
    require(backend)
    case = RouteCase(10, 16, 4, ROUTINGS["deepseek_v3"], seed=5)
    result = checks.check_route(case, backend=backend, device=device, logits_dtype=torch.bfloat16)
    assert result["max_error"] <= checks.gate_for("route", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_permutation_is_an_exact_stable_counting_sort(backend, device, require):
    require(backend)
    for case in edge_cases():
        checks.check_permutation(case, backend=backend, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_combine(backend, dtype, device, require):
    require(backend, dtype)
    for case in edge_cases()[1:3]:
        result = checks.check_combine(case, backend=backend, dtype=dtype, device=device)
        assert result["max_error"] <= result["gate"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_forward_backward_edge_cases(backend, dtype, device, require):
    require(backend, dtype)
    for case in edge_cases():
        result = checks.check_experts(case, backend=backend, dtype=dtype, device=device)
        assert set(result["tensors"]) == {"out", "grad_x", "grad_weights", "grad_w_gate",
                                          "grad_w_up", "grad_w_down"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_hypothesis_shapes(backend, device, require):
    require(backend)

    @settings(CI_SETTINGS, max_examples=3)
    @given(experts_cases())
    def run(case):
        checks.check_experts(case, backend=backend, dtype=torch.float32, device=device)

    run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_hypothesis_any_config(backend, device, require):
    require(backend)

    @settings(CI_SETTINGS, max_examples=6)
    @given(route_cases())
    def run(case):
        checks.check_route(case, backend=backend, device=device)

    run()


def test_strategies_reach_the_edge_shapes():
    """The drawn cases really include the shapes the brief asks for (over a bounded sample)."""
    seen = []

    @settings(CI_SETTINGS, max_examples=150)
    @given(experts_cases(), route_cases(ROUTINGS["deepseek_v3"]))
    def collect(ec, rc):
        seen.append((ec, rc))

    collect()
    ecs = [e for e, _ in seen]
    assert any(e.tokens == 1 for e in ecs)
    assert {"some_empty", "all_on_one", "one_token"} <= {e.distribution for e in ecs}
    assert any(e.hidden % 2 for e in ecs)
    assert any(e.num_experts & (e.num_experts - 1) for e in ecs)  # not a power of two
    assert {e.top_k for e in ecs} >= {1, 2, 8} or max(e.top_k for e in ecs) == 8
    rcs = [r for _, r in seen]
    assert all(r.num_experts % 4 == 0 and r.routing == ROUTINGS["deepseek_v3"] for r in rcs)
    assert all(r.top_k <= 2 * (r.num_experts // 4) for r in rcs)


def test_some_empty_distribution_leaves_experts_empty():
    case = ExpertsCase(8, 16, 8, 7, 2, "some_empty", seed=3)
    counts = torch.bincount(checks.make_experts_indices(case).reshape(-1), minlength=7)
    assert (counts == 0).any() and (counts > 0).any()
    hot = checks.make_experts_indices(ExpertsCase(8, 16, 8, 7, 3, "all_on_one", seed=3))
    assert bool((hot == 3 % 7).any(dim=1).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend, device, require):
    require(backend)
    E, I, H = 4, 8, 16
    x = torch.randn(0, H, device=device, requires_grad=True)
    w_gate = torch.randn(E, I, H, device=device, requires_grad=True)
    w_up = torch.randn(E, I, H, device=device, requires_grad=True)
    w_down = torch.randn(E, H, I, device=device, requires_grad=True)
    weights, indices = kernels.route(torch.randn(0, E, device=device), scoring="softmax", top_k=2,
                                     backend=backend)
    assert weights.shape == (0, 2) and indices.shape == (0, 2)
    out = kernels.moe_experts(x, indices, weights.requires_grad_(), w_gate, w_up, w_down, backend=backend)
    assert out.shape == (0, H)
    out.sum().backward()
    assert bool((w_gate.grad == 0).all()) and bool((w_down.grad == 0).all())


def test_all_tokens_on_one_expert_top1(device, require):
    """Every token on expert 2 of 5 with K=1: one full tile run, four empty experts."""
    require("triton")
    x = torch.randn(20, 12, device=device, dtype=torch.float64)
    idx = torch.full((20, 1), 2, dtype=torch.int64, device=device)
    w = torch.rand(20, 1, device=device, dtype=torch.float64)
    ws = [torch.randn(5, 6, 12, dtype=torch.float64) * 0.3, torch.randn(5, 6, 12, dtype=torch.float64) * 0.3,
          torch.randn(5, 12, 6, dtype=torch.float64) * 0.3]
    expected = experts_reference(x, idx, w, *ws)
    got = kernels.moe_experts(x.float(), idx, w.float(), *(t.float().to(device) for t in ws), backend="triton")
    assert torch.allclose(got.double().cpu(), expected.cpu(), atol=1e-5, rtol=0)


def test_validation_errors():
    logits = torch.randn(3, 6)
    with pytest.raises(ValueError, match="divisible by n_group"):
        kernels.route(logits, scoring="sigmoid", top_k=2, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="top_k=5"):
        kernels.route(logits, scoring="sigmoid", top_k=5, n_group=3, topk_group=2)
    with pytest.raises(ValueError, match="scoring"):
        kernels.route(logits, scoring="relu", top_k=2)
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.route(logits, scoring="softmax", top_k=2, backend="cuda")
    with pytest.raises(ValueError, match=r"w_gate/w_up \[E, I, H\]"):
        kernels.moe_experts(torch.randn(3, 8), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1),
                            torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8))


def test_import_is_cheap_and_triton_is_lazy():
    code = ("import sys, moe_conformance.native.kernels as k, moe_conformance.kernel_checks.checks, "
            "moe_conformance.kernel_checks.strategies; print('triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_triton_gives_a_clear_error():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, moe_conformance.native.kernels as k\n"
            "try:\n    k.route(torch.randn(2, 4), scoring='softmax', top_k=1, backend='triton')\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "backend='triton'" in out.stdout and "triton" in out.stdout and "backend='torch'" in out.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_gradient_reaches_logits(backend, device, require):
    require(backend)
    logits = (torch.randn(6, 8) * 2).to(device).requires_grad_()
    w, idx = kernels.route(logits, scoring="sigmoid", top_k=3, n_group=2, topk_group=1,
                           correction_bias=torch.randn(8).to(device), routed_scaling_factor=2.0,
                           backend=backend)
    (w * torch.arange(3.0, device=device)).sum().backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    assert float(logits.grad.abs().sum()) > 0


# --------------------------------------------------------------------- transformers parity


def _hf_router(kind):
    if kind == "deepseek_v3":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

        cfg = DeepseekV3Config(hidden_size=24, n_routed_experts=12, num_experts_per_tok=3, n_group=4,
                               topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
        router = DeepseekV3TopkRouter(cfg)
        with torch.no_grad():
            router.e_score_correction_bias.copy_(torch.randn(12) * 0.3 + 1.0)
        kw = dict(scoring="sigmoid", top_k=3, correction_bias=router.e_score_correction_bias,
                  n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

        cfg = Qwen3MoeConfig(hidden_size=24, num_experts=10, num_experts_per_tok=4, norm_topk_prob=kind == "qwen3_moe")
        router = Qwen3MoeTopKRouter(cfg)
        kw = dict(scoring="softmax", top_k=4, norm_topk_prob=kind == "qwen3_moe")
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
    return router, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["deepseek_v3", "qwen3_moe", "qwen3_moe_unnormalized"])
def test_route_equals_transformers_router(kind, backend, device, require):
    require(backend)
    torch.manual_seed(1)
    router, kw = _hf_router(kind)
    hidden = torch.randn(16, 24)
    with torch.no_grad():
        logits, hf_w, hf_i = router(hidden)
    ours_w, ours_i = kernels.route(logits.to(device), backend=backend,
                                   **{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()})
    hf_sorted, hf_order = hf_i.sort(-1)
    ours_sorted, ours_order = ours_i.cpu().sort(-1)
    assert torch.equal(ours_sorted, hf_sorted)
    torch.testing.assert_close(ours_w.cpu().gather(1, ours_order), hf_w.float().gather(1, hf_order),
                               rtol=1e-6, atol=1e-7)
    # and the slow reference agrees with both
    ref_w, ref_i = route_reference(logits, **{k: v for k, v in kw.items()})
    assert torch.equal(ref_i.sort(-1).values, hf_sorted)
