"""The native candidate's own config, read from a transformers config.

The candidate is deliberately independent of transformers' modeling code: it reads the config
fields (the public contract of a checkpoint) and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class YarnParams:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    norm_eps: float
    rope_theta: float
    # attention
    attention: str = "gqa"  # "gqa" | "mla"
    num_kv_heads: int = 0
    head_dim: int = 0
    rotary_dim: int = 0  # partial rotary: the leading rotary_dim dims of each head rotate
    rope_interleave: bool = False
    yarn: YarnParams | None = None
    attention_bias: bool = False  # q/k/v projections
    o_bias: bool = False  # output projection (gpt-oss)
    qk_norm: str = "none"  # "head": RMSNorm per head (Qwen3, GLM); "full": over all heads (OLMoE, MiniMax-M2)
    qk_norm_after_rope: bool = False  # HunYuan: the per-head norm runs on the rotated q and k
    # Llama 4: per layer, whether it rotates (NoPE layers do not: False), and the chunk its
    # attention stays in (None: none); NoPE layers scale q by log1p(floor((i + 1) / floor)) *
    # scale + 1 at position index i (``attn_temperature`` = (floor, scale)); qk_norm "l2" is a
    # weightless RMS norm of the rotated q and k
    rope_layers: tuple[bool, ...] = ()
    chunks: tuple[int | None, ...] = ()
    attn_temperature: tuple[float, float] | None = None
    llama3_rope: tuple[float, float, float, int] | None = None  # factor, low/high freq factor, original length
    sinks: bool = False  # a learned per-head logit that absorbs attention mass (gpt-oss)
    windows: tuple[int | None, ...] = ()  # per layer: sliding window length, or None for full attention
    # MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # feed-forward
    intermediate_size: int = 0
    dense_layers: frozenset[int] = frozenset()
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    # "sigmoid" (DeepSeek), "softmax" (softmax over all experts, then top-k: Mixtral, Qwen),
    # "softmax_topk" (top-k of the logits, softmax over those k: gpt-oss), "sigmoid_topk" (top-k
    # of the logits, each weight its sigmoid: Llama 4)
    router_scoring: str = "sigmoid"
    experts_scale_input: bool = False  # Llama 4: the routing weight scales the expert's input, not its output
    router_bias: bool = False
    correction_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "top2_sum"  # how a group is ranked: sum of its top-2 (DeepSeek-V3) or "max" (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # sigmoid(x @ g) scales the shared expert (Qwen2-MoE)
    expert_bias: bool = False  # per-expert projection biases (gpt-oss)
    activation: str = "swiglu"  # "swiglu" | "clamped_swiglu" (gpt-oss: clamp, alpha, (up + 1))
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    tie_embeddings: bool = False
    # DeepSeek-V3 / GLM-4.5 multi-token-prediction layers, held after the decoder layers (the
    # suites check that they are carried through conversion; the reference cannot run them)
    mtp_layers: int = 0
    experts_backend: str = "torch"  # "torch" | "triton" (moe_conformance.native.kernels)
    extras: dict[str, Any] = field(default_factory=dict, compare=False)

    def with_(self, **changes: Any) -> MoEConfig:
        return replace(self, **changes)

    @property
    def softmax_scale(self) -> float:
        qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim
        scale = qk_dim**-0.5
        # DeepSeek's YaRN: the softmax scale carries mscale(factor, mscale_all_dim) squared.
        if self.yarn is not None and self.yarn.mscale_all_dim:
            m = yarn_mscale(self.yarn.factor, self.yarn.mscale_all_dim)
            scale *= m * m
        return scale


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _first(hf: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(hf, name, None)
        if value is not None:
            return value
    return default


def from_hf(hf: Any, *, attention: str, router_scoring: str, mtp: bool = False, **overrides: Any) -> MoEConfig:
    """Read a transformers MoE config (DeepSeek-V3 / GLM-4 MoE naming, with common aliases).
    ``mtp``: hold the config's ``num_nextn_predict_layers`` MTP layers (the release stores them)."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    heads = hf.num_attention_heads
    head_dim = _first(hf, "head_dim", default=hf.hidden_size // heads)
    rope_theta = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type") == "dynamic" and rope.get("alpha"):
        # HunYuan's NTK-alpha RoPE: a fixed alpha only stretches the base
        rope_theta = rope_theta * rope["alpha"] ** (head_dim / (head_dim - 2))
    yarn = None
    if rope.get("rope_type", "default") == "yarn":
        yarn = YarnParams(
            factor=rope["factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
            beta_fast=rope.get("beta_fast") or 32.0,
            beta_slow=rope.get("beta_slow") or 1.0,
            mscale=rope.get("mscale"),
            mscale_all_dim=rope.get("mscale_all_dim"),
            attention_factor=rope.get("attention_factor"),
            truncate=rope.get("truncate", True),
        )
    n_shared = _first(hf, "n_shared_experts", "moe_num_shared_experts", default=0)
    experts = _first(hf, "n_routed_experts", "num_experts", "num_local_experts")
    moe_inter = _first(hf, "moe_intermediate_size", default=hf.intermediate_size)
    layers = hf.num_hidden_layers
    # Dense (non-MoE) layers: DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers and
    # decoder_sparse_step.
    step = _first(hf, "decoder_sparse_step", default=1)
    dense = set(range(_first(hf, "first_k_dense_replace", default=0)))
    dense |= set(_first(hf, "mlp_only_layers", default=()) or ())
    dense |= {i for i in range(layers) if (i + 1) % step}
    window = _first(hf, "sliding_window") or None
    layer_types = getattr(hf, "layer_types", None)
    if layer_types:
        windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
    else:
        windows = (window,) * layers
    qk_norm = "head" if getattr(hf, "use_qk_norm", False) else "none"
    if getattr(hf, "moe_layer_interval", None):  # ERNIE 4.5: MoE every interval-th layer in [start, end]
        start, end = hf.moe_layer_start_index, hf.moe_layer_end_index
        end = layers - 1 if end is None or end < 0 else end
        dense |= {i for i in range(layers) if not ((i + 1) % hf.moe_layer_interval == 0 and start <= i <= end)}
    moe_layers = getattr(hf, "moe_layers", None)  # Llama 4: the MoE layers, listed
    if moe_layers is not None:
        dense |= {i for i in range(layers) if i not in set(moe_layers)}
    mlp_types = getattr(hf, "mlp_layer_types", None)  # GLM-4.7-Flash: "dense" / "sparse" per layer
    if mlp_types:
        dense |= {i for i, t in enumerate(mlp_types) if t == "dense"}
    grouped = getattr(hf, "topk_method", None) != "greedy"  # DeepSeek-V2 names its routing
    cfg = MoEConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_first(hf, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        norm_eps=hf.rms_norm_eps,
        rope_theta=rope_theta,
        attention=attention,
        rotary_dim=int(head_dim * rope.get("partial_rotary_factor", 1.0)),
        rope_interleave=bool(getattr(hf, "rope_interleave", False)),
        yarn=yarn,
        attention_bias=bool(_first(hf, "attention_bias", "qkv_bias", default=False)),
        qk_norm=qk_norm,
        windows=windows,
        q_lora_rank=getattr(hf, "q_lora_rank", None),
        kv_lora_rank=getattr(hf, "kv_lora_rank", 0) or 0,
        qk_nope_head_dim=getattr(hf, "qk_nope_head_dim", 0) or 0,
        qk_rope_head_dim=getattr(hf, "qk_rope_head_dim", 0) or 0,
        v_head_dim=getattr(hf, "v_head_dim", 0) or 0,
        intermediate_size=_first(hf, "intermediate_size_mlp", "intermediate_size"),  # Llama 4: the dense MLP's
        dense_layers=frozenset(dense),
        num_experts=experts,
        top_k=hf.num_experts_per_tok,
        moe_intermediate_size=moe_inter,
        router_scoring=router_scoring,
        correction_bias=router_scoring == "sigmoid",
        n_group=_first(hf, "n_group", default=1) if grouped else 1,
        topk_group=_first(hf, "topk_group", default=1) if grouped else 1,
        norm_topk_prob=bool(_first(hf, "norm_topk_prob", default=False)),
        routed_scaling_factor=float(_first(hf, "routed_scaling_factor", default=1.0)),
        shared_intermediate_size=_first(hf, "shared_expert_intermediate_size", default=moe_inter * n_shared),
        swiglu_alpha=float(_first(hf, "swiglu_alpha", default=1.702)),
        swiglu_limit=float(_first(hf, "swiglu_limit", default=7.0)),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        mtp_layers=int(getattr(hf, "num_nextn_predict_layers", 0) or 0) if mtp else 0,
    )
    if attention == "mla":
        cfg = cfg.with_(rotary_dim=cfg.qk_rope_head_dim)
    if getattr(hf, "no_rope_layers", None):  # Llama 4 (1: the layer rotates)
        chunk = getattr(hf, "attention_chunk_size", None)
        kinds = getattr(hf, "layer_types", None) or ["full_attention"] * layers
        cfg = cfg.with_(rope_layers=tuple(bool(r) for r in hf.no_rope_layers),
                        chunks=tuple(chunk if t == "chunked_attention" else None for t in kinds),
                        attn_temperature=(float(hf.floor_scale), float(hf.attn_scale)) if hf.attn_temperature_tuning else None)
    if rope.get("rope_type") == "llama3":
        cfg = cfg.with_(llama3_rope=(rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                                     rope["original_max_position_embeddings"]))
    return cfg.with_(**overrides)
