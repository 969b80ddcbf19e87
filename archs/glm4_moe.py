"""GLM-4.5 / GLM-4.6 MoE (``glm4_moe``).

Differs from DeepSeek-V3, its nearest relative:
- plain GQA attention (no MLA) with q/k/v biases and per-head qk RMSNorm;
- partial rotary (half of each head rotates), split-halves RoPE, no YaRN;
- sigmoid routing with correction bias, but n_group 1 in the release (stress variant groups);
- RMSNorm epsilon 1e-5;
- one MTP layer after the decoder layers on disk (two in the ``grouped`` variant), which
  transformers drops at load.
"""

from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

from moe_conformance import ArchSpec, Capabilities, Variant
from moe_conformance.native import native
from moe_conformance.dryrun import released_config
from moe_conformance.extras import MTPLayers
from moe_conformance.upcycling import Upcycling, dense_parent, with_fields

# Released GLM-4.5 settings, scaled down: sizes pairwise distinct (hidden 64, dense 96,
# expert 40, head 32: a size vLLM runs), 12 experts top-3, routed scaling 2.5, first layer dense, untied head.
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    n_routed_experts=12, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, n_group=1, topk_group=1,
    attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5, rms_norm_eps=1e-5,
    max_position_embeddings=64, tie_word_embeddings=False, num_nextn_predict_layers=1,
)
COMMON = {"correction_bias", "bias_fp32", "routed_scaling", "norm_topk_prob", "shared_experts",
          "partial_rotary", "qk_norm", "attention_bias", "norm_eps"}

ARCH = ArchSpec(
    name="glm4_moe",
    description=__doc__,
    variants=(
        Variant("faithful", lambda: Glm4MoeConfig(**TINY), frozenset(COMMON)),
        Variant("grouped", lambda: Glm4MoeConfig(**{**TINY, "n_group": 4, "topk_group": 2, "num_nextn_predict_layers": 2}),
                frozenset(COMMON | {"group_limit"}), "group-limited routing, which the code supports; two MTP layers"),
    ),
    reference=Glm4MoeForCausalLM,
    **native(attention="gqa", router_scoring="sigmoid", mtp=True),
    disk_extras=MTPLayers(),
    released=released_config("glm4_moe", Glm4MoeConfig),
    # upcycled into: dense layers as wide as the experts, no MTP; from: every layer dense
    upcycling=Upcycling(moe=lambda c: with_fields(c, intermediate_size=c.moe_intermediate_size, num_nextn_predict_layers=0),
                        dense=dense_parent(Glm4MoeForCausalLM, first_k_dense_replace=lambda c: c.num_hidden_layers)),
    capabilities=Capabilities(router_scoring="sigmoid", attention="gqa", correction_bias=True,
                              group_limited_routing=True, shared_experts=True),
)
