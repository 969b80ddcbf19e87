"""Naming the cause of a parity failure: rerun the reference under known deviations.

Localization says *where* the candidate first diverges; this says *why*, when the cause is one
of the bug classes teams ship (BUGS.md): each deviation is the reference with one thing done
the way a buggy implementation does it (an epsilon of 1e-5 instead of 1e-6, experts in bf16,
routed scaling dropped or applied twice, the YaRN softmax scale missing, the correction bias
ignored...). A deviation that makes the reference reproduce the candidate's logits is reported
with both figures: "behaves like the reference with rms_norm_eps=1e-5 (max|d| 3.2e-3 -> 5e-6)".

The deviations are built on the same reference weights and config copies as the feature
ablations (moe_conformance.features), on the failing batch only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .features import ABLATIONS, State, _map, _rope, _set

# A deviation reproduces the candidate when it brings the logits within this fraction of the
# original gap (or under the parity gate, whichever is larger).
REPRODUCES = 0.02


@dataclass(frozen=True)
class Deviation:
    name: str  # how the candidate behaves: "rms_norm_eps=1e-5"
    applies: Callable[[Any, State], bool]
    apply: Callable  # (cfg, state) -> state | (state, patch(model))


def _has(cfg, name):
    return getattr(cfg, name, None) is not None


def _has_key(suffix):
    return lambda cfg, sd: any(k.endswith(suffix) for k in sd)


def _in_bf16(suffixes: tuple[str, ...]):
    """Patch: the modules named so compute in bf16 (weights and inputs rounded), fp32 out."""
    def patch(model: torch.nn.Module) -> None:
        for name, module in list(model.named_modules()):
            if name.endswith(suffixes):
                module.to(torch.bfloat16)
                forward = module.forward

                def run(*args, forward=forward, **kwargs):
                    cast = lambda t: t.bfloat16() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
                    out = forward(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})
                    back = lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
                    return tuple(back(o) for o in out) if isinstance(out, tuple) else back(out)

                module.forward = run
    return patch


def _scale_attention(factor_of: Callable[[Any], float]):
    """Patch: every attention module's softmax scale times factor_of(config)."""
    def apply(cfg, sd):
        factor = factor_of(cfg)

        def patch(model):
            for module in model.modules():
                if hasattr(module, "scaling") and hasattr(module, "o_proj"):
                    module.scaling = module.scaling * factor
        return sd, patch
    return apply


