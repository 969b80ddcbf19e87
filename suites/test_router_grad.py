"""Router gradient flow, gradient parity and load balancing, in fp32 and under ``--dtype bf16``
(the production profile, on the candidate cast to bf16 as it trains in production). In bf16,
gradient parity pins the tokens the candidate routes differently to the reference's experts
(rounding flips a few, and a flipped token moves its whole gradient: 0.78 relative unpinned, 0.036
pinned), and the aux and z-loss definitions are checked on the candidate's own bf16-model logits.
Balancing scales its bias-update rate to the router scores' spread there
(benchmarks/results/training_noise_floor_bf16.md).

After one forward+backward of the language-modelling loss alone on a reverse-text batch:
- every router's weights get finite, non-zero gradients (a detached router learns nothing from
  the loss, and logits can still match);
- every expert that received a loss-bearing token has a non-zero gradient, every expert that
  received none has exactly zero, with natural routing and with routing forced onto a few
  experts (``training.force_route``) so that some experts surely get nothing;
- shared experts get gradients; the selection-only correction bias gets none (and is not a
  trainable parameter);
- the candidate's gradients, converted to the on-disk naming, match the reference's per
  parameter group (attention, router, experts, shared, norms, embeddings, dense).
Load balancing: the aux loss of the candidate's training code matches an independent fp64
formula on the candidate's router logits (padding excluded), that formula gives the same on the
reference router's logits, and the team's value matches the reference model's own (where the
architecture defines one); the z-loss likewise against its definition;
aux-loss-free balancing (DeepSeek-V3 bias update) reduces imbalance from a skewed start and its
bias never receives gradient.
"""

from __future__ import annotations

import math
import weakref

import pytest
import torch

from moe_conformance import data, replay, tokenizer, tolerances, training
from moe_conformance.checks import ANY_DTYPE, conformance, needs_capability, needs_forcing, needs_router_module, needs_routing_field

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
BATCH_SIZE = 8


def _prepared(arch) -> dict:
    """What several checks share, computed once per case and process."""
    if arch not in _CACHE:
        tok = tokenizer.load()
        batch = arch.clear_of_ties(lambda a: data.lm_batch(tok, BATCH_SIZE, arch.case_seed + 7919 * a).to(arch.device))
        cand = arch.candidate().train()
        cand_state = dict(cand.state_dict())
        cand_state.update(dict(cand.named_parameters()))
        _CACHE[arch] = {
            "batch": batch,
            "disk_names": training.candidate_disk_names(arch, cand_state),
            "bias_keys": set(training.correction_bias_keys(arch)),
        }
    return _CACHE[arch]




def _backward(arch, model, reference: bool):
    prep = _prepared(arch)
    tap = training.routing_tap(arch, model, "ref" if reference else "cand")
    loss = training.lm_backward(model, prep["batch"], reference, tap)
    return loss, tap


def _grad_problem(name: str, p: torch.Tensor) -> str | None:
    if p.grad is None:
        return f"{name}: no gradient (grad is None{'; requires_grad=False' if not p.requires_grad else ''})"
    if not torch.isfinite(p.grad).all():
        return f"{name}: gradient has {int((~torch.isfinite(p.grad)).sum())} non-finite values"
    if not p.grad.abs().max() > 0:
        return f"{name}: gradient is all zeros"
    return None


def _bias_names(arch) -> list[str]:
    prep = _prepared(arch)
    return [k for k, disk in prep["disk_names"].items() if disk and set(disk) <= prep["bias_keys"]]


VANISHING = 1e-6
@conformance(requires=("forward", "converter", "state", "deterministic", "routing"), applies=needs_router_module,
             dtypes=ANY_DTYPE)
