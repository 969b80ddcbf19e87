"""The native candidate's converter and probes: transformers' on-disk naming <-> the native
model's own names, declared with the library's rules like any team's converter.

One builder covers every built-in arch, along the few dimensions in which their checkpoints
differ: GQA or MLA attention; the MoE block's on-disk name (``mlp``; Mixtral/MiniMax
``block_sparse_moe``) and its router's (``gate``; gpt-oss ``router``); experts per expert under
(gate, up, down) names or gpt-oss's fused interleaved ``gate_up_proj``; where the correction bias
sits; shared experts and an optional shared-expert gate; dense layers as ``mlp.*_proj``.
"""

from __future__ import annotations

import torch

from moe_conformance.contract import ModulePair
from moe_conformance.convert import (
    GATE_UP_SWAPPED,
    INTERLEAVE_READ_AS_HALVES,
    SWIGLU_NAMES,
    KeyMapConverter,
    Rename,
    StackExperts,
    Tied,
    Transform,
    concatenated_misread,
    swap_expert_names,
    swap_interleaved,
)

_ATTENTION = {
    "gqa": {
        "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
        "q_norm": "q_norm", "k_norm": "k_norm",
    },
    "mla": {
        "q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
        "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
    },
}
_CAND_PROJ = ("w1", "w3", "w2")  # the native model's gate, up, down
_MTP = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "embed_tokens": "embed",
        "shared_head.norm": "norm", "shared_head.head": "head"}


def _interleaved_split(t):  # [E, H, 2I] (gate, up interleaved) -> gate, up as [E, I, H]
    t = t.transpose(-1, -2)
    return t[:, 0::2].contiguous(), t[:, 1::2].contiguous()


def _interleaved_join(gate, up):
    return torch.stack((gate, up), dim=2).flatten(1, 2).transpose(-1, -2).contiguous()


def _halves_split(t):  # [E, H, 2I] (gate columns, then up) -> gate, up as [E, I, H]
    t = t.transpose(-1, -2)
    half = t.shape[1] // 2
    return t[:, :half].contiguous(), t[:, half:].contiguous()


def _halves_join(gate, up):
    return torch.cat((gate, up), dim=1).transpose(-1, -2).contiguous()


def swap_halves(state):  # gate/up exchanged in a [.., H, 2I] fused tensor of halves
    return {k: (v.unflatten(-1, (2, -1)).flip(-2).flatten(-2).contiguous() if k.endswith("experts.gate_up_proj") else v)
            for k, v in state.items()}


def _interleaved_bias_split(t):  # [E, 2I] -> [E, I], [E, I]
    return t[:, 0::2].contiguous(), t[:, 1::2].contiguous()


def _interleaved_bias_join(gate, up):
    return torch.stack((gate, up), dim=2).flatten(1, 2).contiguous()


