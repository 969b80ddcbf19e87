"""Full-size dry run: the released model's config, built on the meta device (no weights).

What a tiny model cannot show: a converter that wraps an expert index past 255, a candidate
whose stacked experts are sized from the wrong config field, a layout that fits on 8 ranks only
on paper. The dry run builds the transformers reference and the candidate from the *released*
config with ``torch.device("meta")`` (shapes and dtypes, no storage), derives the on-disk state
the way ``save_pretrained`` writes it, runs the converters on it both ways, and counts
parameters and per-rank memory.

Released configs are committed as JSON under ``fixtures/released/<name>.json`` (the published
``config.json`` values; provenance in that folder's README). A plugin declares::

    released=released_config("deepseek_v3", DeepseekV3Config)

The on-disk state follows ``save_pretrained``: the reference's state dict, tied weights removed,
``_keys_to_ignore_on_save`` dropped, cast to the release's dtype except what transformers keeps
in fp32 (the model's own dtype plan), then transformers' ``revert_weight_conversion`` back to
per-expert keys, with the converter's ``disk_prefix``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .contract import convert
from .paths import fixtures_dir

# Keys of a released config.json that describe the file or the release's storage rather than
# the model: the bf16 layout transformers writes is what the dry run checks, so a quantization
# scheme (fp8 blocks, int4 groups, mxfp4) is reported, not applied; model_type selects a class,
# which the plugin has done already.
FILE_METADATA_KEYS = frozenset({"architectures", "auto_map", "model_type", "transformers_version", "quantization_config"})

# The per-rank memory figures are computed for these layouts unless the environment says
# otherwise (``MOE_CONFORMANCE_DRY_RUN_LAYOUTS="ep8,ep64,ep16tp2"``).
DEFAULT_LAYOUTS = "ep8,ep64"
LAYOUTS_ENV = "MOE_CONFORMANCE_DRY_RUN_LAYOUTS"

# fp32 master weights + Adam first and second moments, per parameter (mixed-precision AdamW).
OPTIMIZER_BYTES_PER_PARAM = 12
GIB = 2**30


# ------------------------------------------------------------------------------------------
# released configs


def released_path(name: str) -> Path:
    return fixtures_dir() / "released" / f"{name}.json"


def read_released(name: str) -> dict[str, Any]:
    """The committed config.json values of a release, as published (metadata included)."""
    path = released_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no released config {path} (committed configs: {', '.join(known_releases())})")
    return json.loads(path.read_text(encoding="utf-8"))


def known_releases() -> list[str]:
    folder = fixtures_dir() / "released"
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def model_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The config values that shape the model (``FILE_METADATA_KEYS`` dropped)."""
    return {k: copy.deepcopy(v) for k, v in values.items() if k not in FILE_METADATA_KEYS}


def released_config(name: str, build: Callable[..., Any]) -> Callable[[], Any]:
    """``ArchSpec.released`` for a committed release: a function returning a fresh config.

    ``build`` is a transformers config class (called with the values as keywords) or any
    callable taking the values as one dict (kimi_k25: wrap the text tower in its multimodal
    config). The file is read on each call, so a fixture edit needs no restart."""

    def load() -> Any:
        values = model_values(read_released(name))
        return build(**values) if isinstance(build, type) else build(values)

    load.released_name = name  # type: ignore[attr-defined]
    load.describes = f"fixtures/released/{name}.json"  # type: ignore[attr-defined]
    return load


def release_quantization(name: str) -> str:
    """How the release stores its weights on the hub (reported: the dry run checks bf16)."""
    q = read_released(name).get("quantization_config") or {}
    return str(q.get("quant_method", "none")) if isinstance(q, Mapping) else "none"


# ------------------------------------------------------------------------------------------
# schemas: key -> (shape, dtype), the only thing a meta tensor has


