"""A hand-written Mixtral-like candidate (tests/foreign/plain_moe.py) checked against
transformers' Mixtral through the contract alone: its own names, fused experts, a logits-only
router, experts called (x, weights, indices), no cache. ``ARCHS`` also holds the same model with
a Megatron-Core-style router ``(probs, routing_map)``: each shape is a few lines of probes.
"""

from transformers import MixtralConfig, MixtralForCausalLM

from moe_conformance import ArchSpec, Capabilities, ExpertsProbe, ModulePair, Probes, RouterProbe, RouterReading, Variant
from moe_conformance.convert import GATE_UP_SWAPPED, FuseExperts, KeyMapConverter, Rename, StackExperts, swap_expert_names

from plain_moe import PlainMoE

# 4 query heads over 2 kv heads, head 16, hidden 64, expert 40: every size distinct
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
            max_position_embeddings=64, sliding_window=None, tie_word_embeddings=False)

L, B = "model.layers.{i}", "blocks.{i}"
CONVERTER = KeyMapConverter([
    Rename("model.embed_tokens.weight", "embed.weight"),
    Rename("model.norm.weight", "ln_f.weight"),
    Rename("lm_head.weight", "head.weight"),
    Rename(f"{L}.input_layernorm.weight", f"{B}.ln1.weight"),
    Rename(f"{L}.post_attention_layernorm.weight", f"{B}.ln2.weight"),
    *[Rename(f"{L}.self_attn.{p}_proj.weight", f"{B}.attn.{p}.weight") for p in "qkvo"],
    Rename(f"{L}.block_sparse_moe.gate.weight", f"{B}.moe.gate.weight"),
    FuseExperts(f"{L}.block_sparse_moe.experts.{{e}}.w1.weight", f"{L}.block_sparse_moe.experts.{{e}}.w3.weight",
                f"{B}.moe.experts.gate_up"),
    StackExperts(f"{L}.block_sparse_moe.experts.{{e}}.w2.weight", f"{B}.moe.experts.down"),
], misreadings={GATE_UP_SWAPPED: swap_expert_names("w1", "w3")})

PAIRS = (
    ModulePair("model.embed_tokens", "embed"),
    ModulePair(f"{L}.input_layernorm", f"{B}.ln1"),
    *[ModulePair(f"{L}.self_attn.{p}_proj", f"{B}.attn.{p}") for p in "qkvo"],
    ModulePair(f"{L}.self_attn", f"{B}.attn"),
    ModulePair(f"{L}.post_attention_layernorm", f"{B}.ln2"),
    ModulePair(f"{L}.mlp.gate", f"{B}.moe.gate", role="router"),
    ModulePair(f"{L}.mlp.experts", f"{B}.moe.experts", role="experts"),
    ModulePair(f"{L}.mlp", f"{B}.moe"),
    ModulePair("model.norm", "ln_f"),
    ModulePair("lm_head", "head"),
)

# The router is a bare Linear: its output is the logits; the choice is read (and forced) where
# the experts receive it, as (x, weights, indices).
EXPERTS = ExpertsProbe(call=lambda m, x, idx, w: m(x, w, idx),
                       read_choice=lambda args, kwargs: (args[2], args[1]),
                       force_choice=lambda args, kwargs, idx, w: ((args[0], w, idx), kwargs))
LINEAR_ROUTER = RouterProbe(read=lambda logits: RouterReading(logits=logits), force=None)


def read_megatron(output) -> RouterReading:
    probs, routing_map = output
    indices = routing_map.nonzero()[:, 1].view(probs.shape[0], -1)
    return RouterReading(indices=indices, weights=probs.gather(1, indices))


def force_megatron(output, forced: RouterReading):
    probs, routing_map = output
    idx = forced.indices.reshape(probs.shape[0], -1)
    return (probs.new_zeros(probs.shape).scatter(1, idx, forced.weights.reshape(idx.shape).to(probs.dtype)),
            routing_map.new_zeros(routing_map.shape).scatter(1, idx, True))


VARIANTS = (
    Variant("faithful", lambda: MixtralConfig(**TINY), frozenset({"norm_eps"})),
    Variant("sliding", lambda: MixtralConfig(**{**TINY, "sliding_window": 6}), frozenset({"norm_eps", "sliding_window"}),
            "a sliding window (6) shorter than the test sequence (20)"),
)
CAPABILITIES = Capabilities(router_scoring="softmax", attention="gqa", aux_loss=True)


def plain(config):
    return PlainMoE(config)


def megatron(config):
    return PlainMoE(config, router="megatron")


ARCHS = [
    ArchSpec(name="plain_mixtral", description=__doc__, variants=VARIANTS, reference=MixtralForCausalLM,
             candidate=plain, converter=CONVERTER, capabilities=CAPABILITIES,
             probes=Probes(pairs=PAIRS, router=LINEAR_ROUTER, experts=EXPERTS)),
    ArchSpec(name="megatron_mixtral", description=__doc__, variants=VARIANTS[:1], reference=MixtralForCausalLM,
             candidate=megatron, converter=CONVERTER, capabilities=CAPABILITIES,
             probes=Probes(pairs=PAIRS, router=RouterProbe(read=read_megatron, force=force_megatron), experts=EXPERTS)),
]
