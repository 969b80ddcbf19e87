"""Hunyuan-A13B MoE (``hunyuan_v1_moe``).

Differs from Qwen3-MoE, its nearest relative:
- the per-head qk RMSNorm (``query_layernorm``/``key_layernorm``) runs AFTER RoPE, on the rotated
  queries and keys (Qwen3 normalizes before rotating);
- NTK-alpha RoPE: ``rope_type`` "dynamic" with a fixed ``alpha`` (1000 in the release) stretches
  the base to ``theta * alpha ** (d / (d - 2))``, independent of the sequence length;
- a shared MLP (``mlp.shared_mlp``, no gate) in every layer, as wide as each expert
  (``intermediate_size`` sizes both), added to the routed output;
- softmax top-k, always renormalized; the router is ``mlp.gate.wg`` (fp32).
transformers 5.20-5.24 have no cross-layer attention (CLA) for this class: the released A13B
does not use it either.
"""

from transformers import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM

from moe_conformance import ArchSpec, Capabilities, Variant
from moe_conformance.native import native

ROPE = dict(rope_type="dynamic", alpha=1000.0, factor=1.0, rope_theta=10000.0)
# Sizes pairwise distinct: hidden 64, expert (and shared) 40, head 32; 12 experts top-3.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=40, head_dim=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=12, moe_topk=3, rms_norm_eps=1e-5,
            max_position_embeddings=64, tie_word_embeddings=False, rope_parameters=ROPE,
            pad_token_id=None, bos_token_id=None, eos_token_id=None, eod_token_id=None, sep_token_id=None)

ARCH = ArchSpec(
    name="hunyuan_v1_moe",
    description=__doc__,
    variants=(Variant("faithful", lambda: HunYuanMoEV1Config(**TINY),
                      frozenset({"qk_norm", "rope_ntk_alpha", "shared_experts", "norm_eps"})),),
    reference=HunYuanMoEV1ForCausalLM,
    **native(attention="gqa", router_scoring="softmax", qk_norm="head", qk_norm_after_rope=True, norm_topk_prob=True,
             shared_intermediate_size=TINY["intermediate_size"], router="gate.wg", shared="shared_mlp",
             qk_norm_names=("query_layernorm", "key_layernorm")),
    capabilities=Capabilities(router_scoring="softmax", attention="gqa", shared_experts=True, aux_loss=True),
)
