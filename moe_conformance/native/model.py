"""A compact, training-oriented MoE transformer: the project's native candidate.

Written like the MoE code of RL/pretraining frameworks, not like transformers:
- experts are stacked per projection (``w1``/``w3`` gate/up as [E, I, H], ``w2`` down as
  [E, H, I]) and computed by one function that a kernel backend can replace;
- the router keeps its selection-only correction bias (``expert_bias``) in fp32 whatever the
  model's dtype, and returns ``(router_logits, topk_weights, topk_indices)``;
- interleaved RoPE keeps the interleaved layout (transformers de-interleaves; attention scores
  are the same because q and k are permuted alike);
- masks are built once per forward from ``attention_mask`` (padding) and ``position_ids``
  (packed documents restart their positions), as additive fp32 biases.

State-dict names differ from transformers on purpose (``tok_embeddings``, ``attention.wq``,
``moe.router.gate``...): converters in ``moe_conformance.convert`` map them to the on-disk
checkpoint format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig, yarn_mscale

__all__ = ["CausalLMOutput", "KVCache", "MoETransformer"]


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    router_logits: tuple[torch.Tensor, ...] = ()
    cache: KVCache | None = None


class KVCache:
    """Keys and values seen so far, per layer (after RoPE, expanded per head for MLA), for
    incremental decoding: pass the same object to every forward of one generation."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def length(self) -> int:
        return next(iter(self.layers.values()))[0].shape[2] if self.layers else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.layers:
            past_k, past_v = self.layers[layer]
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        self.layers[layer] = (k, v)
        return k, v


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(cfg: MoEConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for the rotary dims and the cos/sin scale (YaRN's attention factor)."""
    dim = cfg.rotary_dim
    pos_freqs = cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    inv_freq = 1.0 / pos_freqs
    if cfg.llama3_rope is not None:  # Llama 3/4: low frequencies divided by factor, a smooth band between
        factor, low, high, original = cfg.llama3_rope
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        inv_freq = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    yarn = cfg.yarn
    if yarn is None:
        return inv_freq, 1.0
    if yarn.attention_factor is not None:
        attention_factor = yarn.attention_factor
    elif yarn.mscale and yarn.mscale_all_dim:
        attention_factor = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(yarn.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate by `factor`
    inv_freq = (inv_freq / yarn.factor) * (1 - keep_original) + inv_freq * keep_original
    return inv_freq, attention_factor


class Rotary(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleave = cfg.rope_interleave

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq.float()  # [B, S, rd/2]
        return angles.cos() * self.scale, angles.sin() * self.scale

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the leading 2*cos.shape[-1] dims of x [B, h, S, d]; the rest pass through."""
        rd = 2 * cos.shape[-1]
        rot, rest = x[..., :rd], x[..., rd:]
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        if self.interleave:
            even, odd = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
        else:
            first, second = rot[..., : rd // 2], rot[..., rd // 2 :]
            rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return torch.cat((rotated, rest), dim=-1)


def sequence_index(attention_mask: torch.Tensor | None, position_ids: torch.Tensor, seq_len: int, past: int = 0) -> torch.Tensor:
    """[B, past + S]: each token's index counted from where its sequence starts: the first real
    token of a padded row, the first token of a packed document (positions restart there, no
    padding mask and nothing cached), else the row's start."""
    device = position_ids.device
    keys = torch.arange(past + seq_len, device=device)
    if attention_mask is not None:
        start = (attention_mask.cumsum(-1) == 0).sum(-1)[:, None]
    elif not past:
        restart = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1) != 1
        start = torch.where(restart, keys[None], torch.zeros_like(keys)[None]).cummax(-1).values
    else:
        start = torch.zeros(position_ids.shape[0], 1, dtype=torch.long, device=device)
    return keys[None] - start


def attention_bias(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor, seq_len: int, window: int | None = None,
    past: int = 0, chunk: int | None = None,
) -> torch.Tensor:
    """Additive [B, 1, S, past + S] fp32 mask: causal (within ``window`` keys when given), padded
    keys removed (``attention_mask`` covers past and new tokens), and, when no padding mask is
    given and nothing is cached, packed documents kept apart (a document starts where positions
    stop counting up)."""
    device = position_ids.device
    q = past + torch.arange(seq_len, device=device)
    distance = q[:, None] - torch.arange(past + seq_len, device=device)[None, :]
    causal = (distance >= 0) & (distance < window) if window else distance >= 0
    allowed = causal[None].expand(position_ids.shape[0], -1, -1)
    if chunk:  # Llama 4: queries see keys of their own chunk, counted from where their sequence starts
        chunk_of = sequence_index(attention_mask, position_ids, seq_len, past) // chunk  # [B, past + S]
        allowed = allowed & (chunk_of[:, past:, None] == chunk_of[:, None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].bool()
    elif not past:
        step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
        document = (step != 1).cumsum(-1)
        allowed = allowed & (document[:, :, None] == document[:, None, :])
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=position_ids.device)
    return bias.masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def attend(q, k, v, bias, scale: float, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Eager attention; q [B, h, S, d], k/v [B, h_kv, S, d] with h a multiple of h_kv. A sink is
    one extra logit per head in the softmax that attends to nothing."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale + bias).float()
    if sinks is not None:
        sink = sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.cat((scores, sink), dim=-1).softmax(-1)[..., :-1]
    else:
        probs = scores.softmax(-1)
    return torch.matmul(probs.to(q.dtype), v).transpose(1, 2).flatten(2)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4's weightless qk norm (an RMS norm without a gain)."""
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class GQAttention(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        self.rotates = cfg.rope_layers[layer] if layer < len(cfg.rope_layers) else True
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.softmax_scale = cfg.softmax_scale
        self.wq = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.wk = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.wv = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.wo = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(h * d, cfg.norm_eps), RMSNorm(kv * d, cfg.norm_eps)
        if cfg.sinks:
            self.sinks = nn.Parameter(torch.zeros(h))

    def forward(self, x, rotary: Rotary, cos, sin, bias, cache: KVCache | None = None, layer: int = 0,
                temperature: torch.Tensor | None = None):
        B, S, _ = x.shape
        d = self.cfg.head_dim
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(B, S, -1, d), k.view(B, S, -1, d), v.view(B, S, -1, d)
        if self.cfg.qk_norm == "head" and not self.cfg.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.rotates:
            q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)
            if self.cfg.qk_norm == "l2":
                q, k = l2_norm(q, self.cfg.norm_eps), l2_norm(k, self.cfg.norm_eps)
        elif temperature is not None:  # Llama 4's NoPE layers: a longer context sharpens attention
            q = (q * temperature[:, None, :, None]).to(q.dtype)
        if self.cfg.qk_norm == "head" and self.cfg.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return self.wo(attend(q, k, v, bias, self.softmax_scale, getattr(self, "sinks", None)))


class MLAttention(nn.Module):
    """Multi-head latent attention: low-rank q, a compressed kv latent and one shared rope key."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.num_heads
        qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        self.softmax_scale = cfg.softmax_scale
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(cfg.hidden_size, h * qk_dim, bias=False)
        else:
            self.wq_a = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.wq_b = nn.Linear(cfg.q_lora_rank, h * qk_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(h * cfg.v_head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x, rotary: Rotary, cos, sin, bias, cache: KVCache | None = None, layer: int = 0):
        cfg = self.cfg
        B, S, _ = x.shape
        q = self.wq(x) if cfg.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, S, cfg.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.wkv_a(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(B, S, cfg.num_heads, -1).transpose(1, 2)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        q_rope = rotary.apply(q_rope, cos, sin)
        k_rope = rotary.apply(k_rope[:, None], cos, sin).expand(-1, cfg.num_heads, -1, -1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope), dim=-1)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return self.wo(attend(q, k, v, bias, self.softmax_scale))


# --------------------------------------------------------------------------------------------
# Feed-forward: dense MLP, router, stacked experts


class FeedForward(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)  # gate
        self.w3 = nn.Linear(hidden, intermediate, bias=False)  # up
        self.w2 = nn.Linear(intermediate, hidden, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Router(nn.Module):
    """Scores every expert, picks top-k. Returns (router_logits [T, E], weights [T, K], indices
    [T, K]); the correction bias (sigmoid routers) only changes which experts are picked."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=cfg.router_bias)
        if cfg.correction_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must not round the routing bias: real biases sit around 7 where bf16
        # steps are 1/32, enough to re-route most tokens. Keep the values, follow the device.
        bias = getattr(self, "expert_bias", None)
        super()._apply(fn, recurse)
        if bias is not None:
            self.expert_bias = bias.to(device=self.gate.weight.device, dtype=torch.float32)
        return self

    def forward(self, x_TH: torch.Tensor):
        cfg = self.cfg
        bias = None if self.gate.bias is None else self.gate.bias.float()
        logits = F.linear(x_TH.float(), self.gate.weight.float(), bias)
        if cfg.router_scoring == "softmax_topk":
            top = logits.topk(cfg.top_k, dim=-1)
            return logits, top.values.softmax(-1), top.indices
        if cfg.router_scoring == "sigmoid_topk":
            top = logits.topk(cfg.top_k, dim=-1)
            return logits, top.values.sigmoid(), top.indices
        scores = logits.sigmoid() if cfg.router_scoring == "sigmoid" else logits.softmax(-1)
        choice = scores + self.expert_bias if cfg.correction_bias else scores
        if cfg.n_group > 1:
            grouped = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
            if cfg.group_score == "max":
                group_score = grouped.max(dim=-1).values
            else:
                group_score = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(cfg.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(cfg.num_experts // cfg.n_group, dim=1), float("-inf"))
        indices = choice.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, weights * cfg.routed_scaling_factor, indices


class Experts(nn.Module):
    """E gated experts with stacked weights (and, for gpt-oss, biases and the clamped SwiGLU);
    ``backend`` picks the torch path or the kernels."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.w1 = nn.Parameter(torch.empty(E, I, H))  # gate
        self.w3 = nn.Parameter(torch.empty(E, I, H))  # up
        self.w2 = nn.Parameter(torch.empty(E, H, I))  # down
        nn.init.normal_(self.w1, std=H**-0.5)
        nn.init.normal_(self.w3, std=H**-0.5)
        nn.init.normal_(self.w2, std=I**-0.5)
        if cfg.expert_bias:
            self.b1, self.b3, self.b2 = (nn.Parameter(torch.zeros(E, n)) for n in (I, I, H))
        self.cfg = cfg
        self.backend = cfg.experts_backend

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.cfg.activation == "clamped_swiglu":
            limit = self.cfg.swiglu_limit
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            return (up + 1) * gate * torch.sigmoid(gate * self.cfg.swiglu_alpha)
        return F.silu(gate) * up

    def kernel_unsupported(self) -> str | None:
        """Why the native kernels cannot compute these experts (None: they can)."""
        if hasattr(self, "b1"):
            return "experts with biases"
        if self.cfg.experts_scale_input:
            return "experts whose routing weight scales their input"
        if self.cfg.activation != "swiglu":
            return f"the {self.cfg.activation} activation"
        return None

    def forward(self, x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        if self.backend != "torch":
            why = self.kernel_unsupported()
            if why:
                raise ValueError(f"experts backend {self.backend!r} does not compute {why}")
            from .kernels import moe_experts

            return moe_experts(x_TH, indices_TK, weights_TK, self.w1, self.w3, self.w2, backend=self.backend)
        biased = hasattr(self, "b1")
        out = torch.zeros_like(x_TH)
        for e in indices_TK.unique().tolist():
            token, slot = torch.where(indices_TK == e)
            h = x_TH[token]
            w = weights_TK[token, slot, None]
            if self.cfg.experts_scale_input:  # Llama 4: the expert sees the weighted input
                h, w = (h * w).to(h.dtype), None
            b1, b3, b2 = (self.b1[e], self.b3[e], self.b2[e]) if biased else (None, None, None)
            y = F.linear(self.activation(F.linear(h, self.w1[e], b1), F.linear(h, self.w3[e], b3)), self.w2[e], b2)
            out.index_add_(0, token, (y if w is None else y * w).to(out.dtype))
        return out


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        if cfg.shared_intermediate_size:
            self.shared_experts = FeedForward(cfg.hidden_size, cfg.shared_intermediate_size)
            if cfg.shared_expert_gate:
                self.shared_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_TH = x.reshape(-1, x.shape[-1])
        logits, weights, indices = self.router(x_TH)
        out = self.experts(x_TH, indices, weights)
        if hasattr(self, "shared_experts"):
            shared = self.shared_experts(x_TH)
            if hasattr(self, "shared_gate"):
                shared = torch.sigmoid(self.shared_gate(x_TH)) * shared
            out = out + shared
        return out.view_as(x), logits


class MTPHead(nn.Module):
    """The parts of a DeepSeek-V3 multi-token-prediction layer around its decoder block: the
    norms of the next token's embedding and of the previous hidden state, their projection, and
    the layer's own embedding and head copies (stored per MTP layer in the release)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        H = cfg.hidden_size
        self.enorm, self.hnorm = RMSNorm(H, cfg.norm_eps), RMSNorm(H, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.embed = nn.Embedding(cfg.vocab_size, H)
        self.norm = RMSNorm(H, cfg.norm_eps)
        self.head = nn.Linear(H, cfg.vocab_size, bias=False)


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig, layer: int):
        super().__init__()
        self.index = layer
        self.window = cfg.windows[layer] if layer < len(cfg.windows) else None
        self.chunk = cfg.chunks[layer] if layer < len(cfg.chunks) else None
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = MLAttention(cfg) if cfg.attention == "mla" else GQAttention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if layer in cfg.dense_layers:
            self.feed_forward = FeedForward(cfg.hidden_size, cfg.intermediate_size)
        else:
            self.moe = MoE(cfg)
        if layer >= cfg.num_layers:  # an MTP layer: carried, not run by the LM forward
            self.mtp = MTPHead(cfg)

    def forward(self, x, rotary, cos, sin, biases, cache: KVCache | None = None, temperature=None):
        extra = {"temperature": temperature} if temperature is not None else {}
        x = x + self.attention(self.attention_norm(x), rotary, cos, sin, biases[(self.window, self.chunk)], cache,
                               self.index, **extra)
        h = self.ffn_norm(x)
        if hasattr(self, "moe"):
            y, router_logits = self.moe(h)
            return x + y, router_logits
        return x + self.feed_forward(h), None


def _drop_tied_head(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "output.weight", None)
    return state_dict


def _fill_tied_head(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    if prefix + "output.weight" not in state_dict and prefix + "tok_embeddings.weight" in state_dict:
        state_dict[prefix + "output.weight"] = state_dict[prefix + "tok_embeddings.weight"]


class MoETransformer(nn.Module):
    """Causal LM. ``forward(input_ids, attention_mask=None, position_ids=None, cache=None)``;
    with a ``KVCache``, ``attention_mask`` (if given) covers the cached and the new tokens."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = Rotary(cfg)
        # decoder layers, then the MTP layers (named like the checkpoint's: after the decoder)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers + cfg.mtp_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # one tensor under one name: the state dict holds the embedding only, and loading
            # fills the head from it (a state where the two differ cannot be a tied model)
            self.output.weight = self.tok_embeddings.weight
            self._register_state_dict_hook(_drop_tied_head)
            self._register_load_state_dict_pre_hook(_fill_tied_head)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None) -> CausalLMOutput:
        B, S = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = (past + torch.arange(S, device=input_ids.device))[None].expand(B, -1)
        decoder = self.layers[: self.cfg.num_layers]
        kinds = {(layer.window, layer.chunk) for layer in decoder}
        biases = {(w, c): attention_bias(attention_mask, position_ids, S, w, past, c) for w, c in kinds}
        cos, sin = self.rotary(position_ids)
        temperature = None
        if self.cfg.attn_temperature is not None:  # Llama 4: by token index from the sequence's start
            floor, scale = self.cfg.attn_temperature
            index = sequence_index(attention_mask, position_ids, S, past)[:, past:].clamp(min=0).float()  # pads: 0
            temperature = torch.log1p(torch.floor((index + 1.0) / floor)) * scale + 1.0  # [B, S]
        x = self.tok_embeddings(input_ids)
        router_logits = []
        for layer in decoder:
            x, logits = layer(x, self.rotary, cos, sin, biases, cache, temperature)
            if logits is not None:
                router_logits.append(logits)
        return CausalLMOutput(logits=self.output(self.norm(x)), router_logits=tuple(router_logits), cache=cache)
