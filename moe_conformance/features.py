"""Proofs that a tiny config exercises what it claims.

Each feature a variant claims (spec.FEATURES) has an *ablation*: the same reference weights
with that feature switched off or made wrong the way a bug would (bias dropped, bias rounded
to bf16, interleave flipped...). The tiny_config suite requires every ablation to move the
reference's logits by at least ``LIVENESS_FACTOR`` times the logit-parity gate: a planted bug
on that feature is then guaranteed to be visible, not hidden by an inert config.

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
    "shared_experts": lambda cfg, sd: _map(sd, ("shared_experts.down_proj.weight", "shared_expert.down_proj.weight",
                                                "shared_mlp.down_proj.weight"), torch.zeros_like),
    "partial_rotary": lambda cfg, sd: (_rope(cfg, partial_rotary_factor=1.0), sd)[1],
    "rope_interleave": lambda cfg, sd: (_set(cfg, "rope_interleave", not cfg.rope_interleave), sd)[1],
    "yarn_mscale": lambda cfg, sd: (_rope(cfg, mscale_all_dim=0.0), sd)[1],
    "qk_norm": lambda cfg, sd: (sd, _replace_modules(("self_attn.q_norm", "self_attn.k_norm", "self_attn.query_layernorm",
                                                       "self_attn.key_layernorm", "self_attn.qk_norm"), torch.nn.Identity)),
    "rope_ntk_alpha": lambda cfg, sd: (_rope(cfg, alpha=None), sd)[1],
    "chunked_attention": lambda cfg, sd: (_set(cfg, "attention_chunk_size", 10_000), sd)[1],
    "attn_temperature": lambda cfg, sd: (_set(cfg, "attn_temperature_tuning", False), sd)[1],
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
