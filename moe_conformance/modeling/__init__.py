"""The native candidate: a compact MoE transformer built from shared blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import MoEConfig, YarnParams, from_hf
from .moe_transformer import CausalLMOutput, KVCache, MoETransformer


def native_candidate(*, attention: str, router_scoring: str, sub_config: str | None = None,
                     **overrides: Any) -> Callable[[Any], MoETransformer]:
    """A candidate factory for an arch plugin: transformers config -> MoETransformer.
    ``sub_config`` names the attribute holding the language model's config (kimi_k25:
    ``text_config``)."""

    def build(config: Any) -> MoETransformer:
        hf = getattr(config, sub_config) if sub_config else config
        return MoETransformer(from_hf(hf, attention=attention, router_scoring=router_scoring, **overrides))

    build.describes = f"moe_conformance.modeling.MoETransformer ({attention}, {router_scoring} router)"
    build.options = dict(attention=attention, router_scoring=router_scoring, sub_config=sub_config, **overrides)
    return build


__all__ = ["CausalLMOutput", "KVCache", "MoEConfig", "MoETransformer", "YarnParams", "from_hf", "native_candidate"]
