"""Adversarial tiny models: weights and inputs chosen so that bugs show.

transformers' default init (std 0.02, zero correction bias, unit norm gains, zero biases)
hides about a quarter of realistic bugs (FACTS.md). Here instead:
- linear weights have unit gain (std 1/sqrt(fan_in)) and the LM head a gain of 4, so logits are
  peaky and routing/attention bugs move them far above float noise;
- embeddings stay small (std 0.02, like trained models) so the RMSNorm epsilon is visible;
- norm gains are random in [0.6, 1.4], biases random, every expert gets its own scale;
- the correction bias is a large common offset (7, like released checkpoints) plus a spread
  that changes selection, so dropping it or storing it in bf16 re-routes tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BIAS_OFFSET = 7.0
BIAS_SPREAD = 0.1
HEAD_GAIN = 4.0
EMBED_STD = 0.02


@torch.no_grad()
def adversarial_init_(model: torch.nn.Module, seed: int, gains: dict[str, float] | None = None) -> torch.nn.Module:
    """Re-initialize a transformers reference model in place (names in its own namespace).
    ``gains`` multiplies the tensors whose names end with a key (an arch's way to reach a
    nonlinear limit, e.g. gpt-oss's SwiGLU clamp)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=gen) * std

    def uniform(shape, low, high):
        return torch.rand(shape, generator=gen) * (high - low) + low

    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    for name in sorted(tensors):
        t = tensors[name]
        if name.endswith("e_score_correction_bias"):
            value = BIAS_OFFSET + uniform(t.shape, -BIAS_SPREAD, BIAS_SPREAD)
        elif "embed_tokens" in name:
            value = normal(t.shape, EMBED_STD)
        elif name.startswith("lm_head") or name.endswith("lm_head.weight"):
            value = normal(t.shape, HEAD_GAIN * t.shape[-1] ** -0.5)
        elif t.ndim == 1 and "norm" in name:
            value = uniform(t.shape, 0.6, 1.4)
        elif name.endswith("sinks"):  # comparable to attention logits, so they take real mass
            value = normal(t.shape, 1.0)
        elif t.ndim == 1:
            value = normal(t.shape, 0.1)
        elif t.ndim == 3:  # stacked experts: [E, out, in] (or transposed); each expert its own scale
            per_expert = uniform((t.shape[0], 1, 1), 0.6, 1.4)
            value = normal(t.shape, 1.0) * per_expert * min(t.shape[1:]) ** -0.5
        else:
            value = normal(t.shape, t.shape[-1] ** -0.5)
        gain = next((g for suffix, g in (gains or {}).items() if name.endswith(suffix)), 1.0)
        t.copy_((value * gain).to(t.dtype))
    return model


# The bf16 production profile scales the adversarial weight matrices down to trained-model
# sizes: at unit gain, bf16 rounding alone moves the tiny models' logits by up to 24 against fp64
# (routing flips cascade through the layers), so no bf16 bug could stand 10x above that floor;
# at 0.1 the floor is ~5e-2 and a bf16-rounded routing bias still re-routes tokens
# (benchmarks/noise_floor.py --dtype bfloat16; moe_conformance/tolerances.py).
PRODUCTION_SCALE = 0.1


@torch.no_grad()
def production_scale_(model: torch.nn.Module, scale: float = PRODUCTION_SCALE) -> torch.nn.Module:
    """Every weight matrix but the embeddings times ``scale`` (biases, norms, sinks, the routing
    bias unchanged): the bf16 profile's weights."""
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "embed" not in name:
            p.mul_(scale)
    return model


@dataclass(frozen=True)
class Batch:
    """One test input. ``kwargs`` are passed by keyword; ``valid`` marks the positions to compare."""

    name: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None

    @property
    def kwargs(self) -> dict[str, torch.Tensor]:
        kw = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            kw["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            kw["position_ids"] = self.position_ids
        return kw

    @property
    def valid(self) -> torch.Tensor:
        if self.attention_mask is None:
            return torch.ones_like(self.input_ids, dtype=torch.bool)
        return self.attention_mask.bool()


SEQ_LEN = 20
INPUT_CASES = ("plain", "right_padded", "left_padded", "offset_positions", "packed")


def make_batches(vocab_size: int, seed: int) -> dict[str, Batch]:
    """The logit-parity inputs. Positions that are not a shifted range (left padding, packed
    documents) are what expose position_ids passed into the wrong slot: RoPE is relative, so
    a shifted range alone hides it."""
    gen = torch.Generator().manual_seed(seed)
    B, S = 2, SEQ_LEN
    # distinct tokens per case: more contexts for the routing-coverage and margin checks
    ids = {name: torch.randint(0, vocab_size, (B, S), generator=gen) for name in INPUT_CASES}
    arange = torch.arange(S)[None].expand(B, -1)

    right = torch.ones(B, S, dtype=torch.long)
    right[1, 13:] = 0
    left = torch.ones(B, S, dtype=torch.long)
    left[1, :6] = 0
    left_positions = (left.cumsum(-1) - 1).clamp(min=0)

    def packed_positions(lengths: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(n) for n in lengths])

    packed = torch.stack([packed_positions([8, 12]), packed_positions([5, 9, 6])])
    return {
        "plain": Batch("plain", ids["plain"], None, None),
        "right_padded": Batch("right_padded", ids["right_padded"], right, None),
        "left_padded": Batch("left_padded", ids["left_padded"], left, left_positions),
        "offset_positions": Batch("offset_positions", ids["offset_positions"], None, arange + 9),
        "packed": Batch("packed", ids["packed"], None, packed),
    }