def test_router_weights_get_gradient(arch, record):
    cand = arch.candidate(dtype=arch.dtype).train()
    loss, tap = _backward(arch, cand, False)
    bias = set(_bias_names(arch))
    problems, norms = [], []
    # a gradient at float-noise level is no gradient: measured against the model's largest
    # (healthy routers: 1e-2 of it; a renormalized top-1 weight: 1e-9)
    largest = max((float(p.grad.abs().max()) for p in cand.parameters() if p.grad is not None), default=0.0)
    for name in tap.modules:
        params = [(f"{name}.{n}", p) for n, p in tap.modules[name].named_parameters() if f"{name}.{n}" not in bias]
        if not params:
            problems.append(f"router {name} has no trainable parameters")
        for full, p in params:
            found = _grad_problem(full, p)
            if not found and float(p.grad.abs().max()) < VANISHING * largest:
                found = (f"{full}: gradient vanishes (max |g| {float(p.grad.abs().max()):.3g}, under {VANISHING:g} of the "
                         f"model's largest {largest:.3g}: float noise, not a signal)")
            if found:
                problems.append(found)
            else:
                norms.append(float(p.grad.norm()))
    record(figures={"lm_loss": loss, "router_grad_norm_min": min(norms) if norms else 0.0})
    if problems:
        try:
            ones = all(bool((w.detach() == 1).all()) for w in tap.weights)
        except Exception:  # noqa: BLE001 - no weights from the probe: no hint
            ones = False
        if arch.model_config.num_experts_per_tok == 1 and ones:
            problems.append("top-1 routing with renormalization: the single weight is always 1, so the loss cannot "
                            "reach the router (renormalize only k > 1, or weight by the unnormalized score)")
        arch.fail("router weights get no usable gradient from the language-modelling loss "
                    "(a router detached from the loss never learns to route)", problems)


def forcing_if_forced(case, params) -> str | None:
    from moe_conformance.probing import routing_layers

    if not any(layer.experts for layer in routing_layers(case, "cand")):
        return ("no module pair with role 'experts' is declared: which parameters are an expert's is unknown "
                "(declare ModulePair(ref_experts, cand_experts, role='experts'))")
    return needs_forcing(case) if params.get("routing") == "forced" else None


def _expert_slices(experts: torch.nn.Module, E: int):
    """(param name, expert index, tensor slice or param) for stacked [E, ...] parameters and for
    per-expert submodules (``experts.3.w1``)."""
    for n, p in experts.named_parameters():
        head = n.split(".", 1)[0]
        if head.isdigit():
            yield n, int(head), p, None
        elif p.shape[0] == E:
            for e in range(E):
                yield n, e, p, e


@pytest.mark.parametrize("routing", ["natural", "forced"])
@conformance(requires=("forward", "converter", "state", "deterministic", "routing"), applies=forcing_if_forced,
             dtypes=ANY_DTYPE)
def test_expert_gradients_follow_routing(arch, routing, record):
    """Experts with loss-bearing tokens get gradients; experts with none get exactly zero."""
    prep = _prepared(arch)
    E, k = arch.num_experts, arch.model_config.num_experts_per_tok
    cand = arch.candidate(dtype=arch.dtype).train()
    chosen = list(range(k + 1))  # contiguous, so group-limited routing keeps them together
    if routing == "forced":
        with training.force_route(arch, cand, "cand", chosen):
            _, tap = _backward(arch, cand, False)
    else:
        _, tap = _backward(arch, cand, False)
    loss_rows = prep["batch"].loss_mask.reshape(-1)
    modules = dict(cand.named_modules())
    layers = [l for l in tap.layers if l.experts]
    problems, routed, empty = [], 0, 0
    for layer, idx in zip(layers, tap.indices):
        expert_mod = layer.experts
        load = training.loads(idx, E, loss_rows)
        routed += int((load > 0).sum())
        empty += int((load == 0).sum())
        for pname, e, p, sl in _expert_slices(modules[expert_mod], E):
            g = p.grad if sl is None else (None if p.grad is None else p.grad[sl])
            where = f"{expert_mod}.{pname}" + (f"[{e}]" if sl is not None else "")
            if load[e] > 0:
                if g is None or not g.abs().max() > 0:
                    problems.append(f"{where}: expert {e} received {int(load[e])} token(s) but its gradient is "
                                    f"{'None' if g is None else 'all zeros'}")
                elif not torch.isfinite(g).all():
                    problems.append(f"{where}: expert {e} has a non-finite gradient")
            elif g is not None and g.abs().max() != 0:
                problems.append(f"{where}: expert {e} received no token but has a non-zero gradient "
                                f"(max |g| {float(g.abs().max()):.3g})")
    record(figures={"experts_routed": routed, "experts_empty": empty, "forced_experts": chosen if routing == "forced" else []})
    if routing == "forced" and empty == 0:
        problems.append(f"forcing routing onto experts {chosen} left no expert empty: force_route had no effect")
    if problems:
        arch.fail(f"expert gradients do not follow the routing ({routing})", problems)


