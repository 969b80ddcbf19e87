"""Comparing reference and candidate: logit metrics, localization of the first diverging
submodule, and the routing-pinned diagnostic.

Localization hooks every (reference, candidate) submodule pair the plugin declares, runs both
models once, and walks the pairs in the reference's execution order: the first pair whose
outputs differ beyond the localization threshold is named, with its figures. Routers are read
through each side's probes (moe_conformance.probing); a flip in the chosen experts is reported
as such.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from .case import logits_of
from .contract import ModulePair, ProbeError, RouterReading
from .tiny import Batch

# A submodule "diverges" when max|delta| exceeds this fraction of the reference output's
# max|value|. fp32 noise between the two implementations is ~1e-6 relative (see tolerances.py).
LOCALIZE_RELATIVE = 1e-4


def run_reference(model, batch: Batch) -> torch.Tensor:
    # use_cache=False: with a cache, transformers ignores packed-document boundaries.
    return logits_of(model(**batch.kwargs, use_cache=False))


def run_candidate(model, batch: Batch) -> torch.Tensor:
    return logits_of(model(**batch.kwargs))


@dataclass
class LogitComparison:
    figures: dict[str, float]
    nan_message: str | None = None


def compare_logits(ref_logits: torch.Tensor, cand_logits: torch.Tensor, valid: torch.Tensor) -> LogitComparison:
    """KL(ref || cand) mean/max over valid tokens, top-1 agreement, max |delta logit|."""
    if cand_logits.shape != ref_logits.shape:
        return LogitComparison({}, f"candidate logits have shape {tuple(cand_logits.shape)}, reference {tuple(ref_logits.shape)}")
    ref = ref_logits.double()[valid]
    cand = cand_logits.double()[valid]
    bad = ~torch.isfinite(cand).all(-1)
    if bad.any():
        where = valid.nonzero()[bad.nonzero()[0, 0]].tolist()
        return LogitComparison(
            {"nonfinite_tokens": int(bad.sum())},
            f"candidate logits are not finite at {int(bad.sum())} of {len(bad)} tokens (first at batch {where[0]}, position {where[1]})",
        )
    ref_lp, cand_lp = ref.log_softmax(-1), cand.log_softmax(-1)
    kl = (ref_lp.exp() * (ref_lp - cand_lp)).sum(-1)
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    delta = (ref - cand).abs()
    decided = margin > 1e-3  # a near-tie at the top may flip on float noise alone
    agree = (ref.argmax(-1) == cand.argmax(-1))[decided]
    return LogitComparison(
        {
            "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()),
            "top1_agreement": float(agree.float().mean()) if agree.numel() else 1.0,
            "top1_near_ties": int((~decided).sum()),
            "max_abs_logit_delta": float(delta.max()),
            "tokens": int(ref.shape[0]),
        }
    )


# --------------------------------------------------------------------------------------------
# Localization


def _named(model: torch.nn.Module, pairs: list[ModulePair], side: str) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    return {getattr(p, side): modules[getattr(p, side)] for p in pairs if getattr(p, side) in modules}


@contextmanager
def _capture(modules: dict[str, torch.nn.Module], store: dict, order: list | None = None):
    handles = []
    for name, module in modules.items():
        def hook(mod, args, output, name=name):
            store[name] = output
            if order is not None and name not in order:
                order.append(name)
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return getattr(output, "last_hidden_state", None)


def _token_rows(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One row per valid token, whatever the layout: [B, S, ...], [B*S, ...], or per-head
    [B, h, S, ...] (e.g. MLA's single-head latent [B, 1, S, D])."""
    B, S = valid.shape
    if t.dim() >= 2 and t.shape[:2] == (B, S):
        rows = t[valid]
    elif t.shape[0] == B * S:
        rows = t[valid.flatten()]
    elif t.dim() >= 3 and t.shape[0] == B and t.shape[-2] == S:
        rows = t.movedim(-2, 1)[valid]
    else:
        return t
    return rows.reshape(rows.shape[0], -1)


@dataclass
class Divergence:
    pair: ModulePair
    summary: str
    figures: dict[str, float] = field(default_factory=dict)


