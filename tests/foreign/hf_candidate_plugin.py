"""transformers' own Qwen3-MoE as a candidate: a team whose training code wraps the
transformers model (its in-memory layout: experts fused as gate_up_proj [E, 2I, H] and
down_proj [E, H, I]). It reaches the suites through the contract alone and must pass every
family: in particular the engines must not hand it a cache object of their own (transformers
5.24 names its own cache argument `cache`), and the converter is the library's rules for the
fused layout."""

from transformers import Qwen3MoeForCausalLM

from moe_conformance import ModulePair, Probes
from moe_conformance.convert import GATE_UP_SWAPPED, FuseExperts, KeyMapConverter, Rename, StackExperts, swap_expert_names
from moe_conformance.registry import builtin_entries

base = next(e for e in builtin_entries() if e.name == "qwen3_moe").load()
L = "model.layers.{i}"
KEYS = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        *[f"{L}.{k}" for k in ("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate.weight",
                               "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                               *[f"self_attn.{p}_proj.weight" for p in "qkvo"])]]
CONVERTER = KeyMapConverter(
    [*[Rename(k, k) for k in KEYS],
     FuseExperts(f"{L}.mlp.experts.{{e}}.gate_proj.weight", f"{L}.mlp.experts.{{e}}.up_proj.weight",
                 f"{L}.mlp.experts.gate_up_proj"),
     StackExperts(f"{L}.mlp.experts.{{e}}.down_proj.weight", f"{L}.mlp.experts.down_proj")],
    misreadings={GATE_UP_SWAPPED: swap_expert_names("gate_proj", "up_proj")})
PAIRS = tuple(ModulePair(n, n, role) for n, role in (
    ("model.embed_tokens", "hidden"), (f"{L}.self_attn", "hidden"), (f"{L}.mlp.gate", "router"),
    (f"{L}.mlp.experts", "experts"), (f"{L}.mlp", "hidden"), ("model.norm", "hidden"), ("lm_head", "hidden")))


def candidate(config):
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    # the team trains packed documents: with its cache on, transformers lets them attend to each other
    config.use_cache = False
    return Qwen3MoeForCausalLM(config)


ARCH = base.replace(name="hf_qwen3_moe", candidate=candidate, converter=CONVERTER, probes=Probes(pairs=PAIRS),
                    decoding=None, kernels=(), expert_parallel=None)
