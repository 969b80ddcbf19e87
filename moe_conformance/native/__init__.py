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

import torch

from moe_conformance.contract import Decoding, ExpertsProbe, Probes

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


def call_each_weighted(experts, x, indices, weights):
    """The weighted sum of each chosen expert run at weight 1 (experts that scale their input)."""
    return sum(weights[:, k:k + 1].to(x.dtype) * experts(x, indices[:, k:k + 1], torch.ones_like(weights[:, k:k + 1]))
               for k in range(indices.shape[-1]))


_LAYOUT = ("moe", "router", "experts", "correction_bias_at", "shared", "shared_gate", "disk_prefix", "qk_norm_names",
           "dense", "experts_pair")


def native(*, attention: str, router_scoring: str, sub_config: str | None = None, **options: Any) -> dict[str, Any]:
    """The ArchSpec fields of the native candidate: ``candidate``, ``converter``, ``probes``,
    ``decoding`` and ``expert_parallel``. ``options`` are on-disk layout options of the converter (moe, router,
    experts, correction_bias_at, shared, shared_gate, disk_prefix, qk_norm_names) or config
    overrides of the model (e.g. norm_topk_prob=True; ``mtp=True``: hold the config's MTP layers)."""
    layout = {k: v for k, v in options.items() if k in _LAYOUT}
    overrides = {k: v for k, v in options.items() if k not in _LAYOUT}
    pair_options = {k: layout[k] for k in ("router", "shared", "qk_norm_names", "experts_pair") if k in layout}
    if layout.get("moe") == layout.get("dense") == "feed_forward":  # Llama 4: the block is feed_forward in memory too
        pair_options["block"] = "feed_forward"
    no_experts_pair = layout.pop("experts_pair", True) is False
    experts_probe = {"experts": None} if no_experts_pair else {}
    if overrides.get("experts_scale_input"):
        # the weight scales the expert's input: probed one chosen expert at a time (weight 1),
        # weighted after, as the suites compare experts; no expert-parallel path for it
        experts_probe = {"experts": ExpertsProbe(call=call_each_weighted)}
    return dict(
        candidate=native_candidate(attention=attention, router_scoring=router_scoring, sub_config=sub_config,
                                   **overrides),
        converter=native_converter(attention, **layout),
        probes=Probes(pairs=tuple(native_pairs(attention, **pair_options)), **experts_probe),
        decoding=DECODING,
        expert_parallel=None if overrides.get("experts_scale_input") else EXPERT_PARALLEL,
    )


__all__ = ["DECODING", "CausalLMOutput", "KVCache", "MoEConfig", "MoETransformer", "YarnParams", "from_hf", "native",
           "native_candidate", "native_converter", "native_pairs"]