@conformance(applies=needs_capability("shared_experts", "no shared experts"), dtypes=ANY_DTYPE)
def test_shared_experts_get_gradient(arch, record):
    prep = _prepared(arch)
    cand = arch.candidate(dtype=arch.dtype).train()
    _backward(arch, cand, False)
    params = dict(cand.named_parameters(remove_duplicate=False))
    # (tensors that only feed declared extras, such as MTP layers, never run in the LM forward)
    shared = [k for k, disk in prep["disk_names"].items() if disk and all(training.group_of(d) == "shared" for d in disk)
              and not set(disk) <= arch.extra_disk_keys]
    record(figures={"shared_tensors": len(shared)})
    if not shared:
        arch.fail("capabilities say shared experts, but no candidate tensor converts to a shared-expert key", [])
    problems = []
    for k in shared:
        if k not in params:
            problems.append(f"{k}: not a parameter (a buffer cannot train)")
            continue
        found = _grad_problem(k, params[k])
        if found:
            problems.append(found)
    if problems:
        arch.fail("shared expert parameters get no gradient: the shared expert does not train", problems)


@conformance(applies=needs_capability("correction_bias", "no selection-only correction bias"), dtypes=ANY_DTYPE)
def test_correction_bias_gets_no_gradient(arch, record):
    prep = _prepared(arch)
    names = _bias_names(arch)
    record(figures={"bias_tensors": len(names)})
    if not names:
        arch.fail("capabilities say correction bias, but no candidate tensor converts to the reference routers' "
                    f"bias keys {sorted(prep['bias_keys'])[:2]}", [])
    cand = arch.candidate(dtype=arch.dtype).train()
    _backward(arch, cand, False)
    problems = []
    for n in names:
        t = training.candidate_tensor(cand, n)
        if t.grad is not None and t.grad.abs().max() > 0:
            problems.append(f"{n}: receives gradient (max |g| {float(t.grad.abs().max()):.3g}); it must only change "
                            "which experts are selected")
        if t.requires_grad:
            problems.append(f"{n}: is a trainable parameter (requires_grad=True): an optimizer would update it "
                            "(weight decay, gradient); it belongs in a buffer moved only by the balancing update")
    if problems:
        arch.fail("the correction bias receives gradient", problems)


def pinnable_in_low_precision(case) -> str | None:
    """bf16 gradient parity pins the reference's expert choice onto the candidate: that needs the
    router logits (gates at the pinned experts) and a routing the probes can force."""
    if case.dtype == torch.float32:
        return None
    return needs_routing_field("logits")(case) or needs_forcing(case)


def pinned_backward(arch, ref, cand, batch) -> tuple[float, float, list[int]]:
    """Reference, then candidate, forward+backward of the LM loss; the candidate routes each token
    the reference routed differently (as a set) to the reference's experts, with gates from its
    own router logits there (``replay.replay_routing``); every other token keeps the candidate's
    own decision and gates. Returns both losses and the tokens pinned per MoE layer."""
    tap = training.routing_tap(arch, ref, "ref")
    ref_loss = training.lm_backward(ref, batch, True, tap)
    B, S = batch.labels.shape
    routes = [idx.reshape(B, S, -1) for idx in tap.indices]
    pinned: list[int] = []
    with replay.replay_routing(arch, cand, routes, only_differing=True, replayed=pinned):
        cand_loss = training.lm_backward(cand, batch, False)
    return ref_loss, cand_loss, pinned


