"""State-dict converters as one explicit key map.

A converter maps the **on-disk** HF checkpoint (what ``save_pretrained`` writes: per-expert
keys for most archs) to the candidate's state dict and back. It is declared as a list of rules;
``{i}`` in a name stands for the layer index, ``{e}`` for the expert index:

- ``Rename(hf, cand)``: one tensor, renamed;
- ``StackExperts(hf, cand, transposed=False)``: per-expert tensors ``...experts.{e}...``
  stacked along dim 0 in expert order ([E, out, in]; ``transposed``: [E, in, out]), split back
  on the way out;
- ``FuseExperts(gate, up, cand, interleaved=False, transposed=False)``: per-expert gate and up
  projections fused into one [E, 2I, H] tensor (gate rows then up rows; ``interleaved``: gate
  and up rows alternate; ``transposed``: [E, H, 2I]);
- ``Concat(hfs, cand, dim=0)``: several tensors concatenated (a fused qkv projection);
- ``Transform(hf, cands, split, join)``: one on-disk tensor that is several candidate tensors
  (gpt-oss's fused, transposed, interleaved ``gate_up_proj``);
- ``Tied(hf, cand, source, tied, in_state)``: a tensor that the config may tie to another (the LM
  head to the embeddings): untied, a ``Rename``; tied, it has no on-disk key (``save_pretrained``
  writes the embedding once), and ``to_hf`` drops it after checking it still equals ``source``
  (wherever a state holds it); ``to_candidate`` fills it from ``source`` when the candidate's
  state dict holds the alias (``in_state``), else leaves it to the candidate's own tie. A tied
  config whose checkpoint holds the key is an error.

Every key must be claimed by a rule, in both directions: an unexpected key is an error that
names it, never silently dropped. Expert numbering is validated (transformers' own loader does
not: FACTS.md), so a gap or a duplicate fails loudly. Known misreadings of the on-disk format
(gate/up swapped, an interleave read as halves) are named here too, so diagnoses can say which
one a candidate computes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from .contract import ModulePair

__all__ = [
    "Concat", "ConversionError", "FuseExperts", "KeyMapConverter", "ModulePair", "Rename", "StackExperts",
    "Tied", "Transform", "tie_word_embeddings", "GATE_UP_SWAPPED", "SWIGLU_NAMES", "MIXTRAL_NAMES", "swap_expert_names",
]


class ConversionError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


# --------------------------------------------------------------------------------------------
# Rules. Each claims some on-disk templates (``hfs``) and candidate templates (``cands``) and
# converts one group (one layer's matches) between them.


@dataclass(frozen=True)
class Rename:
    hf: str
    cand: str

    @property
    def hfs(self):
        return (self.hf,)

    @property
    def cands(self):
        return (self.cand,)

    def to_cand(self, parts):
        return [parts[0]]

    def to_disk(self, cands):
        return [cands[0]]


@dataclass(frozen=True)
class StackExperts:
    hf: str  # must contain {e}
    cand: str
    transposed: bool = False

    @property
    def hfs(self):
        return (self.hf,)

    @property
    def cands(self):
        return (self.cand,)

    def to_cand(self, parts):
        experts = [t.transpose(-1, -2) if self.transposed else t for t in parts[0]]
        return [torch.stack(experts).contiguous()]

    def to_disk(self, cands):
        stacked = cands[0].transpose(-1, -2) if self.transposed else cands[0]
        return [[stacked[e].clone() for e in range(stacked.shape[0])]]  # safetensors refuses shared views

    def expert_slices(self, cand_tensor: torch.Tensor, e: int) -> dict[int, torch.Tensor]:
        """{hf template index: the on-disk tensor of expert e} as held by the candidate."""
        t = cand_tensor[e]
        return {0: t.transpose(-1, -2) if self.transposed else t}


@dataclass(frozen=True)
class FuseExperts:
    gate: str  # per-expert on-disk templates, with {e}
    up: str
    cand: str
    interleaved: bool = False
    transposed: bool = False

    @property
    def hfs(self):
        return (self.gate, self.up)

    @property
    def cands(self):
        return (self.cand,)

    def _fuse(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # [I, H] x2 -> [2I, H]
        fused = torch.stack((gate, up), dim=1).flatten(0, 1) if self.interleaved else torch.cat((gate, up), dim=0)
        return fused.transpose(-1, -2) if self.transposed else fused

    def _split(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fused = fused.transpose(-1, -2) if self.transposed else fused
        if self.interleaved:
            return fused[0::2].contiguous(), fused[1::2].contiguous()
        half = fused.shape[0] // 2
        return fused[:half].contiguous(), fused[half:].contiguous()

    def to_cand(self, parts):
        return [torch.stack([self._fuse(g, u) for g, u in zip(parts[0], parts[1])]).contiguous()]

    def to_disk(self, cands):
        pairs = [self._split(cands[0][e]) for e in range(cands[0].shape[0])]
        return [[g for g, _ in pairs], [u for _, u in pairs]]

    def expert_slices(self, cand_tensor: torch.Tensor, e: int) -> dict[int, torch.Tensor]:
        gate, up = self._split(cand_tensor[e])
        return {0: gate, 1: up}


@dataclass(frozen=True)
class Concat:
    hfs: tuple[str, ...]  # e.g. the q, k and v projections
    cand: str
    dim: int = 0

    @property
    def cands(self):
        return (self.cand,)

    def to_cand(self, parts):
        return [torch.cat(parts, dim=self.dim).contiguous()]

    def to_disk(self, cands, sizes):  # sizes from KeyMapConverter.concat_sizes(config): never guessed from shapes
        return [t.contiguous() for t in cands[0].split(list(sizes), dim=self.dim)]


@dataclass(frozen=True)
class Transform:
    hf: str
    cands: tuple[str, ...]
    split: object  # hf tensor -> tuple of candidate tensors
    join: object  # candidate tensors -> hf tensor

    @property
    def hfs(self):
        return (self.hf,)

    def to_cand(self, parts):
        return list(self.split(parts[0]))

    def to_disk(self, cands):
        return [self.join(*cands)]


def tie_word_embeddings(config) -> bool | None:
    """The config's tie flag (the language model's: a nested ``text_config`` when there is one);
    None without a config."""
    if config is None:
        return None
    text = getattr(config, "text_config", None)
    return bool(getattr(text if text is not None else config, "tie_word_embeddings", False))


@dataclass(frozen=True)
class Tied:
    hf: str  # the on-disk key when untied (lm_head.weight)
    cand: str  # the candidate tensor (output.weight)
    source: str  # the candidate tensor it is tied to (tok_embeddings.weight)
    tied: object = tie_word_embeddings  # config -> bool | None (None: no config given)
    in_state: bool = True  # whether the candidate's state_dict() names the tied alias too

    @property
    def hfs(self):
        return (self.hf,)

    @property
    def cands(self):
        return (self.cand,)

    def to_cand(self, parts):
        return [parts[0]]

    def to_disk(self, cands):
        return [cands[0]]


def _some(keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else "")


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{escaped}$")


def _per_expert(template: str) -> bool:
    return "{e}" in template


class KeyMapConverter:
    """``to_candidate`` / ``to_hf`` from a declarative rule list. ``concat_sizes`` gives, per
    ``Concat`` candidate template, the row counts of its parts (``config -> sizes``) so the
    fused tensor splits back without guessing from shapes."""

    def __init__(self, rules: list, *, modules: list[ModulePair] = (), disk_prefix: str = "",
                 misreadings: dict | None = None, concat_sizes: dict | None = None):
        self.rules = list(rules)
        self.modules = list(modules)
        self.disk_prefix = disk_prefix
        # Known ways to misread this format, each as "on-disk state -> the state that, read
        # correctly, computes what the misreading computes"; a diagnosis that finds a match can
        # name the fault ("gate and up are swapped") rather than say "matches nothing".
        self.misreadings = dict(misreadings or {})
        self.concat_sizes = dict(concat_sizes or {})
        self._hf = [(_pattern(disk_prefix + t), r, n, index) for index, r in enumerate(self.rules) for n, t in enumerate(r.hfs)]
        self._cand = [(_pattern(t), r, n, index) for index, r in enumerate(self.rules) for n, t in enumerate(r.cands)]

    # ---- HF on-disk -> candidate
    def to_candidate(self, hf_sd: dict[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
        groups: dict[tuple[int, str | None], dict[int, object]] = defaultdict(dict)
        unexpected = []
        for key, tensor in hf_sd.items():
            found = self._match(self._hf, key)
            if found is None:
                unexpected.append(key)
                continue
            rule, n, m, index = found
            layer = m.groupdict().get("i")
            slot = groups[(index, layer)]
            if _per_expert(rule.hfs[n]):
                experts = slot.setdefault(n, {})
                e = int(m.group("e"))
                if e in experts:
                    raise ConversionError(f"expert {e} appears twice for {rule.hfs[n]} (key {key})")
                experts[e] = tensor
            else:
                slot[n] = tensor
        if unexpected:
            raise ConversionError(f"no conversion rule for checkpoint key(s): {_some(unexpected)}")
        out: dict[str, torch.Tensor] = {}
        tied_rules = [r for r in self.rules if isinstance(r, Tied)]
        for (index, layer), parts in groups.items():
            rule = self.rules[index]
            if isinstance(rule, Tied) and rule.tied(config):
                raise ConversionError(f"checkpoint key {self.disk_prefix}{rule.hf} is present, but the config ties it to "
                                      f"the embeddings (tie_word_embeddings=True): a tied checkpoint stores it once, as "
                                      f"the embedding; which one is meant?")
            cand_keys = [t.format(i=layer) if "{i}" in t else t for t in rule.cands]
            missing = [rule.hfs[n] for n in range(len(rule.hfs)) if n not in parts]
            if missing:
                raise ConversionError(f"{', '.join(cand_keys)} needs checkpoint key(s) "
                                      f"{', '.join(self.disk_prefix + m.format(i=layer, e='E') for m in missing)}")
            ordered = []
            for n, template in enumerate(rule.hfs):
                if _per_expert(template):
                    experts = parts[n]
                    gaps = sorted(set(range(max(experts) + 1)) - set(experts))
                    if gaps:
                        raise ConversionError(f"{cand_keys[0]}: checkpoint lacks expert(s) {gaps} of {template} "
                                              f"(found {sorted(experts)})")
                    ordered.append([experts[e] for e in range(len(experts))])
                else:
                    ordered.append(parts[n])
            out.update(zip(cand_keys, rule.to_cand(ordered)))
        for rule in tied_rules:
            present = any(self.rules[i] is rule for i, _ in groups)
            if rule.in_state and (rule.tied(config) or (rule.tied(config) is None and not present)):
                if rule.source not in out:
                    raise ConversionError(f"{rule.cand} is tied to {rule.source}, which the checkpoint does not give")
                out[rule.cand] = out[rule.source].clone()
        return out

    # ---- candidate -> HF on-disk
    def to_hf(self, cand_sd: dict[str, torch.Tensor], config=None) -> dict[str, torch.Tensor]:
        groups: dict[tuple[int, str | None], dict[int, torch.Tensor]] = defaultdict(dict)
        unexpected = []
        for key, tensor in cand_sd.items():
            found = self._match(self._cand, key)
            if found is None:
                unexpected.append(key)
                continue
            rule, n, m, index = found
            groups[(index, m.groupdict().get("i"))][n] = tensor
        if unexpected:
            raise ConversionError(f"no conversion rule for candidate key(s): {_some(unexpected)}")
        out: dict[str, torch.Tensor] = {}
        for (index, layer), parts in groups.items():
            rule = self.rules[index]
            fill = lambda t, **kw: self.disk_prefix + t.format(i=layer, **kw)  # noqa: E731
            missing = [t for n, t in enumerate(rule.cands) if n not in parts]
            if missing:
                raise ConversionError(f"{', '.join(fill(t, e='E') for t in rule.hfs)} needs candidate key(s) "
                                      f"{', '.join(t.format(i=layer) for t in missing)}")
            cands = [parts[n] for n in range(len(rule.cands))]
            if isinstance(rule, Tied):
                source = cand_sd.get(rule.source)
                tied = rule.tied(config)
                same = (source is not None and source.shape == cands[0].shape
                        and (source.is_meta or cands[0].is_meta or torch.equal(source, cands[0])))  # meta: shapes only
                if tied and not same:
                    raise ConversionError(
                        f"{rule.cand} is tied to {rule.source} (tie_word_embeddings=True) but holds different values: "
                        f"the candidate's head is not tied, and a tied checkpoint has room for only one of them")
                if tied or (tied is None and same):
                    continue
            if isinstance(rule, Concat):
                sizes = self.concat_sizes.get(rule.cand)
                if sizes is None or config is None:
                    raise ConversionError(f"{rule.cand}: a Concat rule needs concat_sizes[{rule.cand!r}](config) "
                                          f"and the config to split back")
                disk = rule.to_disk(cands, sizes(config))
            else:
                disk = rule.to_disk(cands)
            for template, value in zip(rule.hfs, disk):
                if _per_expert(template):
                    out.update((fill(template, e=e), t) for e, t in enumerate(value))
                else:
                    out[fill(template)] = value
        return out

    def module_pairs(self, num_layers: int) -> list[ModulePair]:
        """Submodule correspondences, in the reference model's own namespace (no disk prefix)."""
        return expand_pairs(self.modules, num_layers)

    # ---- where a candidate tensor's experts come from (expert fingerprints)
    def expert_sources(self, cand_key: str) -> tuple[object, list[str]] | None:
        """For a stacked/fused candidate expert tensor: (rule, on-disk templates with {e} and
        the layer filled in, prefix included); None for other tensors."""
        found = self._match(self._cand, cand_key)
        if found is None or not hasattr(found[0], "expert_slices"):
            return None
        rule, _, m, _ = found
        layer = m.groupdict().get("i")
        return rule, [self.disk_prefix + t.replace("{i}", str(layer)) for t in rule.hfs]

    @staticmethod
    def _match(patterns, key):
        for pattern, rule, n, index in patterns:
            m = pattern.match(key)
            if m:
                return rule, n, m, index
        return None


