"""State-dict converters as one explicit key map.

A converter maps the **on-disk** HF checkpoint (what ``save_pretrained`` writes: per-expert
keys for most archs) to the candidate's state dict and back. It is declared as a list of rules:

- ``Rename(hf, cand)``: one tensor, renamed (``{i}`` stands for the layer index);
- ``StackExperts(hf, cand)``: per-expert tensors ``...experts.{e}...`` stacked along dim 0 in
  expert order, and split back on the way out;
- ``Transform(hf, cands, split, join)``: one on-disk tensor that is several candidate tensors
  (gpt-oss's fused, transposed, interleaved ``gate_up_proj``).

Every key must be claimed by a rule, in both directions: an unexpected key is an error that
names it, never silently dropped. Expert numbering is validated (transformers' own loader does
not: FACTS.md), so a gap or a duplicate fails loudly.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch


class ConversionError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class Rename:
    hf: str
    cand: str


@dataclass(frozen=True)
class StackExperts:
    hf: str  # must contain {e}
    cand: str


@dataclass(frozen=True)
class Transform:
    hf: str
    cands: tuple[str, ...]
    split: object  # hf tensor -> tuple of candidate tensors
    join: object  # candidate tensors -> hf tensor


@dataclass(frozen=True)
class ModulePair:
    """A reference submodule and the candidate submodule that computes the same thing.
    ``role`` tells the comparator how to read the outputs (``router``: (logits, weights, indices))."""

    ref: str
    cand: str
    role: str = "hidden"


def _some(keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{escaped}$")


class KeyMapConverter:
    """``to_candidate`` / ``to_hf`` / ``module_pairs`` from a declarative rule list."""

    def __init__(self, rules: list[Rename | StackExperts | Transform], *, modules: list[ModulePair] = (),
                 disk_prefix: str = "", misreadings: dict | None = None):
        self.rules = list(rules)
        self.modules = list(modules)
        self.disk_prefix = disk_prefix
        # Known ways to misread this format, each as "on-disk state -> the state that, read
        # correctly, computes what the misreading computes"; a diagnosis that finds a match can
        # name the fault ("gate and up are swapped") rather than say "matches nothing".
        self.misreadings = dict(misreadings or {})
        self._hf = [(_pattern(disk_prefix + r.hf), r) for r in self.rules]
        self._cand = [(_pattern(c), r) for r in self.rules for c in (r.cands if isinstance(r, Transform) else [r.cand])]

    # ---- HF on-disk -> candidate
    def to_candidate(self, hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        stacks: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)
        unexpected = []
        for key, tensor in hf_sd.items():
            rule, m = self._match(self._hf, key)
            if rule is None:
                unexpected.append(key)
            elif isinstance(rule, StackExperts):
                cand_key = rule.cand.format(i=m.group("i")) if "{i}" in rule.cand else rule.cand
                expert = int(m.group("e"))
                if expert in stacks[(cand_key, rule.hf)]:
                    raise ConversionError(f"expert {expert} appears twice for {cand_key} (key {key})")
                stacks[(cand_key, rule.hf)][expert] = tensor
            elif isinstance(rule, Transform):
                out.update(zip((self._fill(c, m) for c in rule.cands), rule.split(tensor)))
            else:
                out[self._fill(rule.cand, m)] = tensor
        if unexpected:
            raise ConversionError(f"no conversion rule for checkpoint key(s): {_some(unexpected)}")
        for (cand_key, hf_template), experts in stacks.items():
            missing = sorted(set(range(max(experts) + 1)) - set(experts))
            if missing:
                raise ConversionError(
                    f"{cand_key}: checkpoint lacks expert(s) {missing} of {hf_template} (found {sorted(experts)})"
                )
            out[cand_key] = torch.stack([experts[e] for e in range(len(experts))])
        return out

    # ---- candidate -> HF on-disk
    def to_hf(self, cand_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        unexpected = []
        joins = {}
        for key, tensor in cand_sd.items():
            rule, m = self._match(self._cand, key)
            if rule is None:
                unexpected.append(key)
            elif isinstance(rule, Transform):
                joins[self.disk_prefix + self._fill(rule.hf, m)] = (rule, [self._fill(c, m) for c in rule.cands])
            elif isinstance(rule, StackExperts):
                for e in range(tensor.shape[0]):
                    hf_key = self.disk_prefix + rule.hf.format(i=m.groupdict().get("i"), e=e)
                    out[hf_key] = tensor[e].clone()  # safetensors refuses views that share storage
            else:
                out[self.disk_prefix + self._fill(rule.hf, m)] = tensor
        if unexpected:
            raise ConversionError(f"no conversion rule for candidate key(s): {_some(unexpected)}")
        for hf_key, (rule, parts) in joins.items():
            missing = [p for p in parts if p not in cand_sd]
            if missing:
                raise ConversionError(f"{hf_key} needs candidate key(s) {', '.join(missing)}")
            out[hf_key] = rule.join(*(cand_sd[p] for p in parts))
        return out

    def module_pairs(self, num_layers: int) -> list[ModulePair]:
        """Submodule correspondences, in the reference model's own namespace (no disk prefix)."""
        pairs = []
        for p in self.modules:
            layers = range(num_layers) if "{i}" in p.ref else [None]
            pairs += [ModulePair(p.ref.format(i=i), p.cand.format(i=i), p.role) for i in layers]
        return pairs

    @staticmethod
    def _match(patterns, key):
        for pattern, rule in patterns:
            m = pattern.match(key)
            if m:
                return rule, m
        return None, None

    @staticmethod
    def _fill(template: str, m: re.Match) -> str:
        return template.format(**m.groupdict()) if "{" in template else template


