"""Tensors a released checkpoint holds that the reference model does not load.

DeepSeek-V3 and GLM-4.5 ship multi-token-prediction (MTP) layers after their decoder layers
(``num_nextn_predict_layers`` of them, at indices N .. N+n-1 of ``model.layers``): a full decoder
layer (attention, MoE) plus the MTP projection (``enorm``, ``hnorm``, ``eh_proj``) and its own
embedding and head copies. transformers drops them at load (``_keys_to_ignore_on_load_unexpected``),
so ``save_pretrained`` never writes them, and a suite that takes the reference's save as the
checkpoint would never see a converter lose them (AReaL #1403: whole shards skipped; Megatron-Bridge
#5495: one MTP layer exported where there are several; NeMo Automodel #2595: MTP experts split
where the file groups them).

``ArchSpec(disk_extras=MTPLayers())`` makes the suites synthesize them: the decoder part of MTP
layer j is shaped like the last decoder layer (same on-disk names and dtypes, under index N+j),
the MTP-only tensors are declared below. Values are drawn from the case seed, so every process
builds the same file; on the meta device (the dry run) only shapes and dtypes exist.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

# (name under model.layers.{N+j}, shape in config sizes): DeepSeek-V3's release layout, which
# GLM-4.5's follows.
DEEPSEEK_MTP = (
    ("enorm.weight", ("hidden",)),
    ("hnorm.weight", ("hidden",)),
    ("eh_proj.weight", ("hidden", "2*hidden")),
    ("embed_tokens.weight", ("vocab", "hidden")),
    ("shared_head.norm.weight", ("hidden",)),
    ("shared_head.head.weight", ("vocab", "hidden")),
)


def _size(cfg: Any, name: str) -> int:
    factor, _, field = name.rpartition("*")
    value = {"hidden": cfg.hidden_size, "vocab": cfg.vocab_size}[field]
    return int(factor or 1) * value


@dataclass(frozen=True)
class MTPLayers:
    """``count_field`` MTP layers after the decoder layers; ``own``: their MTP-only tensors."""

    count_field: str = "num_nextn_predict_layers"
    own: tuple[tuple[str, tuple[str, ...]], ...] = DEEPSEEK_MTP

    def count(self, model_config: Any) -> int:
        return int(getattr(model_config, self.count_field, 0) or 0)

    def tensors(self, disk: dict[str, torch.Tensor], model_config: Any, seed: int | None = None) -> dict[str, torch.Tensor]:
        """The MTP tensors to add to the on-disk state ``disk`` (the reference's own save).
        ``seed`` None, or meta tensors in ``disk``: shapes and dtypes only (meta)."""
        n, last = self.count(model_config), model_config.num_hidden_layers - 1
        if n <= 0:
            return {}
        pattern = re.compile(rf"^(.*\blayers\.){last}\.(.+)$")
        template = {m.group(2): (m.group(1), t) for k, t in disk.items() if (m := pattern.match(k))}
        if not template:
            raise ValueError(f"no on-disk key of the last decoder layer ({last}) to shape the MTP layers on")
        head = next(iter(template.values()))[0]
        embed = next((t for k, t in disk.items() if k.endswith("embed_tokens.weight")), None)
        dtype = embed.dtype if embed is not None else torch.float32
        meta = seed is None or any(t.is_meta for t in disk.values())
        gen = None if meta else torch.Generator().manual_seed(seed)
        out: dict[str, torch.Tensor] = {}
        for j in range(n):
            layer = f"{head}{last + 1 + j}."
            for name, (_, like) in sorted(template.items()):
                out[layer + name] = _draw(name, like.shape, like.dtype, gen)
            for name, dims in self.own:
                out[layer + name] = _draw(name, tuple(_size(model_config, d) for d in dims), dtype, gen)
        return out


def _draw(name: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator | None) -> torch.Tensor:
    if gen is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    if name.endswith("e_score_correction_bias"):
        value = 7.0 + (torch.rand(shape, generator=gen) - 0.5) * 0.2
    elif len(shape) == 1 and "norm" in name:
        value = 0.6 + 0.8 * torch.rand(shape, generator=gen)
    elif len(shape) == 1:
        value = 0.1 * torch.randn(shape, generator=gen)
    else:
        value = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
    return value.to(dtype)