@conformance(applies=pinnable_in_low_precision, dtypes=ANY_DTYPE)
def test_gradient_parity(arch, record):
    """fp32: both models route on their own. bf16: rounding flips a few tokens' experts (each
    moving its whole gradient: up to 0.78 relative unpinned), so the tokens the candidate routes
    differently from the reference are pinned to the reference's experts first."""
    prep = _prepared(arch)
    dtype = str(arch.dtype).removeprefix("torch.")
    profile = tolerances.profile("router_grad", dtype, arch.spec.tolerances)
    ref, cand = arch.reference(dtype=arch.dtype).train(), arch.candidate(dtype=arch.dtype).train()
    extra = {}
    if arch.dtype == torch.float32:
        ref_loss = training.lm_backward(ref, prep["batch"], True)
        cand_loss = training.lm_backward(cand, prep["batch"], False)
    else:
        ref_loss, cand_loss, pinned = pinned_backward(arch, ref, cand, prep["batch"])
        extra = {"tokens_pinned": sum(pinned), "tokens_pinned_per_layer": pinned}
    result = training.grad_parity(training.reference_disk_grads(arch, ref), training.candidate_disk_grads(arch, cand))
    gates = {k: v for k, v in profile.thresholds().items() if k.startswith("grad_rel_delta.")}
    record(figures={"lm_loss_delta": abs(ref_loss - cand_loss), **result.figures, **extra},
           thresholds={k: v for k, v in gates.items() if k in result.figures})
    problems = list(result.problems)
    for v in profile.violations(result.figures):
        group = v.split(" ", 1)[0].removeprefix("grad_rel_delta.")
        key, rel = result.worst[group]
        problems.append(f"{v}: worst tensor {key}")
    if problems:
        arch.fail("candidate gradients (converted to the on-disk naming) differ from the reference's", problems)


# ---- load balancing


def _router_logits(arch):
    """Candidate and reference router logits on a right-padded batch, and the reference's own
    aux loss where the architecture defines one."""
    prep = _prepared(arch)
    tok = tokenizer.load()
    batch = arch.clear_of_ties(lambda a: data.collate(tok, data.texts(BATCH_SIZE, arch.case_seed + 1 + 7919 * a)).to(arch.device))
    assert not batch.valid.all(), "the balancing batch must contain padding"
    # in the case's dtype: fp32 in the suite; benchmarks/training_noise_floor.py measures bf16 with it
    ref, cand = arch.reference(dtype=arch.dtype), arch.candidate(dtype=arch.dtype)
    ref_tap, cand_tap = training.routing_tap(arch, ref, "ref"), training.routing_tap(arch, cand, "cand")
    with torch.no_grad(), ref_tap(), cand_tap():
        out = ref(**batch.kwargs, use_cache=False, output_router_logits=arch.spec.capabilities.aux_loss)
        cand(**batch.kwargs)
    ref_aux = getattr(out, "aux_loss", None) if arch.spec.capabilities.aux_loss else None
    return batch, ref_tap.logits, cand_tap.logits, ref_aux


def _valid_rows(router_logits, valid: torch.Tensor | None, dtype: torch.dtype) -> list[torch.Tensor]:
    keep = valid.reshape(-1).bool().cpu() if valid is not None else slice(None)
    return [l.detach().cpu().to(dtype)[keep] for l in router_logits]


def formula_aux_loss(router_logits, top_k: int, valid: torch.Tensor | None, dtype: torch.dtype = torch.float64) -> float:
    """The Switch/Mixtral load-balancing loss, independently: fp64 (or ``dtype``), by counting."""
    rows = _valid_rows(router_logits, valid, dtype)
    E = rows[0].shape[-1]
    counts = torch.zeros(E, dtype=torch.float64)
    prob_sum = torch.zeros(E, dtype=torch.float64)
    n = 0
    for r in rows:
        p = r.softmax(-1)
        for row in p.topk(top_k, dim=-1).indices:
            for e in row.tolist():
                counts[e] += 1
        prob_sum += p.sum(0).double()
        n += r.shape[0]
    return float(E * ((counts / n) * (prob_sum / n)).sum())