# --------------------------------------------------------------------------------------------
# transformers' on-disk naming, shared by every arch whose checkpoints use it. One builder with
# the few dimensions along which the families differ.

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
_CAND_PROJ = ("w1", "w3", "w2")  # the candidate's gate, up, down
SWIGLU_NAMES = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ("w1", "w3", "w2")


def swap_expert_names(gate: str, up: str):
    """On-disk gate/up exchange for per-expert checkpoints."""
    def swap(state):
        pattern = re.compile(rf"(experts\.\d+\.)({re.escape(gate)}|{re.escape(up)})\b")
        other = {gate: up, up: gate}
        return {pattern.sub(lambda m: m.group(1) + other[m.group(2)], k): v for k, v in state.items()}
    return swap


def _interleaved_split(t):  # [E, H, 2I] (gate, up interleaved) -> gate, up as [E, I, H]
    t = t.transpose(-1, -2)
    return t[:, 0::2].contiguous(), t[:, 1::2].contiguous()


def _interleaved_join(gate, up):
    return torch.stack((gate, up), dim=2).flatten(1, 2).transpose(-1, -2).contiguous()


def _interleaved_bias_split(t):  # [E, 2I] -> [E, I], [E, I]
    return t[:, 0::2].contiguous(), t[:, 1::2].contiguous()


def _interleaved_bias_join(gate, up):
    return torch.stack((gate, up), dim=2).flatten(1, 2).contiguous()


def _on_fused_gate_up(fn):
    def apply(state):
        return {k: (fn(v).contiguous() if k.endswith(("experts.gate_up_proj", "experts.gate_up_proj_bias")) else v)
                for k, v in state.items()}
    return apply


# gate/up exchanged within each interleaved pair
_swap_interleaved = _on_fused_gate_up(lambda v: v.unflatten(-1, (-1, 2)).flip(-1).flatten(-2))
# what a reader that takes the halves (gate = first I columns) computes, laid out interleaved
_concatenated_misread = _on_fused_gate_up(lambda v: v.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2))

GATE_UP_SWAPPED = "gate and up projections are swapped"