def compare_readings(pair: ModulePair, ref: RouterReading, cand: RouterReading, valid) -> Divergence | None:
    """Two routing decisions for the same tokens: the expert sets first, then the weights."""
    if cand.indices is None or cand.weights is None:
        return Divergence(pair, "the candidate's probes give no expert indices/weights for this layer")
    ref_w, ref_i = (_token_rows(t, valid) for t in (ref.weights, ref.indices))
    cand_w, cand_i = (_token_rows(t, valid) for t in (cand.weights, cand.indices))
    if ref_i.shape != cand_i.shape:
        return Divergence(pair, f"router picks {cand_i.shape[-1]} experts per token for {cand_i.shape[0]} tokens, "
                                f"reference {ref_i.shape[-1]} for {ref_i.shape[0]}")
    ref_sorted, order_r = ref_i.sort(-1)
    cand_sorted, order_c = cand_i.sort(-1)
    flips = (ref_sorted != cand_sorted.to(ref_sorted)).any(-1)
    if flips.any():
        t = int(flips.nonzero()[0, 0])
        return Divergence(
            pair,
            f"selected experts differ on {int(flips.sum())}/{len(flips)} tokens "
            f"(token {t}: reference {ref_sorted[t].tolist()}, candidate {cand_sorted[t].tolist()})",
            {"routing_flips": int(flips.sum())},
        )
    w_ref = ref_w.double().gather(-1, order_r)
    w_cand = cand_w.double().gather(-1, order_c.to(cand_w.device))
    delta = (w_ref - w_cand).abs().max()
    if delta > LOCALIZE_RELATIVE * w_ref.abs().max():
        t = int((w_ref - w_cand).abs().amax(-1).argmax())
        return Divergence(
            pair,
            f"same experts selected, routing weights differ: max|delta| {float(delta):.3g} (token {t}: weight sum "
            f"reference {float(w_ref[t].sum()):.4f}, candidate {float(w_cand[t].sum()):.4f})",
            {"routing_weight_delta": float(delta)},
        )
    return None


def _compare_hidden(pair: ModulePair, ref_out, cand_out, valid) -> Divergence | None:
    ref_t, cand_t = _first_tensor(ref_out), _first_tensor(cand_out)
    if ref_t is None or cand_t is None:
        return None
    ref_t, cand_t = _token_rows(ref_t, valid), _token_rows(cand_t, valid)
    if ref_t.shape != cand_t.shape:
        return Divergence(pair, f"output shapes differ: reference {tuple(ref_t.shape)}, candidate {tuple(cand_t.shape)}")
    ref_t, cand_t = ref_t.double(), cand_t.double()
    if not torch.isfinite(cand_t).all():
        return Divergence(pair, f"candidate output has {int((~torch.isfinite(cand_t)).sum())} non-finite values")
    delta = (ref_t - cand_t).abs().max()
    scale = ref_t.abs().max().clamp_min(1e-30)
    if delta > LOCALIZE_RELATIVE * scale:
        return Divergence(
            pair,
            f"max|delta| {float(delta):.3g} ({float(delta / scale):.2g} of the reference output's max {float(scale):.3g})",
            {"max_abs_delta": float(delta), "relative_delta": float(delta / scale)},
        )
    return None


def _taps(case, ref_model, cand_model):
    """Routing taps on both sides, or None for a side whose probes cannot be set up."""
    from .probing import RoutingTap

    out = []
    for model, side in ((ref_model, "ref"), (cand_model, "cand")):
        try:
            out.append(RoutingTap(model, case, side))
        except ProbeError:
            out.append(None)
    return out


def localize(case, ref_model, cand_model, batch: Batch) -> Divergence | None:
    """The first (in the reference's execution order) submodule pair that diverges; routers
    are compared as routing decisions read through each side's probes."""
    pairs = case.module_pairs()
    ref_mods, cand_mods = _named(ref_model, pairs, "ref"), _named(cand_model, pairs, "cand")
    ref_out, cand_out, order = {}, {}, []
    ref_tap, cand_tap = _taps(case, ref_model, cand_model)
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(_capture(ref_mods, ref_out, order))
        stack.enter_context(_capture(cand_mods, cand_out))
        for tap in (ref_tap, cand_tap):
            if tap is not None:
                stack.enter_context(tap())
        run_reference(ref_model, batch)
        try:
            run_candidate(cand_model, batch)
        except Exception:  # noqa: BLE001 - localize what ran before the failure
            pass
    rank = {name: i for i, name in enumerate(order)}
    live = [p for p in pairs if p.ref in ref_out and (p.cand in cand_out or p.role == "router")]
    live.sort(key=lambda p: rank[p.ref])
    for pair in live:
        if pair.role == "router":
            if ref_tap is None or cand_tap is None or pair.layer not in ref_tap.readings:
                continue
            cand_reading = cand_tap.readings.get(pair.layer)
            if cand_reading is None:
                continue
            found = compare_readings(pair, ref_tap.readings[pair.layer], cand_reading, batch.valid)
        elif pair.cand in cand_out:
            found = _compare_hidden(pair, ref_out[pair.ref], cand_out[pair.cand], batch.valid)
        else:
            found = None
        if found:
            return found
    return None


