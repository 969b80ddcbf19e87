"""Mixtral (``mixtral``): the plain softmax MoE.

Differs from the DeepSeek family: softmax over all experts, top-k, always renormalized (no
norm_topk_prob field); no shared or dense layers (``intermediate_size`` is the expert size);
GQA without biases; an optional sliding window; on disk the block is
``block_sparse_moe.experts.N.w1/w2/w3``; a softmax load-balancing aux loss.
"""

from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

from moe_conformance import ArchSpec, Capabilities, Variant
from moe_conformance.convert import MIXTRAL_NAMES
from moe_conformance.native import native
from moe_conformance.dryrun import released_config
from moe_conformance.upcycling import Upcycling

# hidden 64, expert 40, head 32 (hidden / heads, a size vLLM runs); 8 experts top-2 as released.
MISTRAL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "sliding_window",
                  "tie_word_embeddings", "rope_parameters")
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
            max_position_embeddings=64, sliding_window=None, tie_word_embeddings=False)

ARCH = ArchSpec(
    name="mixtral",
    description=__doc__,
    variants=(
        Variant("faithful", lambda: MixtralConfig(**TINY), frozenset({"norm_eps"})),
        Variant("sliding", lambda: MixtralConfig(**{**TINY, "sliding_window": 6}), frozenset({"norm_eps", "sliding_window"}),
                "a sliding window (6) shorter than the test sequence (20)"),
    ),
    reference=MixtralForCausalLM,
    **native(attention="gqa", router_scoring="softmax", norm_topk_prob=True, moe="block_sparse_moe", experts=MIXTRAL_NAMES),
    released=released_config("mixtral", MixtralConfig),
    # Mixtral's dense parent is Mistral (same attention, MLP as wide as an expert)
    upcycling=Upcycling(dense=lambda c: MistralForCausalLM(MistralConfig(**{k: v for k, v in c.to_dict().items()
                                                                             if k in MISTRAL_FIELDS}))),
    capabilities=Capabilities(router_scoring="softmax", attention="gqa", aux_loss=True),
)
