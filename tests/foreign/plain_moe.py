"""A hand-written Mixtral-like MoE in plain PyTorch: a foreign candidate for the project's tests.

Nothing here follows the native candidate or transformers' module layout on purpose: its own
names (``blocks.N.attn.q``, ``blocks.N.moe.gate``), fused [E, 2I, H] gate/up expert weights, a
router that is a bare ``nn.Linear`` returning logits (top-k happens in the MoE block), experts
called as ``experts(x, weights, indices)``, logits returned as a bare tensor, no cache. With
``router="megatron"`` the router instead returns Megatron-Core's shape: ``(probs [T, E] with
the combine weights scattered in, routing_map [T, E] bool)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.window = getattr(cfg, "sliding_window", None)
        self.q = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=False)
        self.k = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, allowed):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
        mask = allowed
        if self.window:
            idx = torch.arange(S, device=x.device)
            mask = mask & ((idx[:, None] - idx[None, :]) < self.window)
        scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
        out = scores.float().softmax(-1).to(q.dtype) @ v
        return self.o(out.transpose(1, 2).reshape(B, S, -1))


class FusedExperts(nn.Module):
    """gate_up [E, 2I, H] (gate rows, then up rows) and down [E, H, I]; called (x, weights, indices)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(num_experts, 2 * intermediate, hidden) * hidden ** -0.5)
        self.down = nn.Parameter(torch.randn(num_experts, hidden, intermediate) * intermediate ** -0.5)

    def forward(self, x, weights, indices):
        out = torch.zeros_like(x)
        for e in indices.unique().tolist():
            token, slot = torch.where(indices == e)
            gate, up = (x[token] @ self.gate_up[e].T).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.down[e].T
            out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
        return out


class MegatronRouter(nn.Module):
    """Megatron-Core's router shape: (probs [T, E] holding each token's combine weights at its
    chosen experts and 0 elsewhere, routing_map [T, E] bool)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_experts, hidden) * hidden ** -0.5)
        self.top_k = top_k

    def forward(self, x):
        probs = F.linear(x.float(), self.weight.float()).softmax(-1)
        top = probs.topk(self.top_k, dim=-1)
        weights = top.values / top.values.sum(-1, keepdim=True)
        routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter(1, top.indices, True)
        return torch.zeros_like(probs).scatter(1, top.indices, weights), routing_map


class MoE(nn.Module):
    def __init__(self, cfg, router: str):
        super().__init__()
        E, H = cfg.num_local_experts, cfg.hidden_size
        self.top_k, self.kind = cfg.num_experts_per_tok, router
        self.gate = nn.Linear(H, E, bias=False) if router == "linear" else MegatronRouter(H, E, self.top_k)
        self.experts = FusedExperts(E, H, cfg.intermediate_size)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        if self.kind == "linear":
            probs = self.gate(flat).float().softmax(-1)
            weights, indices = probs.topk(self.top_k, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
        else:
            probs, routing_map = self.gate(flat)
            indices = routing_map.nonzero()[:, 1].view(flat.shape[0], -1)
            weights = probs.gather(1, indices)
        return self.experts(flat, weights, indices).view_as(x)


class Block(nn.Module):
    def __init__(self, cfg, router: str):
        super().__init__()
        self.ln1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.ln2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = MoE(cfg, router)

    def forward(self, x, cos, sin, allowed):
        x = x + self.attn(self.ln1(x), cos, sin, allowed)
        return x + self.moe(self.ln2(x))


class PlainMoE(nn.Module):
    def __init__(self, cfg, router: str = "linear"):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, router) for _ in range(cfg.num_hidden_layers))
        self.ln_f = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        head_dim = self.blocks[0].attn.head_dim
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device)[None].expand(B, -1)
        angles = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        cos, sin = angles.cos(), angles.sin()
        idx = torch.arange(S, device=input_ids.device)
        allowed = (idx[:, None] >= idx[None, :])[None].expand(B, -1, -1)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :].bool()
        else:  # packed documents: a document starts where the positions restart
            doc = (torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1) != 1).cumsum(-1)
            allowed = allowed & (doc[:, :, None] == doc[:, None, :])
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, allowed)
        return self.head(self.ln_f(x))