def transformers_style(
    attention: str = "gqa",
    *,
    moe: str = "mlp",
    router: str = "gate",
    experts: tuple[str, str, str] | str = SWIGLU_NAMES,
    correction_bias_at: str = "router",
    shared: str = "shared_experts",
    shared_gate: str | None = None,
    disk_prefix: str = "",
) -> KeyMapConverter:
    """Converter for checkpoints written by transformers' ``save_pretrained``:
    ``model.layers.N.self_attn.*`` (GQA or MLA), an MoE block named ``moe`` on disk (``mlp``;
    Mixtral/MiniMax: ``block_sparse_moe``) with its ``router`` (``gate``; gpt-oss: ``router``),
    experts per expert under the given (gate, up, down) names or ``"fused_interleaved"``
    (gpt-oss), the correction bias on the router or on the block, shared experts and an
    optional shared-expert gate, dense layers as ``mlp.{gate,up,down}_proj``."""
    L, C = "model.layers.{i}", "layers.{i}"
    M = f"{L}.{moe}"
    bias_key = f"{M}.{router}.e_score_correction_bias" if correction_bias_at == "router" else f"{M}.e_score_correction_bias"
    rules: list = [
        Rename("model.embed_tokens.weight", "tok_embeddings.weight"),
        Rename("model.norm.weight", "norm.weight"),
        Rename("lm_head.weight", "output.weight"),
        Rename(f"{L}.input_layernorm.weight", f"{C}.attention_norm.weight"),
        Rename(f"{L}.post_attention_layernorm.weight", f"{C}.ffn_norm.weight"),
        Rename(f"{L}.self_attn.sinks", f"{C}.attention.sinks"),
        Rename(f"{M}.{router}.weight", f"{C}.moe.router.gate.weight"),
        Rename(f"{M}.{router}.bias", f"{C}.moe.router.gate.bias"),
        Rename(bias_key, f"{C}.moe.router.expert_bias"),
        Rename(f"{M}.{shared}.gate_proj.weight", f"{C}.moe.shared_experts.w1.weight"),
        Rename(f"{M}.{shared}.up_proj.weight", f"{C}.moe.shared_experts.w3.weight"),
        Rename(f"{M}.{shared}.down_proj.weight", f"{C}.moe.shared_experts.w2.weight"),
    ]
    if shared_gate:
        rules.append(Rename(f"{M}.{shared_gate}.weight", f"{C}.moe.shared_gate.weight"))
    for hf, cand in _ATTENTION[attention].items():
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
        misreadings = {
            GATE_UP_SWAPPED: _swap_interleaved,
            "gate/up read as concatenated halves, but the file interleaves them column by column": _concatenated_misread,
        }
    else:
        rules += [StackExperts(f"{M}.experts.{{e}}.{hf}.weight", f"{C}.moe.experts.{cand}") for hf, cand in zip(experts, _CAND_PROJ)]
        misreadings = {GATE_UP_SWAPPED: swap_expert_names(experts[0], experts[1])}
    rules += [Rename(f"{L}.mlp.{hf}.weight", f"{C}.feed_forward.{cand}.weight") for hf, cand in zip(SWIGLU_NAMES, _CAND_PROJ)]

    # Submodule pairs, in transformers' in-memory names (the MoE block is always `mlp` there).
    R = "router" if router == "router" else "gate"
    memory_shared = "shared_expert" if shared == "shared_expert" else "shared_experts"
    modules = [
        ModulePair("model.embed_tokens", "tok_embeddings"),
        ModulePair(f"{L}.input_layernorm", f"{C}.attention_norm"),
        *[ModulePair(f"{L}.self_attn.{hf}", f"{C}.attention.{cand}") for hf, cand in _ATTENTION[attention].items()],
        ModulePair(f"{L}.self_attn", f"{C}.attention"),
        ModulePair(f"{L}.post_attention_layernorm", f"{C}.ffn_norm"),
        ModulePair(f"{L}.mlp.{R}", f"{C}.moe.router", role="router"),
        ModulePair(f"{L}.mlp.experts", f"{C}.moe.experts", role="experts"),
        ModulePair(f"{L}.mlp.{memory_shared}", f"{C}.moe.shared_experts"),
        ModulePair(f"{L}.mlp", f"{C}.moe"),
        ModulePair(f"{L}.mlp", f"{C}.feed_forward"),
        ModulePair(L, C),
        ModulePair("model.norm", "norm"),
        ModulePair("lm_head", "output"),
    ]
    return KeyMapConverter(rules, modules=modules, disk_prefix=disk_prefix, misreadings=misreadings)


def deepseek_style(attention: str, *, disk_prefix: str = "") -> KeyMapConverter:
    """DeepSeek-V3 / GLM-4 MoE / Kimi K2 text towers: the transformers defaults."""
    return transformers_style(attention, disk_prefix=disk_prefix)
