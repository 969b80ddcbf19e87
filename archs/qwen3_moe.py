"""Qwen3 MoE (``qwen3_moe``).

Differs from Qwen2-MoE: no shared expert, no q/k/v biases, per-head qk RMSNorm, an explicit
head_dim different from hidden / heads, norm_topk_prob on in the release (off in a variant).
"""

from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from moe_conformance import ArchSpec, Capabilities, Variant
from moe_conformance.native import native
from moe_conformance.dryrun import released_config
from moe_conformance.upcycling import Upcycling, dense_parent

# hidden 64, dense 96 (unused unless mlp_only_layers), expert 40, head 32 != 64 / 4 (vLLM runs
# head sizes 32..512 in powers of two); 12 experts top-3.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=40, head_dim=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=12, num_experts_per_tok=3,
            norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=64, tie_word_embeddings=False)
COMMON = {"qk_norm", "norm_topk_prob", "norm_eps"}

ARCH = ArchSpec(
    name="qwen3_moe",
    description=__doc__,
    variants=(
        Variant("faithful", lambda: Qwen3MoeConfig(**TINY), frozenset(COMMON)),
        Variant("unnormalized", lambda: Qwen3MoeConfig(**{**TINY, "norm_topk_prob": False}), frozenset(COMMON),
                "norm_topk_prob off"),
    ),
    reference=Qwen3MoeForCausalLM,
    **native(attention="gqa", router_scoring="softmax", qk_norm="head"),
    released=released_config("qwen3_moe", Qwen3MoeConfig),
    # its dense parent: every layer a dense MLP as wide as an expert (Qwen3-MoE's mlp_only_layers)
    upcycling=Upcycling(dense=dense_parent(Qwen3MoeForCausalLM, mlp_only_layers=lambda c: list(range(c.num_hidden_layers)),
                                           intermediate_size=lambda c: c.moe_intermediate_size)),
    capabilities=Capabilities(router_scoring="softmax", attention="gqa", aux_loss=True),
)