def formula_z_loss(router_logits, valid: torch.Tensor | None, dtype: torch.dtype = torch.float64) -> float:
    rows = torch.cat(_valid_rows(router_logits, valid, dtype))
    return float(rows.logsumexp(-1).pow(2).mean())


def _looks_like_probabilities(cand_logits, ref_logits) -> str | None:
    c, r = torch.cat(cand_logits).double(), torch.cat(ref_logits).double()
    for name, fn in (("softmax", lambda x: x.softmax(-1)), ("sigmoid", torch.sigmoid)):
        if c.shape == r.shape and (c - fn(r)).abs().max() < 1e-4:
            return name
    return None


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30) if math.isfinite(a) else math.inf


def _low_precision_hint(arch, loss, want: float, low: float, what: str) -> list[str]:
    """A loss that comes back in a low-precision dtype, or lands near the definition computed in
    the logits' dtype (bf16 rounding: ~5e-4 relative) rather than fp64's, was computed there."""
    fix = "upcast the router logits to fp32 first"
    if isinstance(loss, torch.Tensor) and loss.dtype in (torch.bfloat16, torch.float16):
        return [f"the {what} comes back as {loss.dtype}: it is computed in the router logits' dtype; {fix}"]
    off, near = _rel(float(loss), want), _rel(float(loss), low)
    if not near < 0.25 * off:
        return []
    return [f"it is {near:.2g} off the {what} computed in {arch.dtype} but {off:.2g} off it in fp64: the {what} "
            f"runs in the router logits' dtype; {fix}"]


def _loss_profile(arch):
    return tolerances.profile("router_grad", str(arch.dtype).removeprefix("torch."), arch.spec.tolerances).thresholds()


@conformance(requires=("forward", "converter", "state", "deterministic", "routing"), applies=needs_routing_field("logits"),
             dtypes=ANY_DTYPE)
def test_aux_loss(arch, record):
    """The team's aux loss against the fp64 formula on the candidate's own router logits (its
    definition: padding, softmax, counting), the formula on the candidate's logits against the
    formula on the reference's (the logits it sees are the right ones), and the team's value
    against the reference model's own aux loss where the architecture defines one."""
    batch, ref_logits, cand_logits, ref_aux = _router_logits(arch)
    hooks = training.hooks_for(arch.spec)
    k = arch.model_config.num_experts_per_tok
    gates = _loss_profile(arch)
    team_aux = hooks.aux_loss(cand_logits, k, batch.attention_mask)
    cand_aux = float(team_aux)
    want = formula_aux_loss(cand_logits, k, batch.valid)
    on_reference = formula_aux_loss(ref_logits, k, batch.valid)
    with_padding = formula_aux_loss(cand_logits, k, None)
    figures = {"aux_candidate": cand_aux, "aux_formula": want, "aux_formula_reference_logits": on_reference,
               "aux_formula_with_padding": with_padding, "aux_rel_delta": _rel(cand_aux, want),
               "aux_logits_rel_delta": _rel(want, on_reference)}
    if ref_aux is not None:
        figures["aux_reference"] = float(ref_aux)
        figures["aux_reference_rel_delta"] = _rel(cand_aux, float(ref_aux))
        figures["formula_vs_reference_rel_delta"] = _rel(on_reference, float(ref_aux))
    limits = {n: gates["aux_rel_delta" if n == "aux_rel_delta" else "aux_logits_rel_delta"]
              for n in figures if n.endswith("rel_delta")}
    record(figures=figures, thresholds=limits)
    problems = [f"{n} = {figures[n]:.3g} (gate: <= {g:.3g})" for n, g in limits.items() if not figures[n] <= g]
    if problems:
        gate = limits["aux_rel_delta"]
        hints = []
        probs = _looks_like_probabilities(cand_logits, ref_logits)
        if probs:
            hints.append(f"the candidate's router_logits equal {probs}(reference router logits): the router returns "
                         "probabilities, so the aux loss takes softmax of softmax")
        if _rel(cand_aux, 2 * want) <= gate:
            hints.append(f"it equals twice the formula ({2 * want:.6g}): the aux loss is counted twice (added to a loss "
                         "that already holds it)")
        if _rel(cand_aux, with_padding) <= gate < _rel(cand_aux, want):
            hints.append(f"the candidate's aux loss equals the formula over all {batch.valid.numel()} rows "
                         f"({with_padding:.6g}), not over the {int(batch.valid.sum())} real tokens: it counts padding tokens")
        if arch.dtype != torch.float32:
            hints += _low_precision_hint(arch, team_aux, want, formula_aux_loss(cand_logits, k, batch.valid, arch.dtype),
                                         "aux loss")
        arch.fail(f"aux loss: candidate {cand_aux:.6g}, formula {want:.6g}"
                    + (f", reference {float(ref_aux):.6g}" if ref_aux is not None else ""), problems + hints)


