"""The tiny config is adversarial, not just small (DESIGN.md): sizes that make transposes
visible, routing that really selects, peaky logits, every expert used, routing decisions far
from ties, and every feature the variant claims proven live on the test inputs."""

import math

import pytest
import torch

from moe_conformance import tolerances
from moe_conformance.compare import run_reference
from moe_conformance.features import LIVENESS_FACTOR, ablated_reference, choice_margins, router_outputs
from moe_conformance.tiny import INPUT_CASES

# A top-k decision closer than this could flip between CPUs (fp32 noise on router scores is
# ~1e-7); the tiny models' seeds and inputs are chosen to stay clear of it.
MIN_ROUTING_MARGIN = 1e-5
MAX_ENTROPY_FRACTION = 0.5


def _sizes(arch):
    cfg = arch.model_config
    names = ["hidden_size", "intermediate_size", "moe_intermediate_size"]
    if arch.spec.capabilities.attention == "mla":
        names += ["qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "q_lora_rank"]
    else:
        names += ["head_dim"]
    return {n: getattr(cfg, n) for n in names if getattr(cfg, n, None)}


def test_sizes_pairwise_distinct(arch, record):
    sizes = _sizes(arch)
    record(figures=sizes)
    clashes = [(a, b) for i, a in enumerate(sizes) for b in list(sizes)[i + 1:] if sizes[a] == sizes[b]]
    assert not clashes, f"{arch.id}: equal sizes hide transposes and wrong split dims: " + ", ".join(
        f"{a} == {b} == {sizes[a]}" for a, b in clashes)


def test_routing_topology(arch, record):
    cfg = arch.model_config
    E, k = arch.num_experts, cfg.num_experts_per_tok
    n_group, topk_group = getattr(cfg, "n_group", 1) or 1, getattr(cfg, "topk_group", 1) or 1
    record(figures={"experts": E, "top_k": k, "n_group": n_group, "topk_group": topk_group})
    assert 1 < k < E, f"{arch.id}: top_k={k} must be > 1 and < num_experts={E} so selection matters"
    if n_group > 1:
        assert topk_group < n_group, f"{arch.id}: topk_group={topk_group} must be < n_group={n_group} to mask groups"
        assert k <= topk_group * E // n_group, f"{arch.id}: top_k={k} exceeds what {topk_group} kept groups hold"


def test_logits_peaky(arch, record):
    batch = arch.batches["plain"]
    with torch.no_grad():
        logp = run_reference(arch.reference(), batch).double().log_softmax(-1)
    entropy = float(-(logp.exp() * logp).sum(-1).mean())
    limit = MAX_ENTROPY_FRACTION * math.log(logp.shape[-1])
    record(figures={"mean_entropy": entropy}, thresholds={"mean_entropy": limit})
    assert entropy < limit, f"{arch.id}: mean next-token entropy {entropy:.3f} nats is not below {limit:.3f}: logits too flat"


def _routing(arch):
    routers = [p.ref for p in arch.module_pairs() if p.role == "router"]
    model, state, cfg = arch.reference(), arch.reference_state, arch.model_config
    per_router = {r: [] for r in routers}
    for name in INPUT_CASES:
        batch = arch.batches[name]
        for router, (logits, _, indices) in router_outputs(model, batch, routers).items():
            valid = batch.valid.flatten()
            bias = state.get(f"{router}.e_score_correction_bias", state.get(f"{router.rpartition('.')[0]}.e_score_correction_bias"))
            bias = None if bias is None else bias.to(logits.device)
            per_router[router].append((logits[valid], indices[valid], bias))
    return {r: chunks for r, chunks in per_router.items() if chunks}, cfg


def test_every_expert_routed(arch, record):
    per_router, cfg = _routing(arch)
    E = arch.num_experts
    idle = {}
    for router, chunks in per_router.items():
        load = torch.bincount(torch.cat([i.flatten() for _, i, _ in chunks]), minlength=E)
        record(figures={f"{router}.min_load": int(load.min()), f"{router}.max_load": int(load.max())})
        if (load == 0).any():
            idle[router] = (load == 0).nonzero().flatten().tolist()
    assert per_router, f"{arch.id}: no router outputs captured (no module pair with role 'router')"
    assert not idle, f"{arch.id}: experts never routed on the test inputs: {idle}"


def test_routing_margins(arch, record):
    per_router, cfg = _routing(arch)
    worst = {}
    for router, chunks in per_router.items():
        for logits, _, bias in chunks:
            margins = choice_margins(logits, bias, cfg.num_experts_per_tok, getattr(cfg, "n_group", 1) or 1,
                                     getattr(cfg, "topk_group", 1) or 1, arch.spec.capabilities.router_scoring)
            for kind, m in margins.items():
                worst[f"{router}.{kind}"] = min(worst.get(f"{router}.{kind}", math.inf), float(m.min()))
    record(figures={"min_margin": min(worst.values())}, thresholds={"min_margin": MIN_ROUTING_MARGIN})
    near = {k: v for k, v in worst.items() if v < MIN_ROUTING_MARGIN}
    assert not near, f"{arch.id}: routing near-ties (margin < {MIN_ROUTING_MARGIN}) on the test inputs: {near}"


def test_claimed_features_live(arch, record):
    gate = tolerances.profile("logit_parity", "float32", arch.spec.tolerances).gates["max_abs_logit_delta"].limit
    need = LIVENESS_FACTOR * gate
    base = {name: run_reference(arch.reference(), b) for name, b in arch.batches.items()}
    inert, moved = [], {}
    for feature in sorted(arch.variant.exercises):
        model = ablated_reference(arch, feature)
        delta = 0.0
        with torch.no_grad():
            for name, batch in arch.batches.items():
                d = (run_reference(model, batch) - base[name]).abs()[batch.valid].max()
                delta = max(delta, float(d))
        moved[feature] = delta
        if not delta >= need:
            inert.append(f"{feature} (moves logits by {delta:.3g})")
    record(figures={f"ablation.{k}": v for k, v in moved.items()}, thresholds={"ablation_min": need})
    if not arch.variant.exercises:
        pytest.skip(f"{arch.id} claims no features")
    assert not inert, (
        f"{arch.id}: claimed features are inert on the test inputs (need max|delta logit| >= {need:.3g}, "
        f"{LIVENESS_FACTOR:g}x the parity gate): " + ", ".join(inert))
