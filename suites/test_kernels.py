"""Kernel vs reference (family ``kernels``).

1. The kernel check set (moe_conformance.kernel_checks.checks) on hypothesis-drawn shapes that match
   the arch's routing (scoring, groups, bias): one token, empty experts, all tokens on one
   expert, odd sizes; outputs poisoned with NaN, forward+backward twice, fp32 and fp16 on CPU
   (Triton under TRITON_INTERPRET=1), bf16 too on a GPU (``--device cuda``).
2. The candidate with its experts on the kernels matches the reference's logits.
3. The kernels registered as a transformers experts implementation inside the reference give
   the eager reference's logits and ALL its gradients, router weights included.
"""

import copy

import pytest
import torch

from moe_conformance import tolerances
from moe_conformance.compare import compare_logits, run_candidate, run_reference
from moe_conformance.kernel_checks.checks import backend_available, run_kernel_checks
from moe_conformance.kernel_checks.strategies import RoutingConfig
from moe_conformance.checks import conformance

BACKEND = "triton"


def _routing(arch):
    caps, cfg = arch.spec.capabilities, arch.model_config
    if caps.router_scoring not in ("sigmoid", "softmax"):
        pytest.skip(f"{arch.id}: the routing kernels implement sigmoid and softmax routers, not {caps.router_scoring}")
    return RoutingConfig(
        scoring=caps.router_scoring,
        n_group=getattr(cfg, "n_group", 1) or 1,
        topk_group=getattr(cfg, "topk_group", 1) or 1,
        norm_topk_prob=bool(getattr(cfg, "norm_topk_prob", caps.router_scoring == "softmax")),
        routed_scaling_factor=float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0),
        has_correction_bias=caps.correction_bias,
    )


def _require_backend(device):
    ok, why = backend_available(BACKEND, device)
    if not ok:
        pytest.skip(why)


@conformance(subject="kernels", requires=())
def test_kernel_check_set(arch, record):
    routing = _routing(arch)
    device = str(arch.device)
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if device.startswith("cuda") else ())
    # Stress variants change the routing (groups, normalization): the routing-dependent cases
    # run in full, the dtype sweep of the expert GEMMs once, on the faithful variant (CPU budget).
    if arch.variant.name != "faithful" and not device.startswith("cuda"):
        results = run_kernel_checks(routing, dtypes=(torch.float32,), device=device, max_examples=1)
    else:
        results = run_kernel_checks(routing, dtypes=dtypes, device=device)
    skipped = [r for r in results if "skipped" in r]
    ran = [r for r in results if "skipped" not in r and "seconds" not in r]
    worst = {}
    for r in ran:
        key = f"{r.get('op')}.{r.get('backend')}.{r.get('dtype', 'fp32')}"
        worst[key] = max(worst.get(key, 0.0), float(r.get("max_error", 0.0)))
    record(figures={"cases": len(ran), "skipped": [r["skipped"] for r in skipped], **worst})
    assert ran, f"{arch.id}: no kernel case ran: {skipped}"


def _candidate_on_kernels(arch):
    cand = arch.candidate()
    experts = [m for m in cand.modules() if hasattr(m, "backend") and hasattr(m, "kernel_unsupported")]
    if not experts:
        pytest.skip(f"{arch.id}: the candidate exposes no experts backend switch")
    why = experts[0].kernel_unsupported()
    if why:
        pytest.skip(f"{arch.id}: the kernels do not compute {why}")
    for m in experts:
        m.backend = BACKEND
    return cand


@pytest.mark.arch_variants("faithful")
def test_candidate_on_kernels_matches_reference(arch, record):
    _require_backend(str(arch.device))
    cand, ref = _candidate_on_kernels(arch), arch.reference()
    profile = tolerances.profile("logit_parity", "float32", arch.spec.tolerances)
    record(thresholds=profile.thresholds())
    problems = []
    for name in ("plain", "packed"):
        batch = arch.batches[name]
        with torch.no_grad():
            result = compare_logits(run_reference(ref, batch), run_candidate(cand, batch), batch.valid)
        record(figures={f"{name}.{k}": v for k, v in result.figures.items()})
        problems += [f"{name}: {p}" for p in ([result.nan_message] if result.nan_message else profile.violations(result.figures))]
    assert not problems, f"{arch.id} candidate with {BACKEND} experts: " + "; ".join(problems)


@pytest.mark.arch_variants("faithful")
@conformance(subject="kernels", requires=())
def test_reference_with_kernel_experts(arch, record):
    """transformers' own model with its experts on the kernels: logits and every gradient."""
    _require_backend(str(arch.device))
    from moe_conformance.kernel_checks.hf_integration import register, supports

    eager = arch.reference()
    experts = [m for n, m in eager.named_modules() if n.endswith("mlp.experts")]
    why = supports(experts[0]) if experts else "no mlp.experts module"
    if why:
        pytest.skip(f"{arch.id}: {why}")
    config = copy.deepcopy(arch.config)
    arch.spec.model_config(config)._experts_implementation = register(BACKEND)
    kernel = arch.reference(config=config)
    gate = tolerances.profile("kernels_in_reference", "float32", arch.spec.tolerances)
    batch = arch.batches["packed"]
    outs = []
    for model in (eager, kernel):
        logits = run_reference(model, batch)
        logits.float().log_softmax(-1).mean().backward()
        outs.append(logits.detach())
    figures = {"max_abs_logit_delta": float((outs[0] - outs[1]).abs().max())}
    grads_k = dict(kernel.named_parameters())
    worst_name, worst = None, 0.0
    for name, p in eager.named_parameters():
        g_e, g_k = p.grad, grads_k[name].grad
        if g_e is None and g_k is None:
            continue
        if (g_e is None) != (g_k is None):
            worst_name, worst = name, float("inf")
            break
        rel = float((g_e - g_k).abs().max() / g_e.abs().max().clamp_min(1e-30))
        if rel > worst:
            worst_name, worst = name, rel
    figures.update(max_grad_relative_delta=worst, worst_grad=worst_name)
    record(figures=figures, thresholds=gate.thresholds())
    problems = gate.violations(figures)
    assert not problems, f"{arch.id} reference with {BACKEND} experts vs eager: " + "; ".join(problems) + f" (worst gradient: {worst_name})"