@conformance(requires=("forward", "converter", "state", "deterministic", "routing"), applies=needs_routing_field("logits"),
             dtypes=ANY_DTYPE)
def test_z_loss(arch, record):
    """The team's z-loss against its definition on the candidate's own router logits, and that
    definition on the candidate's logits against the reference's."""
    batch, ref_logits, cand_logits, _ = _router_logits(arch)
    hooks = training.hooks_for(arch.spec)
    gates = _loss_profile(arch)
    gate = gates["z_rel_delta"]
    team_z = hooks.z_loss(cand_logits, batch.attention_mask)
    cand_z = float(team_z)
    want = formula_z_loss(cand_logits, batch.valid)
    on_reference = formula_z_loss(ref_logits, batch.valid)
    figures = {"z_candidate": cand_z, "z_formula": want, "z_formula_reference_logits": on_reference,
               "z_rel_delta": _rel(cand_z, want), "z_logits_rel_delta": _rel(want, on_reference)}
    limits = {"z_rel_delta": gate, "z_logits_rel_delta": gates["z_logits_rel_delta"]}
    record(figures=figures, thresholds=limits)
    problems = [f"{n} = {figures[n]:.3g} (gate: <= {g:.3g})" for n, g in limits.items() if not figures[n] <= g]
    if problems:
        rows = torch.cat([l.double()[batch.valid.reshape(-1)] for l in cand_logits])
        lse = rows.logsumexp(-1)
        known = {
            "mean(logsumexp)^2 (squared after averaging)": float(lse.mean() ** 2),
            "mean(logsumexp) (not squared)": float(lse.mean()),
            "mean(logits^2) (no logsumexp)": float(rows.pow(2).mean()),
            "padding rows included": formula_z_loss(cand_logits, None),
        }
        hints = [f"it equals {name}" for name, v in known.items() if _rel(cand_z, v) <= gate]
        if arch.dtype != torch.float32:
            hints += _low_precision_hint(arch, team_z, want, formula_z_loss(cand_logits, batch.valid, arch.dtype), "z-loss")
        probs = _looks_like_probabilities(cand_logits, ref_logits)
        if probs:
            hints.append(f"the candidate's router_logits equal {probs}(reference router logits): probabilities, not logits")
        arch.fail(f"z-loss {cand_z:.6g} does not match its definition mean(logsumexp(router_logits)^2) = {want:.6g}",
                  problems + hints)


BALANCE_STEPS = 12
BALANCE_RATE = 0.05
SKEW = 0.3
# under bf16 (production-scale weights) the router's scores lie ~10x closer together than in the
# fp32 profile's adversarial init, and a sign update of a fixed 0.05 overshoots every step: the
# load jumps between expert sets and never settles. There the rate is a quarter of the scores'
# spread (median per-token std, narrowest layer), the skew six rates, over 24 updates.
BF16_RATE_PER_SPREAD = 0.25
SKEW_PER_RATE = 6.0
BF16_BALANCE_STEPS = 24


