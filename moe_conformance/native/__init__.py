"""The native candidate: the project's own compact MoE training implementation, one team
among many.

Built-in arch plugins reach it only through the candidate contract (moe_conformance.contract),
exactly as an outside team's plugin reaches its own code: a candidate factory, a converter
declared with the library's rules, probes and an incremental-decoding declaration. The
conformance machinery (suites, library modules) never imports this package.

``native(...)`` gives those four fields at once, so a plugin writes
``ArchSpec(..., **native(attention="mla", router_scoring="sigmoid"))``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moe_conformance.contract import Decoding, Probes

from .config import MoEConfig, YarnParams, from_hf
from .converter import native_converter, native_pairs
from .expert_parallel import EXPERT_PARALLEL
from .model import CausalLMOutput, KVCache, MoETransformer

# The native model continues a KVCache passed as `cache=` (attention_mask covering past + new).
DECODING = Decoding(new_cache=lambda model: KVCache(), keyword="cache")


def native_candidate(*, attention: str, router_scoring: str, sub_config: str | None = None,
                     **overrides: Any) -> Callable[[Any], MoETransformer]:
    """A candidate factory for an arch plugin: transformers config -> MoETransformer.
    ``sub_config`` names the attribute holding the language model's config (kimi_k25:
    ``text_config``)."""

    def build(config: Any) -> MoETransformer:
        hf = getattr(config, sub_config) if sub_config else config
        return MoETransformer(from_hf(hf, attention=attention, router_scoring=router_scoring, **overrides))

    build.describes = f"moe_conformance.native.MoETransformer ({attention}, {router_scoring} router)"
    build.options = dict(attention=attention, router_scoring=router_scoring, sub_config=sub_config, **overrides)
    return build


_LAYOUT = ("moe", "router", "experts", "correction_bias_at", "shared", "shared_gate", "disk_prefix", "qk_norm_names")


def native(*, attention: str, router_scoring: str, sub_config: str | None = None, **options: Any) -> dict[str, Any]:
    """The ArchSpec fields of the native candidate: ``candidate``, ``converter``, ``probes``,
    ``decoding`` and ``expert_parallel``. ``options`` are on-disk layout options of the converter (moe, router,
    experts, correction_bias_at, shared, shared_gate, disk_prefix, qk_norm_names) or config
    overrides of the model (e.g. norm_topk_prob=True; ``mtp=True``: hold the config's MTP layers)."""
    layout = {k: v for k, v in options.items() if k in _LAYOUT}
    overrides = {k: v for k, v in options.items() if k not in _LAYOUT}
    pair_options = {k: layout[k] for k in ("router", "shared", "qk_norm_names") if k in layout}
    return dict(
        candidate=native_candidate(attention=attention, router_scoring=router_scoring, sub_config=sub_config,
                                   **overrides),
        converter=native_converter(attention, **layout),
        probes=Probes(pairs=tuple(native_pairs(attention, **pair_options))),
        decoding=DECODING,
        expert_parallel=EXPERT_PARALLEL,
    )


__all__ = ["DECODING", "CausalLMOutput", "KVCache", "MoEConfig", "MoETransformer", "YarnParams", "from_hf", "native",
           "native_candidate", "native_converter", "native_pairs"]