def expand_pairs(pairs, num_layers: int) -> list[ModulePair]:
    out = []
    for p in pairs:
        layers = range(num_layers) if "{i}" in p.ref else [None]
        out += [ModulePair(p.ref.format(i=i), p.cand.format(i=i), p.role, i) for i in layers]
    return out


# --------------------------------------------------------------------------------------------
# Known misreadings of the on-disk expert format, for diagnoses that name the fault.

SWIGLU_NAMES = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = ("w1", "w3", "w2")
GATE_UP_SWAPPED = "gate and up projections are swapped"
INTERLEAVE_READ_AS_HALVES = "gate/up read as concatenated halves, but the file interleaves them column by column"


def swap_expert_names(gate: str, up: str):
    """On-disk gate/up exchange for per-expert checkpoints."""
    def swap(state):
        pattern = re.compile(rf"(experts\.\d+\.)({re.escape(gate)}|{re.escape(up)})\b")
        other = {gate: up, up: gate}
        return {pattern.sub(lambda m: m.group(1) + other[m.group(2)], k): v for k, v in state.items()}
    return swap


def _on_fused_gate_up(fn):
    def apply(state):
        return {k: (fn(v).contiguous() if k.endswith(("experts.gate_up_proj", "experts.gate_up_proj_bias")) else v)
                for k, v in state.items()}
    return apply


# gate/up exchanged within each interleaved pair (gpt-oss's fused on-disk gate_up_proj)
swap_interleaved = _on_fused_gate_up(lambda v: v.unflatten(-1, (-1, 2)).flip(-1).flatten(-2))
# what a reader that takes the halves (gate = first I columns) computes, laid out interleaved
concatenated_misread = _on_fused_gate_up(lambda v: v.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2))