def routing_pinned_delta(case, ref_model, cand_model, batch: Batch) -> float | None:
    """Rerun the candidate with every layer's routing replaced by the reference's (same
    experts, same weights), through the candidate's probes. max|delta logit| then, or None
    when the routing cannot be read or forced."""
    from .probing import RoutingTap, can_force, forced_routing

    if can_force(case) is not None:
        return None
    try:
        ref_tap = RoutingTap(ref_model, case, "ref")
    except ProbeError:
        return None
    with torch.no_grad(), ref_tap():
        ref_logits = run_reference(ref_model, batch)
    readings = dict(ref_tap.readings)

    def choose(layer, natural):
        forced = readings.get(layer)
        return natural if forced is None else forced

    with torch.no_grad(), forced_routing(cand_model, case, "cand", choose):
        cand_logits = run_candidate(cand_model, batch)
    valid = batch.valid
    return float((ref_logits.double()[valid] - cand_logits.double()[valid]).abs().max())


def diagnose(case, ref_model, cand_model, batch: Batch, unpinned_delta: float | None,
             cand_logits: torch.Tensor | None = None, gate: float = 5e-4) -> str:
    """A failure message body: first divergence, what pinning the routing changes, and which
    known deviation of the reference reproduces the candidate (moe_conformance.diagnosis)."""
    lines = []
    found = localize(case, ref_model, cand_model, batch)
    if found:
        lines.append(f"first divergence: reference {found.pair.ref} <-> candidate {found.pair.cand}: {found.summary}")
    else:
        lines.append("no declared submodule pair diverges beyond the localization threshold; the difference is "
                     "outside the declared pairs (or below it at every pair and compounding)")
    try:
        pinned = routing_pinned_delta(case, ref_model, cand_model, batch)
    except Exception as exc:  # noqa: BLE001
        pinned, lines = None, lines + [f"routing-pinned rerun failed: {type(exc).__name__}: {exc}"]
    if pinned is not None and unpinned_delta is not None:
        verdict = (
            "the gap is in routing (expert selection or routing weights)"
            if pinned < 0.1 * unpinned_delta
            else "the gap is not explained by routing alone (numeric difference outside the router)"
        )
        lines.append(
            f"routing-pinned diagnostic: with the reference's expert choices and weights forced into the candidate, "
            f"max|delta logit| goes from {unpinned_delta:.3g} to {pinned:.3g}: {verdict}"
        )
    elif pinned is None:
        from .probing import can_force

        why = can_force(case)
        if why:
            lines.append(f"routing-pinned diagnostic not run: {why}")
    if cand_logits is not None and torch.isfinite(cand_logits).all():
        from .diagnosis import describe, name_causes

        lines.append(describe(name_causes(case, batch, cand_logits, gate)))
    return "\n".join(lines)


def routing_flip_rate(case, ref_model, cand_model, batch: Batch, sides: tuple[str, str] = ("ref", "cand")) -> float | None:
    """Fraction of (valid token, MoE layer) whose chosen expert sets differ between the two
    models on ``batch``, read through each side's probes (None when either cannot be read).
    The bf16 profile gates it: bf16 bugs in routing (a rounded bias, a bf16 router) flip far
    more decisions than bf16 rounding of the hidden states does."""
    from .probing import RoutingTap

    try:
        ref_tap, cand_tap = RoutingTap(ref_model, case, sides[0]), RoutingTap(cand_model, case, sides[1])
    except ProbeError:
        return None
    with torch.no_grad(), ref_tap(), cand_tap():
        for model, side in ((ref_model, sides[0]), (cand_model, sides[1])):
            (run_reference if side == "ref" else run_candidate)(model, batch)
    valid = batch.valid.reshape(-1)
    flips = total = 0
    try:
        pairs = list(zip(ref_tap.indices, cand_tap.indices))
    except ProbeError:
        return None
    for ref_i, cand_i in pairs:
        a, b = ref_i.reshape(-1, ref_i.shape[-1])[valid].sort(-1).values, cand_i.reshape(-1, cand_i.shape[-1])[valid]
        b = b.sort(-1).values.to(a)
        flips += int((a != b).any(-1).sum())
        total += a.shape[0]
    return flips / max(total, 1)
