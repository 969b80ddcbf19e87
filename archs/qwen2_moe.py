"""Qwen1.5/Qwen2 MoE (``qwen2_moe``).

Differs from Mixtral: a shared expert scaled by a sigmoid gate (``shared_expert_gate``),
q/k/v biases, norm_topk_prob as configured (off in the release), dense layers via
``mlp_only_layers`` / ``decoder_sparse_step``; on disk ``mlp.experts.N.{gate,up,down}_proj``.
The ``top1`` trap variant routes each token to one expert (k = 1) without renormalization, so
the router's gradient comes through the single weight (renormalized, it would be 1: BUGS #36).
"""

from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from moe_conformance import ArchSpec, Capabilities, Variant
from moe_conformance.native import native

# hidden 64, dense 96, expert 40, shared 56, head 32 (a size vLLM runs); 10 experts top-3.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
            shared_expert_intermediate_size=56, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_experts=10, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[], rms_norm_eps=1e-6,
            max_position_embeddings=64, tie_word_embeddings=False)
COMMON = {"shared_experts", "shared_expert_gate", "attention_bias", "norm_topk_prob", "norm_eps"}

ARCH = ArchSpec(
    name="qwen2_moe",
    description=__doc__,
    variants=(
        Variant("faithful", lambda: Qwen2MoeConfig(**TINY), frozenset(COMMON)),
        Variant("renormalized_dense0", lambda: Qwen2MoeConfig(**{**TINY, "norm_topk_prob": True, "mlp_only_layers": [0]}),
                frozenset(COMMON), "norm_topk_prob on, and layer 0 dense through mlp_only_layers"),
        Variant("top1", lambda: Qwen2MoeConfig(**{**TINY, "num_experts_per_tok": 1}), frozenset(COMMON),
                "top-1 routing, not renormalized", traps=frozenset({"top1"}), seed=1),
        # vLLM derives the head size as hidden / heads: hidden 128 gives 32 (hidden 128, dense 96, expert 40,
        # shared 56, head 32 stay distinct); engine checks and tiny_config rules only
        Variant("vllm_sized", lambda: Qwen2MoeConfig(**{**TINY, "hidden_size": 128}), frozenset(COMMON),
                "the faithful settings sized for vLLM (head size = hidden / heads = 32)", families=frozenset({"engine_parity", "tiny_config"})),
    ),
    reference=Qwen2MoeForCausalLM,
    **native(attention="gqa", router_scoring="softmax", shared_expert_gate=True, shared="shared_expert", shared_gate="shared_expert_gate"),
    capabilities=Capabilities(router_scoring="softmax", attention="gqa", shared_experts=True, aux_loss=True),
)
