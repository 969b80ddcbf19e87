"""The tiny config is adversarial, not just small (DESIGN.md): sizes that make transposes
visible, routing that really selects, peaky logits, every expert used, routing decisions far
from ties, and every feature the variant claims proven live on the test inputs."""

import math

import pytest
import torch

from moe_conformance import routing, tolerances
from moe_conformance.case import TIE_MARGIN
from moe_conformance.compare import run_reference
from moe_conformance.features import LIVENESS_FACTOR, ablated_reference
from moe_conformance.probing import RoutingTap
from moe_conformance.tiny import INPUT_CASES
from moe_conformance.training import selection_biases
from moe_conformance.checks import conformance

# A top-k decision closer than this could flip between CPUs (fp32 noise on router scores is
# ~1e-7); the tiny models' seeds and inputs are chosen to stay clear of it.
MIN_ROUTING_MARGIN = TIE_MARGIN
MAX_ENTROPY_FRACTION = 0.5


def _sizes(arch):
    cfg = arch.model_config
    names = ["hidden_size", "intermediate_size", "moe_intermediate_size"]
    if arch.spec.capabilities.attention == "mla":
        names += ["qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "q_lora_rank"]
    else:
        names += ["head_dim"]
    return {n: getattr(cfg, n) for n in names if getattr(cfg, n, None)}


def _coincidences(arch) -> dict[str, str]:
    """Every size coincidence that hides a layout bug, by the trap (spec.TRAPS) that would
    declare it on purpose: equal sizes (a transpose or a wrong split dim keeps its shape), and
    an expert size whose double is the hidden size (a fused [2I, H] gate_up is square)."""
    sizes = _sizes(arch)
    expert = "moe_intermediate_size" if "moe_intermediate_size" in sizes else "intermediate_size"
    found = {}
    names = list(sizes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if sizes[a] == sizes[b]:
                trap = "square_experts" if {a, b} == {"hidden_size", expert} else None
                found[f"{a} == {b} == {sizes[a]}"] = trap
    if expert in sizes and 2 * sizes[expert] == sizes.get("hidden_size"):
        found[f"2 * {expert} == hidden_size == {sizes['hidden_size']}"] = "square_gate_up"
    return found


@conformance(subject="plugin", requires=())
def test_sizes_pairwise_distinct(arch, record):
    sizes = _sizes(arch)
    traps = arch.variant.traps
    record(figures={**sizes, "traps": sorted(traps)})
    found = _coincidences(arch)
    clashes = [what for what, trap in found.items() if trap not in traps]
    assert not clashes, f"{arch.id}: equal sizes hide transposes and wrong split dims: " + ", ".join(clashes) + (
        " (a trap variant declares the coincidence: Variant(traps=...))" if any(found[c] for c in clashes) else "")
    declared = {t for t in traps if t in ("square_experts", "square_gate_up")}
    inert = sorted(declared - set(found.values()))
    assert not inert, f"{arch.id}: declares trap(s) {inert}, but its sizes do not coincide that way: {sizes}"


@conformance(subject="plugin", requires=())
def test_routing_topology(arch, record):
    cfg = arch.model_config
    E, k = arch.num_experts, cfg.num_experts_per_tok
    n_group, topk_group = getattr(cfg, "n_group", 1) or 1, getattr(cfg, "topk_group", 1) or 1
    record(figures={"experts": E, "top_k": k, "n_group": n_group, "topk_group": topk_group})
    if "top1" in arch.variant.traps:
        assert k == 1, f"{arch.id}: declares the top1 trap, but top_k={k}"
    else:
        assert 1 < k < E, f"{arch.id}: top_k={k} must be > 1 and < num_experts={E} so selection matters"
    if n_group > 1:
        assert topk_group < n_group, f"{arch.id}: topk_group={topk_group} must be < n_group={n_group} to mask groups"
        assert k <= topk_group * E // n_group, f"{arch.id}: top_k={k} exceeds what {topk_group} kept groups hold"


@conformance(subject="plugin", requires=())
def test_logits_peaky(arch, record):
    batch = arch.batches["plain"]
    with torch.no_grad():
        logp = run_reference(arch.reference(), batch).double().log_softmax(-1)
    entropy = float(-(logp.exp() * logp).sum(-1).mean())
    limit = MAX_ENTROPY_FRACTION * math.log(logp.shape[-1])
    record(figures={"mean_entropy": entropy}, thresholds={"mean_entropy": limit})
    assert entropy < limit, f"{arch.id}: mean next-token entropy {entropy:.3f} nats is not below {limit:.3f}: logits too flat"


def _routing(arch):
    """Per MoE layer of the reference: (router logits, chosen experts, selection bias) of the
    valid tokens of every input case."""
    model = arch.reference()
    tap = RoutingTap(model, arch, "ref")
    biases = selection_biases(arch, model, "ref")
    per_layer = {l.router: [] for l in tap.layers}
    for name in INPUT_CASES:
        batch = arch.batches[name]
        with torch.no_grad(), tap():
            run_reference(model, batch)
        valid = batch.valid.flatten()
        for layer, reading, bias in zip(tap.layers, tap.ordered(), biases):
            b = None if bias is None else bias[1].to(reading.logits.device)
            per_layer[layer.router].append((reading.logits.reshape(-1, reading.logits.shape[-1])[valid],
                                            reading.indices.reshape(-1, reading.indices.shape[-1])[valid], b))
    return {r: chunks for r, chunks in per_layer.items() if chunks}, arch.model_config


@conformance(subject="plugin", requires=())
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


@conformance(subject="plugin", requires=())
def test_routing_margins(arch, record):
    per_router, cfg = _routing(arch)
    caps = arch.spec.capabilities
    oracle = routing.from_config(cfg, caps.router_scoring, caps.correction_bias)
    worst = {}
    for router, chunks in per_router.items():
        for logits, _, bias in chunks:
            margins = oracle.margins(logits, routing.top_k(cfg), bias)
            for kind, m in margins.items():
                worst[f"{router}.{kind}"] = min(worst.get(f"{router}.{kind}", math.inf), float(m.min()))
    record(figures={"min_margin": min(worst.values())}, thresholds={"min_margin": MIN_ROUTING_MARGIN})
    near = {k: v for k, v in worst.items() if v < MIN_ROUTING_MARGIN}
    assert not near, f"{arch.id}: routing near-ties (margin < {MIN_ROUTING_MARGIN}) on the test inputs: {near}"


@conformance(subject="plugin", requires=())
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
