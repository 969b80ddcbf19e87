"""State-dict converters as one explicit key map.

A converter maps the **on-disk** HF checkpoint (what ``save_pretrained`` writes: per-expert
keys for most archs) to the candidate's state dict and back. It is declared as a list of rules:

- ``Rename(hf, cand)``: one tensor, renamed (``{i}`` stands for the layer index);
- ``StackExperts(hf, cand)``: per-expert tensors ``...experts.{e}...`` stacked along dim 0 in
  expert order, and split back on the way out.

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

    def __init__(self, rules: list[Rename | StackExperts], *, modules: list[ModulePair] = (), disk_prefix: str = "",
                 expert_gate_up: tuple[str, str] | None = None):
        self.rules = list(rules)
        # On-disk names of the gate and up projections of an expert, so a diagnosis can say
        # "gate and up are swapped" rather than "matches nothing".
        self.expert_gate_up = expert_gate_up
        self.modules = list(modules)
        self.disk_prefix = disk_prefix
        self._hf = [(_pattern(disk_prefix + r.hf), r) for r in self.rules]
        self._cand = [(_pattern(r.cand), r) for r in self.rules]

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
        for key, tensor in cand_sd.items():
            rule, m = self._match(self._cand, key)
            if rule is None:
                unexpected.append(key)
            elif isinstance(rule, StackExperts):
                for e in range(tensor.shape[0]):
                    hf_key = self.disk_prefix + rule.hf.format(i=m.groupdict().get("i"), e=e)
                    out[hf_key] = tensor[e].clone()  # safetensors refuses views that share storage
            else:
                out[self.disk_prefix + self._fill(rule.hf, m)] = tensor
        if unexpected:
            raise ConversionError(f"no conversion rule for candidate key(s): {_some(unexpected)}")
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
# The DeepSeek/GLM family's on-disk naming, shared by every arch whose checkpoints use it.

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
_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def deepseek_style(attention: str, *, disk_prefix: str = "") -> KeyMapConverter:
    """Converter for checkpoints named like DeepSeek-V3 / GLM-4 MoE / Kimi K2 text towers:
    ``model.layers.N.self_attn.*``, ``mlp.gate`` (+ ``e_score_correction_bias``),
    ``mlp.experts.E.{gate,up,down}_proj``, ``mlp.shared_experts.*``, dense ``mlp.*_proj``."""
    L, C = "model.layers.{i}", "layers.{i}"
    rules: list[Rename | StackExperts] = [
        Rename("model.embed_tokens.weight", "tok_embeddings.weight"),
        Rename("model.norm.weight", "norm.weight"),
        Rename("lm_head.weight", "output.weight"),
        Rename(f"{L}.input_layernorm.weight", f"{C}.attention_norm.weight"),
        Rename(f"{L}.post_attention_layernorm.weight", f"{C}.ffn_norm.weight"),
        Rename(f"{L}.mlp.gate.weight", f"{C}.moe.router.gate.weight"),
        Rename(f"{L}.mlp.gate.e_score_correction_bias", f"{C}.moe.router.expert_bias"),
    ]
    for hf, cand in _ATTENTION[attention].items():
        rules += [Rename(f"{L}.self_attn.{hf}.{t}", f"{C}.attention.{cand}.{t}") for t in ("weight", "bias")]
    for hf, cand in _PROJ.items():
        rules += [
            StackExperts(f"{L}.mlp.experts.{{e}}.{hf}.weight", f"{C}.moe.experts.{cand}"),
            Rename(f"{L}.mlp.shared_experts.{hf}.weight", f"{C}.moe.shared_experts.{cand}.weight"),
            Rename(f"{L}.mlp.{hf}.weight", f"{C}.feed_forward.{cand}.weight"),
        ]
    modules = [
        ModulePair("model.embed_tokens", "tok_embeddings"),
        ModulePair(f"{L}.input_layernorm", f"{C}.attention_norm"),
        *[ModulePair(f"{L}.self_attn.{hf}", f"{C}.attention.{cand}") for hf, cand in _ATTENTION[attention].items()],
        ModulePair(f"{L}.self_attn", f"{C}.attention"),
        ModulePair(f"{L}.post_attention_layernorm", f"{C}.ffn_norm"),
        ModulePair(f"{L}.mlp.gate", f"{C}.moe.router", role="router"),
        ModulePair(f"{L}.mlp.experts", f"{C}.moe.experts", role="experts"),
        ModulePair(f"{L}.mlp.shared_experts", f"{C}.moe.shared_experts"),
        ModulePair(f"{L}.mlp", f"{C}.moe"),
        ModulePair(f"{L}.mlp", f"{C}.feed_forward"),
        ModulePair(L, C),
        ModulePair("model.norm", "norm"),
        ModulePair("lm_head", "output"),
    ]
    return KeyMapConverter(rules, modules=modules, disk_prefix=disk_prefix, expert_gate_up=("gate_proj", "up_proj"))
