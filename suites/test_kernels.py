"""Kernels under test (family ``kernels``): the MoE kernels a plugin declares
(``ArchSpec(kernels=...)``, moe_conformance.kernel_checks.subjects.KernelSubject) and those the
user selects with ``--kernels NAME`` (bundled: ``triton``, ``torch``; or ``module:ATTRIBUTE``).
Nothing runs for a plugin that declares none and a run that selects none: not applicable.

1. The kernel check set (moe_conformance.kernel_checks.checks) on hypothesis-drawn shapes that
   match the arch's routing (the routing oracle's scoring, groups, bias, renormalization,
   scaling): one token, empty experts, all tokens on one expert, odd sizes; outputs poisoned,
   inputs watched, forward+backward twice; fp32 and fp16 on CPU (Triton under
   TRITON_INTERPRET=1), bf16 too on a GPU (``--device cuda``). A failure names the kernel, the
   stage and the case.
2. The candidate switched to the kernels (a subject's ``use_in``) matches the reference's logits.
3. The kernels registered as a transformers experts implementation inside the reference give
   the eager reference's logits and ALL its gradients, router weights included.
"""

import copy

import pytest
import torch

from moe_conformance import routing, tolerances
from moe_conformance.checks import ANY_DTYPE, conformance
from moe_conformance.compare import compare_logits, run_candidate, run_reference
from moe_conformance.kernel_checks.checks import run_kernel_checks
from moe_conformance.kernel_checks.profiles import sweep_examples


def declares_kernels(case) -> str | None:
    if case.kernel_subjects():
        return None
    return ("no kernels under test: declare ArchSpec(kernels=(KernelSubject(...),)) or select some with "
            "--kernels NAME (bundled: triton, torch)")


def _routing(arch) -> routing.Routing:
    caps = arch.spec.capabilities
    return routing.from_config(arch.model_config, caps.router_scoring, caps.correction_bias)


def _dtypes(device: str):
    return (torch.float32, torch.float16) + ((torch.bfloat16,) if device.startswith("cuda") else ())


@conformance(subject="kernels", requires=(), applies=declares_kernels, dtypes=ANY_DTYPE)
def test_kernel_check_set(arch, record):
    device = str(arch.device)
    # Stress variants change the routing (groups, normalization): the routing-dependent cases
    # run in full, the dtype sweep of the expert GEMMs once, on the faithful variant (CPU budget).
    # `--hypothesis-profile moe-conformance-sweep` sweeps every variant in every dtype, longer.
    sweep = sweep_examples()
    light = arch.variant.name != "faithful" and not device.startswith("cuda") and sweep is None
    results = run_kernel_checks(_routing(arch), backends=arch.kernel_subjects(),
                                dtypes=(torch.float32,) if light else _dtypes(device), device=device,
                                max_examples=sweep or (1 if light else 2))
    skipped = [f"{r['backend']} {r.get('op', '*')}: {r['skipped']}" for r in results if "skipped" in r]
    ran = [r for r in results if "skipped" not in r and "seconds" not in r]
    worst = {}
    for r in ran:
        key = f"{r.get('op')}.{r.get('backend')}.{r.get('dtype', 'fp32')}"
        worst[key] = max(worst.get(key, 0.0), float(r.get("max_error", 0.0)))
    record(figures={"cases": len(ran), "kernels": [s.name for s in arch.kernel_subjects()], "not_run": skipped, **worst})
    assert ran, f"{arch.id}: no kernel case ran: {skipped}"


def switchable(case) -> str | None:
    why = declares_kernels(case)
    if why:
        return why
    if not any(s.use_in for s in case.kernel_subjects()):
        return "no kernel subject declares use_in(candidate): the candidate cannot be switched to the kernels"
    return None


@pytest.mark.arch_variants("faithful")
@conformance(applies=switchable)
def test_candidate_on_kernels_matches_reference(arch, record):
    profile = tolerances.profile("logit_parity", "float32", arch.spec.tolerances)
    record(thresholds=profile.thresholds())
    problems, ran = [], []
    for subject in arch.kernel_subjects():
        if subject.use_in is None:
            continue
        why = subject.why_not(str(arch.device))
        if why:
            record(figures={f"{subject.name}.not_run": why})
            continue
        cand, ref = arch.candidate(), arch.reference()
        try:
            subject.use_in(cand)
        except NotImplementedError as exc:
            record(figures={f"{subject.name}.not_run": str(exc)})
            continue
        ran.append(subject.name)
        for name in ("plain", "packed"):
            batch = arch.batches[name]
            with torch.no_grad():
                result = compare_logits(run_reference(ref, batch), run_candidate(cand, batch), batch.valid)
            record(figures={f"{subject.name}.{name}.{k}": v for k, v in result.figures.items()})
            problems += [f"kernels {subject.name}, {name}: {p}"
                         for p in ([result.nan_message] if result.nan_message else profile.violations(result.figures))]
    if not ran:
        pytest.skip(f"{arch.id}: none of the kernels can run the candidate here: {record.figures}")
    assert not problems, f"{arch.id} candidate on its kernels: " + "; ".join(problems)


def in_reference(case) -> str | None:
    why = declares_kernels(case)
    if why:
        return why
    if not any(s.experts or s.fused_moe for s in case.kernel_subjects()):
        return "no kernel subject provides an experts or fused_moe stage to run inside the reference"
    return None


@pytest.mark.arch_variants("faithful")
@conformance(subject="kernels", requires=(), applies=in_reference, dtypes=ANY_DTYPE)
def test_reference_with_kernel_experts(arch, record):
    """transformers' own model with its experts on the kernels: logits and every gradient."""
    from moe_conformance.kernel_checks.hf_integration import register, supports

    eager = arch.reference()
    experts = [m for n, m in eager.named_modules() if n.endswith("mlp.experts")]
    why = supports(experts[0]) if experts else "no mlp.experts module"
    if why:
        pytest.skip(f"{arch.id}: the reference's experts are not in the kernels' layout: {why}")
    gate = tolerances.profile("kernels_in_reference", "float32", arch.spec.tolerances)
    problems = []
    for subject in arch.kernel_subjects():
        if not (subject.experts or subject.fused_moe) or subject.why_not(str(arch.device)):
            continue
        config = copy.deepcopy(arch.config)
        arch.spec.model_config(config)._experts_implementation = register(subject)
        kernel = arch.reference(config=config)
        batch = arch.batches["packed"]
        outs = []
        eager.zero_grad(set_to_none=True)
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
        record(figures={f"{subject.name}.{k}": v for k, v in figures.items()}, thresholds=gate.thresholds())
        problems += [f"kernels {subject.name}: {p} (worst gradient: {worst_name})" for p in gate.violations(figures)]
    assert not problems, f"{arch.id} reference with kernel experts vs eager: " + "; ".join(problems)
