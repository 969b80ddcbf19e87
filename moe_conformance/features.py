"""Proofs that a tiny config exercises what it claims.

Each feature a variant claims (spec.FEATURES) has an *ablation*: the same reference weights
with that feature switched off or made wrong the way a bug would (bias dropped, bias rounded
to bf16, interleave flipped...). The tiny_config suite requires every ablation to move the
reference's logits by at least ``LIVENESS_FACTOR`` times the logit-parity gate: a planted bug
on that feature is then guaranteed to be visible, not hidden by an inert config.

Also here: routing statistics on the test inputs (expert loads, top-k margins), read from the
reference's routers through their ``(router_logits, topk_weights, topk_indices)`` outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

LIVENESS_FACTOR = 10.0

State = dict[str, torch.Tensor]
# An ablation mutates the (copied) model config and returns the weights to load, or the weights
# and a function applied to the built model (for what no config field switches off).
Ablation = Callable[[Any, State], State | tuple[State, Callable[[torch.nn.Module], None]]]


def _suffix(state: State, suffix: str) -> list[str]:
    return [k for k in state if k.endswith(suffix)]


def _map(state: State, suffix: str | tuple[str, ...], fn) -> State:
    keys = _suffix(state, suffix)
    if not keys:
        raise LookupError(f"no weight ending in {suffix!r} to ablate")
    return {k: (fn(v) if k in keys else v) for k, v in state.items()}


def _set(cfg, name, value):
    setattr(cfg, name, value)


def _rope(cfg, **changes):
    cfg.rope_parameters = {**cfg.rope_parameters, **changes}


ABLATIONS: dict[str, Ablation] = {
    "correction_bias": lambda cfg, sd: _map(sd, "e_score_correction_bias", torch.zeros_like),
    "bias_fp32": lambda cfg, sd: _map(sd, "e_score_correction_bias", lambda b: b.bfloat16().float()),
    "routed_scaling": lambda cfg, sd: (_set(cfg, "routed_scaling_factor", 1.0), sd)[1],
    "norm_topk_prob": lambda cfg, sd: (_set(cfg, "norm_topk_prob", not cfg.norm_topk_prob), sd)[1],
    "group_limit": lambda cfg, sd: (_set(cfg, "topk_group", cfg.n_group), sd)[1],
    "shared_experts": lambda cfg, sd: _map(sd, ("shared_experts.down_proj.weight", "shared_expert.down_proj.weight"),
                                           torch.zeros_like),
    "partial_rotary": lambda cfg, sd: (_rope(cfg, partial_rotary_factor=1.0), sd)[1],
    "rope_interleave": lambda cfg, sd: (_set(cfg, "rope_interleave", not cfg.rope_interleave), sd)[1],
    "yarn_mscale": lambda cfg, sd: (_rope(cfg, mscale_all_dim=0.0), sd)[1],
    "qk_norm": lambda cfg, sd: (sd, _replace_modules(("self_attn.q_norm", "self_attn.k_norm"), torch.nn.Identity)),
    "sinks": lambda cfg, sd: _map(sd, "self_attn.sinks", lambda s: torch.full_like(s, -1e9)),
    "sliding_window": lambda cfg, sd: (_set(cfg, "sliding_window", 10_000), sd)[1],
    "shared_expert_gate": lambda cfg, sd: _map(sd, "shared_expert_gate.weight", torch.zeros_like),
    "swiglu_clamp": lambda cfg, sd: (_set(cfg, "swiglu_limit", 1e6), sd)[1],
    "attention_bias": lambda cfg, sd: {k: (torch.zeros_like(v) if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) else v) for k, v in sd.items()},
    "norm_eps": lambda cfg, sd: (_set(cfg, "rms_norm_eps", 1e-6 if cfg.rms_norm_eps >= 1e-5 else 1e-5), sd)[1],
}


def _replace_modules(suffixes: tuple[str, ...], factory):
    def patch(model: torch.nn.Module) -> None:
        for name, _ in list(model.named_modules()):
            if name.endswith(suffixes):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, factory())
    return patch


def ablated_reference(case, feature: str):
    """The case's reference with one feature ablated (weights and config copied)."""
    if feature not in ABLATIONS:
        raise KeyError(f"no ablation for feature {feature!r}; add one to moe_conformance.features.ABLATIONS")
    config = copy.deepcopy(case.config)
    result = ABLATIONS[feature](case.spec.model_config(config), dict(case.reference_state))
    state, patch = result if isinstance(result, tuple) else (result, None)
    model = case.reference(config=config, state=state, strict=False)
    if patch:
        patch(model)
    return model


# --------------------------------------------------------------------------------------------
# Routing statistics on the reference


def router_outputs(model, batch, router_names: list[str]) -> dict[str, tuple]:
    from .compare import run_reference

    modules = dict(model.named_modules())
    store, handles = {}, []
    for name in router_names:
        if name in modules:
            handles.append(modules[name].register_forward_hook(lambda m, a, o, name=name: store.__setitem__(name, o)))
    try:
        with torch.no_grad():
            run_reference(model, batch)
    finally:
        for h in handles:
            h.remove()
    return store


def choice_margins(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
                   scoring: str) -> dict[str, torch.Tensor]:
    """Per token: the gap between the k-th and (k+1)-th expert choice score, and (grouped
    routing) between the last kept and the first dropped group score. A gap near float noise
    means a routing decision another CPU could take differently."""
    # softmax routers select the top-k of the logits (softmax is monotonic): measure there, where
    # a gap is not squashed by the normalization
    scores = logits.float().sigmoid() if scoring == "sigmoid" else logits.float()
    choice = scores + bias if bias is not None else scores
    out = {}
    if n_group > 1:
        groups = choice.view(choice.shape[0], n_group, -1)
        group_scores = groups.topk(2, dim=-1).values.sum(-1).sort(-1, descending=True).values
        out["group_margin"] = group_scores[:, topk_group - 1] - group_scores[:, topk_group]
        kept = groups.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
        mask = torch.zeros(choice.shape[0], n_group, dtype=torch.bool, device=choice.device).scatter_(1, kept, True)
        choice = choice.masked_fill(~mask.repeat_interleave(choice.shape[1] // n_group, 1), float("-inf"))
    ranked = choice.sort(-1, descending=True).values
    out["topk_margin"] = ranked[:, top_k - 1] - ranked[:, top_k]
    return out