def _yarn_mscale(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    factor, all_dim = rope.get("factor", 1.0), rope.get("mscale_all_dim") or 0.0
    return 1.0 if factor <= 1 or not all_dim else 0.1 * all_dim * math.log(factor) + 1.0


def _is_yarn(cfg, sd) -> bool:
    return (getattr(cfg, "rope_parameters", None) or {}).get("rope_type") == "yarn" and _yarn_mscale(cfg) != 1.0


def _other_eps(cfg) -> float:
    return 1e-6 if cfg.rms_norm_eps >= 1e-5 else 1e-5


def _packed_documents_mixed(cfg, sd):
    """Patch: the reference attends across packed documents (transformers with its cache on
    ignores the document boundaries that position_ids mark)."""
    def patch(model):
        forward = model.forward

        def run(*args, **kwargs):
            kwargs["use_cache"] = True
            return forward(*args, **kwargs)

        model.forward = run
    return sd, patch


CATALOG: tuple[Deviation, ...] = (
    Deviation("the correction bias ignored in expert selection", _has_key("e_score_correction_bias"),
              ABLATIONS["correction_bias"]),
    Deviation("the correction bias rounded to bf16", _has_key("e_score_correction_bias"), ABLATIONS["bias_fp32"]),
    Deviation("routed_scaling_factor dropped (1.0)", lambda cfg, sd: (getattr(cfg, "routed_scaling_factor", 1.0) or 1.0) != 1.0,
              ABLATIONS["routed_scaling"]),
    Deviation("routed_scaling_factor applied twice",
              lambda cfg, sd: (getattr(cfg, "routed_scaling_factor", 1.0) or 1.0) != 1.0,
              lambda cfg, sd: (_set(cfg, "routed_scaling_factor", cfg.routed_scaling_factor ** 2), sd)[1]),
    Deviation("norm_topk_prob flipped", lambda cfg, sd: _has(cfg, "norm_topk_prob"), ABLATIONS["norm_topk_prob"]),
    Deviation("group-limited routing bypassed (every group kept)",
              lambda cfg, sd: (getattr(cfg, "n_group", 1) or 1) > 1 and cfg.topk_group < cfg.n_group,
              ABLATIONS["group_limit"]),
    Deviation("shared experts dropped", _has_key("shared_experts.down_proj.weight"), ABLATIONS["shared_experts"]),
    Deviation("RoPE over the whole head (partial_rotary_factor ignored)",
              lambda cfg, sd: (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0) != 1.0,
              ABLATIONS["partial_rotary"]),
    Deviation("RoPE interleave flipped", lambda cfg, sd: _has(cfg, "rope_interleave"), ABLATIONS["rope_interleave"]),
    Deviation("YaRN mscale_all_dim ignored in the softmax scale", _is_yarn,
              _scale_attention(lambda cfg: 1.0 / _yarn_mscale(cfg) ** 2)),
    Deviation("YaRN mscale applied once instead of squared in the softmax scale", _is_yarn,
              _scale_attention(lambda cfg: 1.0 / _yarn_mscale(cfg))),
    Deviation("qk-norm skipped", _has_key("self_attn.q_norm.weight"), ABLATIONS["qk_norm"]),
    Deviation("attention sinks dropped", _has_key("self_attn.sinks"), ABLATIONS["sinks"]),
    Deviation("the sliding window ignored", lambda cfg, sd: _has(cfg, "sliding_window"), ABLATIONS["sliding_window"]),
    Deviation("the shared-expert gate dropped", _has_key("shared_expert_gate.weight"), ABLATIONS["shared_expert_gate"]),
    Deviation("the SwiGLU clamp removed", lambda cfg, sd: _has(cfg, "swiglu_limit"), ABLATIONS["swiglu_clamp"]),
    Deviation("q/k/v biases dropped", _has_key("q_proj.bias"), ABLATIONS["attention_bias"]),
    Deviation("rms_norm_eps={other}", lambda cfg, sd: _has(cfg, "rms_norm_eps"),
              lambda cfg, sd: (_set(cfg, "rms_norm_eps", _other_eps(cfg)), sd)[1]),
    Deviation("experts computed in bf16", lambda cfg, sd: True,
              lambda cfg, sd: (sd, _in_bf16(("mlp.experts",)))),
    Deviation("the router computed in bf16", lambda cfg, sd: True,
              lambda cfg, sd: (sd, _in_bf16(("mlp.gate", "mlp.router")))),
    Deviation("packed documents attending across their boundaries", lambda cfg, sd: True, _packed_documents_mixed),
    Deviation("RoPE theta ignored (10000)",
              lambda cfg, sd: (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0) != 10000.0,
              lambda cfg, sd: (_rope(cfg, rope_theta=10000.0), sd)[1]),
)


def _deviated(case, deviation: Deviation):
    config = copy.deepcopy(case.config)
    model_cfg = case.spec.model_config(config)
    state = dict(case.reference_state)
    if not deviation.applies(model_cfg, state):
        return None, None
    name = deviation.name.format(other=f"{_other_eps(model_cfg):g}") if "{other}" in deviation.name else deviation.name
    result = deviation.apply(model_cfg, state)
    state, patch = result if isinstance(result, tuple) else (result, None)
    model = case.reference(config=config, state=state, strict=False)
    if patch:
        patch(model)
    return name, model


def name_causes(case, batch, cand_logits: torch.Tensor, gate: float) -> list[tuple[str, float, float]]:
    """(deviation, max|d| of the reference to the candidate, max|d| of the deviated reference
    to the candidate) for every deviation that reproduces the candidate, best first."""
    from .compare import run_reference

    valid = batch.valid
    cand = cand_logits.double()[valid]
    with torch.no_grad():
        base = float((run_reference(case.reference(), batch).double()[valid] - cand).abs().max())
    hits = []
    for deviation in CATALOG:
        try:
            name, model = _deviated(case, deviation)
            if model is None:
                continue
            with torch.no_grad():
                d = float((run_reference(model, batch).double()[valid] - cand).abs().max())
        except (LookupError, AttributeError, TypeError, ValueError, RuntimeError):
            continue  # this reference cannot take the deviation: not a candidate cause
        if d <= max(REPRODUCES * base, gate):
            hits.append((name, base, d))
    return sorted(hits, key=lambda h: h[2])


def describe(hits: list[tuple[str, float, float]]) -> str:
    if not hits:
        return ("cause: none of the known deviations reproduces the candidate "
                f"({len(CATALOG)} tried: moe_conformance.diagnosis.CATALOG)")
    best = hits[0]
    line = f"cause: the candidate behaves like the reference with {best[0]} (max|d| {best[1]:.3g} -> {best[2]:.3g})"
    if len(hits) > 1:
        line += "; also reproduced by " + ", ".join(f"{h[0]} ({h[2]:.3g})" for h in hits[1:3])
    return line