def score_spread(arch, model) -> float:
    """The narrowest MoE layer's median per-token std of the router scores (the architecture's
    scoring of the router logits), on the check's batch."""
    from moe_conformance import routing

    caps = arch.spec.capabilities
    oracle = routing.from_config(arch.model_config, caps.router_scoring, caps.correction_bias)
    tap = training.routing_tap(arch, model, "cand")
    with torch.no_grad(), tap():
        training.run_model(model, _prepared(arch)["batch"], False)
    return min(float(oracle.scores(l.detach().float()).std(-1).median()) for l in tap.logits)


def _balancing_applies(case) -> str | None:
    why = needs_capability("correction_bias", "no selection-only bias, so no aux-loss-free balancing")(case)
    if why or case.dtype == torch.float32:
        return why
    return needs_routing_field("logits")(case)


@conformance(requires=("forward", "converter", "state", "deterministic", "routing"), applies=_balancing_applies,
             dtypes=ANY_DTYPE)
def test_aux_loss_free_balancing(arch, record):
    """Skew the selection bias toward top_k experts, then apply the bias update after each
    forward+backward: load imbalance must fall, and the bias must never receive gradient. fp32:
    rate 0.05, skew 0.3, 12 updates; bf16: both scaled to the router scores' spread
    (``score_spread``), 24 updates."""
    if not arch.spec.capabilities.correction_bias:
        pytest.skip(f"{arch.id}: no selection-only bias, so no aux-loss-free balancing")
    prep = _prepared(arch)
    hooks = training.hooks_for(arch.spec)
    E, k = arch.num_experts, arch.model_config.num_experts_per_tok
    profile = tolerances.profile("router_grad", str(arch.dtype).removeprefix("torch."), arch.spec.tolerances)
    cand = arch.candidate(dtype=arch.dtype).train()
    rate, skew, steps, spread = BALANCE_RATE, SKEW, BALANCE_STEPS, None
    if arch.dtype != torch.float32:
        spread = score_spread(arch, cand)
        rate = BF16_RATE_PER_SPREAD * spread
        skew, steps = SKEW_PER_RATE * rate, BF16_BALANCE_STEPS
    tap = training.routing_tap(arch, cand, "cand")
    found = training.selection_biases(arch, cand, "cand")
    if any(f is None for f in found):
        arch.fail("an MoE layer has no candidate tensor that converts to the reference's selection bias",
                  [f"layer {l.layer} ({l.router or l.experts})" for l, f in zip(tap.layers, found) if f is None])
    biases = [f[1] for f in found]
    names = [f[0] for f in found]
    batch = prep["batch"]
    imbalance, problems = [], []
    with training.force_route(arch, cand, "cand", list(range(k)), offset=skew):
        for step in range(steps):
            training.lm_backward(cand, batch, False, tap)
            layer_loads = [training.loads(idx, E, batch.valid) for idx in tap.indices]
            imbalance.append(training.health(layer_loads)["load_imbalance"])
            for name, b in zip(names, biases):
                if b.requires_grad or (b.grad is not None and b.grad.abs().max() > 0):
                    problems.append(f"{name} selection bias receives gradient at step {step}")
            for b, load in zip(biases, layer_loads):
                hooks.bias_update(b, load, rate)
    ratio = imbalance[-1] / imbalance[0]
    gate = profile.thresholds()["balance_ratio"]
    record(figures={"imbalance_first": imbalance[0], "imbalance_last": imbalance[-1], "balance_ratio": ratio,
                    "imbalance_per_step": imbalance, "bias_rate": rate, "skew": skew,
                    **({"score_spread": spread} if spread is not None else {})},
           thresholds={"balance_ratio": gate})
    if not ratio <= gate:
        problems.append(f"load imbalance went from {imbalance[0]:.3g} to {imbalance[-1]:.3g} over {steps} bias "
                        f"updates at rate {rate:.3g} (ratio {ratio:.3g}, gate: <= {gate:.3g}): the bias update does not "
                        "move load toward balance")
    if problems:
        arch.fail("aux-loss-free balancing", sorted(set(problems)))