class TensorSpec(NamedTuple):
    """A meta tensor's whole content. A tuple, not a dataclass: 70k of them per Kimi dry run."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        return f"{list(self.shape)} {str(self.dtype).removeprefix('torch.')}"


Schema = dict[str, TensorSpec]


def schema_of(state: Mapping[str, torch.Tensor]) -> Schema:
    return {k: TensorSpec(v.shape, v.dtype) for k, v in state.items()}  # torch.Size is a tuple


def natural_key(key: str) -> list:
    """Sort ``experts.10`` after ``experts.9``, so the first listed fault is the first expert."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def schema_problems(expected: Schema, got: Schema, expected_name: str, got_name: str, *, dtypes: bool = True,
                    limit: int = 6) -> list[str]:
    """Differences in key sets, shapes and (unless ``dtypes=False``) dtypes, each naming the
    keys at fault."""
    problems = []
    missing = sorted(expected.keys() - got.keys(), key=natural_key)
    unexpected = sorted(got.keys() - expected.keys(), key=natural_key)
    if missing:
        problems.append(f"{len(missing)} key(s) of {expected_name} missing from {got_name}: "
                        + _listing(missing, expected, limit))
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) of {got_name} not in {expected_name}: "
                        + _listing(unexpected, got, limit))
    # only the differing keys are sorted: the common ones are most of 70k
    differing = [k for k in expected.keys() & got.keys()
                 if expected[k].shape != got[k].shape or (dtypes and expected[k].dtype != got[k].dtype)]
    for key in sorted(differing, key=natural_key):
        e, g = expected[key], got[key]
        if e.shape != g.shape:
            problems.append(f"{key}: shape {list(g.shape)} in {got_name}, {list(e.shape)} in {expected_name}")
        else:
            problems.append(f"{key}: dtype {g.dtype} in {got_name}, {e.dtype} in {expected_name}")
    return problems


def _listing(keys: list[str], schema: Schema, limit: int) -> str:
    shown = ", ".join(f"{k} {schema[k]}" for k in keys[:limit])
    return shown + (f" ... (and {len(keys) - limit} more)" if len(keys) > limit else "")


# ------------------------------------------------------------------------------------------
# parallel layouts


@dataclass(frozen=True)
class Layout:
    """Expert parallel x tensor parallel, the arithmetic kept deliberately simple:

    - each rank holds ``ceil(E / ep)`` whole routed experts of every MoE layer (experts are not
      tensor-parallel: expert-TP 1, as in DeepSeek-style EP training);
    - every other tensor (attention, norms, router, shared experts, dense layers, embeddings,
      head) is split evenly ``tp`` ways and replicated across the EP group (norms, which TP
      replicates in practice, are counted as split: a negligible under-count);
    - training adds 12 bytes per held parameter (fp32 master copy + Adam m and v), with no
      ZeRO sharding over data parallel; activations, gradients buffers and KV cache are out.
    """

    ep: int
    tp: int = 1

    @property
    def label(self) -> str:
        return f"ep{self.ep}_tp{self.tp}"


def parse_layouts(text: str) -> list[Layout]:
    """``"ep8,ep64,ep16tp2"`` -> layouts; each item is ``ep<N>`` with an optional ``tp<M>``."""
    layouts = []
    for item in filter(None, (part.strip().lower() for part in text.split(","))):
        m = re.fullmatch(r"ep(\d+)(?:[_x]?tp(\d+))?", item)
        if not m or int(m.group(1)) < 1 or int(m.group(2) or 1) < 1:
            raise ValueError(f"layout {item!r}: expected ep<N> or ep<N>tp<M> with N, M >= 1 (e.g. ep8, ep16tp2)")
        layouts.append(Layout(int(m.group(1)), int(m.group(2) or 1)))
    return layouts


def layouts_from_env() -> list[Layout]:
    return parse_layouts(os.environ.get(LAYOUTS_ENV, DEFAULT_LAYOUTS))


# ------------------------------------------------------------------------------------------
# parameter counts


@dataclass(frozen=True)
class ParamCounts:
    """Counted on the reference's own module tree: routed experts are the parameters of its
    ``experts`` modules (transformers' MoE blocks name them so; shared experts are separate
    modules and count as always active)."""

    total: int
    routed: int  # all routed-expert parameters, every layer
    num_experts: int
    top_k: int
    total_bytes: int
    routed_bytes: int

    @property
    def always_active(self) -> int:
        return self.total - self.routed

    @property
    def active(self) -> int:
        """Per token: everything that is not a routed expert, plus top_k of the E experts."""
        per_expert = self.routed / self.num_experts if self.num_experts else 0
        return self.always_active + round(per_expert * self.top_k)

    def per_rank(self, layout: Layout) -> dict[str, float]:
        held_experts = math.ceil(self.num_experts / layout.ep) if self.num_experts else 0
        share = held_experts / self.num_experts if self.num_experts else 0.0
        params = (self.total - self.routed) / layout.tp + self.routed * share
        param_bytes = (self.total_bytes - self.routed_bytes) / layout.tp + self.routed_bytes * share
        return {
            "experts_per_rank": held_experts,
            "idle_expert_ranks": max(layout.ep - self.num_experts, 0),
            "params_per_rank": params,
            "param_gib_per_rank": param_bytes / GIB,
            "train_gib_per_rank": (param_bytes + OPTIMIZER_BYTES_PER_PARAM * params) / GIB,
        }

    def figures(self, layouts: Iterable[Layout]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "params_total": self.total,
            "params_active": self.active,
            "params_routed_experts": self.routed,
            "params_always_active": self.always_active,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "param_gib_total": self.total_bytes / GIB,
        }
        for layout in layouts:
            out.update({f"{layout.label}.{k}": v for k, v in self.per_rank(layout).items()})
        return out


