"""dots.llm1 (``dots1``): DeepSeek-V3's MoE on Qwen3's attention.

Differs from DeepSeek-V3, its nearest relative:
- plain GQA attention (no MLA) with a per-head qk RMSNorm (Qwen3's), split-halves RoPE, no YaRN;
- two shared experts (``moe_intermediate_size * n_shared_experts`` wide), first layer dense;
- sigmoid routing with the selection-only correction bias, n_group 1 in the release (the stress
  variant groups), top-k renormalized, routed scaling 2.5;
- ``layer_types`` may mix sliding-window and full layers (the release uses full attention only;
  the stress variant slides one layer).
"""

from transformers import Dots1Config, Dots1ForCausalLM

from moe_conformance import ArchSpec, Capabilities, Variant
from moe_conformance.native import native

# Sizes pairwise distinct: hidden 64, dense 96, expert 40 (shared 80), head 32; 12 experts top-3.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=40, head_dim=32,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, n_routed_experts=12,
            num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=True,
            routed_scaling_factor=2.5, n_group=1, topk_group=1, rms_norm_eps=1e-5, max_position_embeddings=64,
            tie_word_embeddings=False, sliding_window=None, layer_types=["full_attention"] * 3)
STRESS = {**TINY, "n_group": 4, "topk_group": 2, "sliding_window": 6,
          "layer_types": ["full_attention", "sliding_attention", "full_attention"]}
COMMON = {"correction_bias", "bias_fp32", "routed_scaling", "norm_topk_prob", "shared_experts", "qk_norm", "norm_eps"}

ARCH = ArchSpec(
    name="dots1",
    description=__doc__,
    variants=(
        Variant("faithful", lambda: Dots1Config(**TINY), frozenset(COMMON)),
        Variant("grouped_sliding", lambda: Dots1Config(**STRESS), frozenset(COMMON | {"group_limit", "sliding_window"}),
                "group-limited routing and a sliding-window layer (window 6 < sequence 20)"),
    ),
    reference=Dots1ForCausalLM,
    **native(attention="gqa", router_scoring="sigmoid", qk_norm="head"),
    capabilities=Capabilities(router_scoring="sigmoid", attention="gqa", correction_bias=True,
                              group_limited_routing=True, shared_experts=True),
)