def native_converter(
    attention: str = "gqa",
    *,
    moe: str = "mlp",
    router: str = "gate",
    experts: tuple[str, str, str] | str = SWIGLU_NAMES,
    correction_bias_at: str = "router",
    shared: str = "shared_experts",
    shared_gate: str | None = None,
    disk_prefix: str = "",
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm"),
    dense: str = "mlp",
) -> KeyMapConverter:
    L, C = "model.layers.{i}", "layers.{i}"
    M = f"{L}.{moe}"
    cand_bias = f"{C}.moe.router.expert_bias"
    if correction_bias_at == "moe_statics":  # ERNIE 4.5: a [1, E] "statistics" tensor beside the router
        bias_rule = Transform(f"{M}.moe_statics.e_score_correction_bias", (cand_bias,),
                              lambda t: (t.reshape(-1).contiguous(),), lambda b: b.reshape(1, -1).contiguous())
    else:
        bias_rule = Rename(f"{M}.{router}.e_score_correction_bias" if correction_bias_at == "router"
                           else f"{M}.e_score_correction_bias", cand_bias)
    rules: list = [
        Rename("model.embed_tokens.weight", "tok_embeddings.weight"),
        Rename("model.norm.weight", "norm.weight"),
        # no lm_head on disk when the config ties it to the embeddings
        Tied("lm_head.weight", "output.weight", source="tok_embeddings.weight", in_state=False),
        Rename(f"{L}.input_layernorm.weight", f"{C}.attention_norm.weight"),
        Rename(f"{L}.post_attention_layernorm.weight", f"{C}.ffn_norm.weight"),
        Rename(f"{L}.self_attn.sinks", f"{C}.attention.sinks"),
        Rename(f"{M}.{router}.weight", f"{C}.moe.router.gate.weight"),
        Rename(f"{M}.{router}.bias", f"{C}.moe.router.gate.bias"),
        bias_rule,
        Rename(f"{M}.{shared}.gate_proj.weight", f"{C}.moe.shared_experts.w1.weight"),
        Rename(f"{M}.{shared}.up_proj.weight", f"{C}.moe.shared_experts.w3.weight"),
        Rename(f"{M}.{shared}.down_proj.weight", f"{C}.moe.shared_experts.w2.weight"),
    ]
    if shared_gate:
        rules.append(Rename(f"{M}.{shared_gate}.weight", f"{C}.moe.shared_gate.weight"))
    # MTP layers (DeepSeek-V3 / GLM-4.5), after the decoder layers: their decoder block maps like
    # any layer's; these are the MTP projection and the layer's own embedding and head
    rules += [Rename(f"{L}.{hf}.weight", f"{C}.mtp.{cand}.weight") for hf, cand in _MTP.items()]
    names = {**_ATTENTION[attention]}
    if attention == "gqa":
        names = {**{k: v for k, v in names.items() if k not in ("q_norm", "k_norm")},
                 qk_norm_names[0]: "q_norm", qk_norm_names[1]: "k_norm"}
    for hf, cand in names.items():
        rules += [Rename(f"{L}.self_attn.{hf}.{t}", f"{C}.attention.{cand}.{t}") for t in ("weight", "bias")]
    if experts == "fused_interleaved":
        E = f"{M}.experts"
        rules += [
            Transform(f"{E}.gate_up_proj", (f"{C}.moe.experts.w1", f"{C}.moe.experts.w3"), _interleaved_split, _interleaved_join),
            Transform(f"{E}.gate_up_proj_bias", (f"{C}.moe.experts.b1", f"{C}.moe.experts.b3"),
                      _interleaved_bias_split, _interleaved_bias_join),
            Transform(f"{E}.down_proj", (f"{C}.moe.experts.w2",), lambda t: (t.transpose(-1, -2).contiguous(),),
                      lambda w2: w2.transpose(-1, -2).contiguous()),
            Rename(f"{E}.down_proj_bias", f"{C}.moe.experts.b2"),
        ]
        misreadings = {GATE_UP_SWAPPED: swap_interleaved, INTERLEAVE_READ_AS_HALVES: concatenated_misread}
    elif experts == "fused_halves":  # Llama 4: gate_up_proj [E, H, 2I] (gate columns, then up), down [E, I, H]
        E = f"{M}.experts"
        rules += [
            Transform(f"{E}.gate_up_proj", (f"{C}.moe.experts.w1", f"{C}.moe.experts.w3"), _halves_split, _halves_join),
            Transform(f"{E}.down_proj", (f"{C}.moe.experts.w2",), lambda t: (t.transpose(-1, -2).contiguous(),),
                      lambda w2: w2.transpose(-1, -2).contiguous()),
        ]
        misreadings = {GATE_UP_SWAPPED: swap_halves}
    else:
        rules += [StackExperts(f"{M}.experts.{{e}}.{hf}.weight", f"{C}.moe.experts.{cand}") for hf, cand in zip(experts, _CAND_PROJ)]
        misreadings = {GATE_UP_SWAPPED: swap_expert_names(experts[0], experts[1])}
    rules += [Rename(f"{L}.{dense}.{hf}.weight", f"{C}.feed_forward.{cand}.weight") for hf, cand in zip(SWIGLU_NAMES, _CAND_PROJ)]
    return KeyMapConverter(rules, disk_prefix=disk_prefix, misreadings=misreadings)


def native_pairs(attention: str = "gqa", *, router: str = "gate", shared: str = "shared_experts",
                 qk_norm_names: tuple[str, str] = ("q_norm", "k_norm"), block: str = "mlp",
                 experts_pair: bool = True) -> list[ModulePair]:
    """(reference, native) submodule pairs, in transformers' in-memory names (the MoE block is
    always ``mlp`` there, whatever the on-disk name; the router module is ``gate``/``router``,
    whatever weight inside it the checkpoint names)."""
    L, C = "model.layers.{i}", "layers.{i}"
    R = "router" if router == "router" else "gate"
    memory_shared = shared
    names = dict(_ATTENTION[attention])
    if attention == "gqa":
        names = {**{k: v for k, v in names.items() if k not in ("q_norm", "k_norm")},
                 qk_norm_names[0]: "q_norm", qk_norm_names[1]: "k_norm"}
    return [
        ModulePair("model.embed_tokens", "tok_embeddings"),
        ModulePair(f"{L}.input_layernorm", f"{C}.attention_norm"),
        *[ModulePair(f"{L}.self_attn.{hf}", f"{C}.attention.{cand}") for hf, cand in names.items()],
        ModulePair(f"{L}.self_attn", f"{C}.attention"),
        ModulePair(f"{L}.post_attention_layernorm", f"{C}.ffn_norm"),
        ModulePair(f"{L}.{block}.{R}", f"{C}.moe.router", role="router"),
        # (Llama 4's experts take the routed, sorted input, not (x, indices, weights): no pair)
        *([ModulePair(f"{L}.{block}.experts", f"{C}.moe.experts", role="experts")] if experts_pair else []),
        ModulePair(f"{L}.{block}.{memory_shared}", f"{C}.moe.shared_experts"),
        ModulePair(f"{L}.{block}", f"{C}.moe"),
        ModulePair(f"{L}.{block}", f"{C}.feed_forward"),
        ModulePair(L, C),
        ModulePair("model.norm", "norm"),
        ModulePair("lm_head", "output"),
    ]