def _routed_expert_params(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """(state-dict name -> tensor) of the routed experts, and the number of experts."""
    routed: dict[str, torch.Tensor] = {}
    counts = set()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "experts":
            continue
        tensors = dict(module.state_dict(prefix=f"{name}."))
        routed.update(tensors)
        if isinstance(module, torch.nn.ModuleList):
            counts.add(len(module))
        else:  # fused experts: [E, ...] per tensor
            counts.update(t.shape[0] for t in tensors.values() if t.dim() >= 2)
    if len(counts) > 1:
        raise ValueError(f"experts modules disagree on the number of experts: {sorted(counts)}")
    return routed, (counts.pop() if counts else 0)


def count_parameters(model: torch.nn.Module, state: Mapping[str, torch.Tensor], top_k: int) -> ParamCounts:
    routed, num_experts = _routed_expert_params(model)
    routed = {k: state[k] for k in routed if k in state}
    return ParamCounts(
        total=sum(t.numel() for t in state.values()),
        routed=sum(t.numel() for t in routed.values()),
        num_experts=num_experts,
        top_k=top_k if num_experts else 0,
        total_bytes=sum(t.numel() * t.element_size() for t in state.values()),
        routed_bytes=sum(t.numel() * t.element_size() for t in routed.values()),
    )


# ------------------------------------------------------------------------------------------
# the on-disk state transformers would write


def on_meta(factory: Callable[[Any], Any], config: Any) -> torch.nn.Module:
    """``factory(config)`` with every default-device allocation on the meta device. A factory
    that allocates on an explicit device would materialize the full model: refuse the result
    (it has happened by then, but the check names the tensor)."""
    with torch.device("meta"):
        model = factory(copy.deepcopy(config))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type != "meta":
            raise RuntimeError(f"{name} was allocated on {tensor.device}, not on the meta device: "
                               "the factory places tensors explicitly")
    return model


def release_dtype(config: Any, model_config: Any) -> torch.dtype:
    """The dtype the release is stored in (config ``dtype``/``torch_dtype``), else bf16."""
    for cfg in (model_config, config):
        value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
        if isinstance(value, str):
            value = getattr(torch, value, None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    return torch.bfloat16


def _kept_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Which in-memory keys transformers' own low-precision load keeps in fp32 (the model's
    dtype plan, matched the way its loader matches it)."""
    plan_of = getattr(model, "_get_dtype_plan", None)
    plan = plan_of(dtype) if callable(plan_of) else {}
    if not plan:
        return lambda key: False
    from transformers.core_model_loading import build_glob_alternation

    pattern, groups, _ = build_glob_alternation(list(plan))

    def keep(key: str) -> bool:
        m = pattern.search(key)
        return bool(m) and plan[groups[m.lastgroup]] == torch.float32

    return keep


def saved_state(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The in-memory state ``save_pretrained`` starts from: ignored keys and tied aliases
    dropped, cast to ``dtype`` except the keys transformers keeps in fp32."""
    state = dict(model.state_dict())
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # older releases: tied weights are declared, so the flag is enough
        remove_tied_weights_from_state_dict = None
    if remove_tied_weights_from_state_dict is not None:
        state = remove_tied_weights_from_state_dict(state, model)
    keep = _kept_in_fp32(model, dtype)
    return {k: (v.to(torch.float32) if keep(k) else v.to(dtype)) if v.is_floating_point() else v
            for k, v in state.items()}


def disk_state(model: torch.nn.Module, saved: dict[str, torch.Tensor], disk_prefix: str = "") -> dict[str, torch.Tensor]:
    """The on-disk (per-expert) tensors of ``saved`` (see :func:`saved_state`): transformers'
    own save-time conversion of the fused in-memory layout, with the release's key prefix."""
    from transformers.core_model_loading import revert_weight_conversion

    out = revert_weight_conversion(model, dict(saved))
    return {(k if k.startswith(disk_prefix) else disk_prefix + k): v for k, v in out.items()}


# ------------------------------------------------------------------------------------------
# the dry run of one spec


@dataclass
class DryRun:
    """Lazily computed stages of one arch's dry run; each stage that raises raises again in
    every check that reads it (the check reports the error as its failure)."""

    spec: Any
    config: Any
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds per stage, for the report
    _schemas: dict[str, Schema] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, spec: Any) -> DryRun:
        if spec.released is None:
            raise ValueError(f"arch {spec.name!r} declares no released config (ArchSpec.released)")
        config = spec.released()
        for cfg in (config, spec.model_config(config)):
            # eager paths, as the reference always runs in this suite; on meta nothing runs, but
            # some classes choose their modules by implementation at construction
            cfg._attn_implementation = "eager"
            cfg._experts_implementation = "eager"
        return cls(spec, config)

    def _timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[stage] = round(time.perf_counter() - start, 4)

    @cached_property
    def model_config(self) -> Any:
        return self.spec.model_config(self.config)

    @cached_property
    def dtype(self) -> torch.dtype:
        return release_dtype(self.config, self.model_config)

    @cached_property
    def _reference(self) -> tuple[dict[str, torch.Tensor], ParamCounts]:
        def build():
            model = on_meta(self.spec.reference, self.config)
            prefix = getattr(self.spec.converter, "disk_prefix", "") or ""
            saved = saved_state(model, self.dtype)
            counts = count_parameters(model, saved, int(getattr(self.model_config, "num_experts_per_tok", 0) or 0))
            disk = disk_state(model, saved, prefix)
            # what the release holds beyond the reference's own save (MTP layers), on meta
            extras = self.spec.disk_extras.tensors(disk, self.model_config) if self.spec.disk_extras is not None else {}
            return {**disk, **extras}, counts, sum(t.numel() for t in extras.values())

        return self._timed("reference", build)

    @property
    def disk(self) -> dict[str, torch.Tensor]:
        return self._reference[0]

    @property
    def extra_params(self) -> int:
        """Parameters of the declared extra checkpoint tensors (MTP layers): the release holds
        them, the reference model (and so ``counts``) does not."""
        return self._reference[2]

    @property
    def counts(self) -> ParamCounts:
        return self._reference[1]

    @cached_property
    def converted(self) -> dict[str, torch.Tensor]:
        """to_candidate(on-disk state)."""
        return self._timed("to_candidate", lambda: convert(self.spec.converter.to_candidate, dict(self.disk), self.config))

    @cached_property
    def candidate(self) -> dict[str, torch.Tensor]:
        """The candidate's own state dict at full size, cast by the plugin's ``cast`` to the
        release dtype with the tensors the converted checkpoint holds in fp32 kept in fp32."""

        keep = frozenset(k for k, v in self._converted_or_empty().items() if v.dtype == torch.float32)

        def build():
            model = self.spec.cast(on_meta(self.spec.candidate, self.config), self.dtype, keep)
            return dict(model.state_dict())

        return self._timed("candidate", build)

    def _converted_or_empty(self) -> dict[str, torch.Tensor]:
        try:
            return self.converted
        except Exception:  # noqa: BLE001 - the conversion check reports it; the cast only needs a guess
            return {}

    @cached_property
    def disk_back(self) -> dict[str, torch.Tensor]:
        """to_hf(to_candidate(on-disk state))."""
        return self._timed("to_hf", lambda: convert(self.spec.converter.to_hf, dict(self.converted), self.config))

    @cached_property
    def candidate_back(self) -> dict[str, torch.Tensor]:
        """to_candidate(to_hf(candidate's own state))."""

        def run():
            hf = convert(self.spec.converter.to_hf, dict(self.candidate), self.config)
            return convert(self.spec.converter.to_candidate, hf, self.config)

        return self._timed("candidate_roundtrip", run)

    def schema(self, stage: str) -> Schema:
        """The (key, shape, dtype) schema of a stage's state (``disk``, ``converted``,
        ``candidate``, ``disk_back``, ``candidate_back``), computed once."""
        if stage not in self._schemas:
            self._schemas[stage] = schema_of(getattr(self, stage))
        return self._schemas[stage]


def describe_release(run: DryRun) -> dict[str, Any]:
    """Report figures that say which release this was (no thresholds)."""
    name = getattr(run.spec.released, "released_name", None)
    return {
        "release": name or "",
        "release_dtype": str(run.dtype).removeprefix("torch."),
        "release_quantization": release_quantization(name) if name else "unknown",
        "num_hidden_layers": int(getattr(run.model_config, "num_hidden_layers", 0) or 0),
    }