@conformance(requires=("forward", "converter", "state", "deterministic", "routing"), applies=needs_routing_field("logits"),
             dtypes=ANY_DTYPE)
def test_aux_loss_gradient_flows(arch, record):
    """The team's aux loss, on the candidate's router logits, sends a gradient to every router:
    a value computed right but cut from the graph never balances anything (NeMo Automodel #1408)."""
    prep = _prepared(arch)
    hooks = training.hooks_for(arch.spec)
    cand = arch.candidate(dtype=arch.dtype).train()
    tap = training.routing_tap(arch, cand, "cand")
    cand.zero_grad(set_to_none=True)
    with tap():
        training.run_model(cand, prep["batch"], False)
    aux = hooks.aux_loss(tap.logits, arch.model_config.num_experts_per_tok, prep["batch"].attention_mask)
    problems = []
    if not isinstance(aux, torch.Tensor) or not aux.requires_grad:
        problems.append(f"the aux loss {float(aux):.6g} has no gradient (requires_grad=False): it is detached from the "
                        "router logits, so adding it to the loss changes nothing")
    else:
        aux.backward()
        bias = set(_bias_names(arch))
        for name, module in tap.modules.items():
            for n, p in module.named_parameters():
                if f"{name}.{n}" not in bias and p.dim() >= 2:
                    found = _grad_problem(f"{name}.{n}", p)
                    if found:
                        problems.append(found)
    record(figures={"aux_candidate": float(aux.detach()) if isinstance(aux, torch.Tensor) else float(aux)})
    if problems:
        arch.fail("the aux loss sends no gradient to the routers", problems)


# DeepSeek-V3 scale loads: ~40k tokens per expert, differences under the bf16 step there (256)
BIG_LOADS = (40_000.0, 40_100.0, 39_900.0, 40_180.0, 39_820.0, 40_060.0)


@conformance(requires=(), applies=needs_capability("correction_bias", "no selection-only bias, so no aux-loss-free balancing"),
             dtypes=ANY_DTYPE)
def test_bias_update_definition(arch, record):
    """The team's bias update, on a zero fp32 bias and realistic loads (~40k tokens per expert),
    moves every expert's bias by ``rate * sign(mean - load)`` and keeps it fp32: counts
    accumulated in bf16 round by 256 there and flip the update's sign (Megatron-LM #7081)."""
    hooks = training.hooks_for(arch.spec)
    E = arch.num_experts
    load = torch.tensor([BIG_LOADS[e % len(BIG_LOADS)] + 7.0 * (e // len(BIG_LOADS)) for e in range(E)], dtype=torch.float32)
    bias = torch.zeros(E, dtype=torch.float32)
    hooks.bias_update(bias, load.clone(), BALANCE_RATE)
    want = torch.zeros(E)
    training.bias_update(want, load.clone(), BALANCE_RATE)
    wrong = [e for e in range(E) if torch.sign(bias[e]) != torch.sign(want[e])]
    record(figures={"experts": E, "sign_errors": len(wrong), "bias_dtype": str(bias.dtype)})
    problems = []
    if bias.dtype != torch.float32:
        problems.append(f"the bias update changed the bias's dtype to {bias.dtype}")
    if wrong:
        problems.append(f"{len(wrong)}/{E} expert(s) moved the wrong way, e.g. expert {wrong[0]} with load "
                        f"{float(load[wrong[0]]):.0f} (mean {float(load.mean()):.1f}): got {float(bias[wrong[0]]):+.3g}, "
                        f"the definition {float(want[wrong[0]]):+.3g} (loads counted or compared in bf16 round by 256 here)")
    elif not torch.allclose(bias, want, rtol=1e-6, atol=0.0):
        problems.append(f"the update's size differs from rate * sign(mean - load): max|delta| "
                        f"{float((bias - want).abs().max()):.3g}")
    if problems:
        arch.fail("the aux-loss-free bias update does not follow its definition on realistic loads", problems)
