"""Dense-to-MoE upcycling (F19), checked by the ``upcycling`` family.

A dense checkpoint becomes an MoE one: every routed expert a copy of the dense MLP of its
layer, the router fresh, shared experts silent (down projection zero), the selection bias zero.
At init the MoE forward then equals the dense forward exactly when the weights of the chosen
experts sum to one (top-k renormalized, no routed scaling): each token gets ``sum_k w_k MLP(x)``.

An arch declares it with ``ArchSpec(upcycling=Upcycling(moe=..., dense=..., upcycle=...))``:

- ``moe(config) -> config``: the MoE config to upcycle into (the variant's, with what an
  upcycle needs: dense layers as wide as the experts, say);
- ``dense(moe_config) -> model``: the dense parent, a transformers model whose MoE-layer MLPs
  are as wide as the experts (Qwen3-MoE with ``mlp_only_layers`` everywhere, Mistral for Mixtral);
- ``upcycle(dense_checkpoint, moe_config, template) -> (moe_checkpoint, moe_config)``: the team's
  upcycling code on on-disk checkpoints (``template``: the MoE checkpoint's key -> tensor of the
  right shape and dtype); :func:`upcycle` is the project's definition.

Bugs this exists for: a copied expert transposed (or reshaped from a transpose) into place, and
the routed scaling factor left on (the MoE output is the dense output times the factor).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# on-disk expert projection names -> the dense MLP's
PROJECTIONS = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
               "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT = re.compile(r"^(?P<head>.*\blayers\.(?P<i>\d+)\.)(?P<block>\w+)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
ROUTER_STD = 0.02


def dense_source(key: str) -> str | None:
    """The dense MLP key a routed expert's on-disk key copies (None: not a routed expert)."""
    m = _EXPERT.match(key)
    if not m or m.group("proj") not in PROJECTIONS:
        return None
    return f"{m.group('head')}mlp.{PROJECTIONS[m.group('proj')]}.weight"


def with_fields(config: Any, **changes: Any) -> Any:
    """A copy of a transformers config with fields changed (those it has: others ignored)."""
    out = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(out, name, value)
    return out


def upcycle(dense: dict[str, torch.Tensor], moe_config: Any, template: dict[str, torch.Tensor],
            seed: int = 0) -> tuple[dict[str, torch.Tensor], Any]:
    """The project's upcycling: experts copied from the dense MLP of their layer, the router
    drawn fresh (normal, std 0.02), shared experts' down projections and shared-expert gates
    zero (silent at init), selection biases zero; everything else copied. The config keeps
    the chosen experts' weights summing to one: top-k renormalized, routed scaling 1."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, like in template.items():
        source = dense_source(key)
        if source is not None:
            out[key] = dense[source].clone()
        elif key in dense:
            out[key] = dense[key].clone()
        elif key.endswith("e_score_correction_bias") or "shared_expert_gate" in key or (
                "shared_expert" in key and "down_proj" in key):
            out[key] = torch.zeros_like(like)
        elif "shared_expert" in key:
            out[key] = (torch.randn(like.shape, generator=gen) * like.shape[-1] ** -0.5).to(like)
        elif re.search(r"\.(gate|router)\.weight$", key):
            out[key] = (torch.randn(like.shape, generator=gen) * ROUTER_STD).to(like)
        else:
            raise KeyError(f"upcycle: no dense source for the MoE checkpoint key {key}")
    config = with_fields(moe_config, **{name: value for name, value in (("routed_scaling_factor", 1.0),
                                                                         ("norm_topk_prob", True))
                                        if hasattr(moe_config, name)})
    return out, config


@dataclass(frozen=True)
class Upcycling:
    """The arch's upcycling declaration and the team's upcycle function."""

    dense: Callable[[Any], Any]  # moe config -> dense parent model (transformers)
    moe: Callable[[Any], Any] = lambda config: config  # variant config -> the MoE config to upcycle into
    upcycle: Callable[..., tuple[dict, Any]] = upcycle


def dense_parent(model_class: Callable[[Any], Any], **changes: Any) -> Callable[[Any], Any]:
    """``Upcycling(dense=...)`` for a dense parent of the same transformers class (or a
    key-compatible one) with config fields changed; a change given as a callable gets the MoE
    config (``mlp_only_layers=lambda c: list(range(c.num_hidden_layers))``)."""

    def build(moe_config: Any) -> Any:
        values = {k: (v(moe_config) if callable(v) else v) for k, v in changes.items()}
        return model_class(with_fields(moe_config, **values))

    build.describes = f"{getattr(model_class, '__name__', model_class)} with {sorted(changes)} changed"
    return build
