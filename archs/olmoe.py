"""OLMoE (``olmoe``).

Differs from Qwen3-MoE: qk RMSNorm over the whole q and k projections (all heads at once, not
per head), no top-k renormalization (norm_topk_prob off), head_dim = hidden / heads.
"""

from transformers import OlmoeConfig, OlmoeForCausalLM

from moe_conformance import ArchSpec, Capabilities, Variant
from moe_conformance.native import native

# hidden 64, expert 40, head 32 (a size vLLM runs); 12 experts top-3.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, num_experts=12, num_experts_per_tok=3, norm_topk_prob=False, rms_norm_eps=1e-5,
            max_position_embeddings=64, pad_token_id=None, eos_token_id=None, tie_word_embeddings=False)

ARCH = ArchSpec(
    name="olmoe",
    description=__doc__,
    variants=(Variant("faithful", lambda: OlmoeConfig(**TINY), frozenset({"qk_norm", "norm_topk_prob", "norm_eps"})),),
    reference=OlmoeForCausalLM,
    **native(attention="gqa", router_scoring="softmax", qk_norm="full"),
    capabilities=Capabilities(router_scoring="softmax", attention="gqa", aux_loss=True),
)
