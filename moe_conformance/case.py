"""One (arch, variant) under test: its config, adversarial reference weights, the on-disk
checkpoint, and fresh reference/candidate models built from them.

Everything is derived deterministically from (seed, arch, variant), so a case builds the same
tensors in any process and any test order: serial and pytest-xdist runs give the same figures.
"""

from __future__ import annotations

import copy
import tempfile
import zlib
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .contract import convert
from .spec import ArchSpec
from .tiny import adversarial_init_, make_batches, production_scale_


# Decisions closer than this are redrawn (fp32 noise on router scores is ~1e-7); tiny_config's
# margins check holds the chosen inputs to the same floor.
TIE_MARGIN = 1e-5


def eager(config: Any) -> Any:
    """The reference runs transformers' plain paths: eager attention and eager experts."""
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint folder (never unpickles anything)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


class ArchCase:
    def __init__(self, spec: ArchSpec, variant: str, seed: int = 0, device: str = "cpu", kernels=(), dtype: str = "float32"):
        self.spec = spec
        self.kernel_names = tuple(kernels)  # selected with --kernels, beside those the plugin declares
        self.dtype = getattr(torch, dtype)
        self.variant = spec.variant(variant)
        self.seed = seed
        self.device = torch.device(device)
        # the arch's name is not part of the seed: a plugin copied under another name (a team's
        # fork of a built-in) builds the same tensors and gets the same figures
        salt = f"/{self.variant.seed}" if self.variant.seed else ""
        self.case_seed = zlib.crc32(f"{seed}/{variant}{salt}".encode())
        self._routing_fields: frozenset[str] | None = None
        from .contract_checks import ContractStatus

        self.contract = ContractStatus(self)

    @property
    def id(self) -> str:
        return f"{self.spec.name}-{self.variant.name}"

    # ---- configs
    def new_config(self) -> Any:
        return eager(self.variant.config())

    @cached_property
    def config(self) -> Any:
        return self.new_config()

    @cached_property
    def model_config(self) -> Any:
        return self.spec.model_config(self.config)

    @property
    def num_layers(self) -> int:
        return self.model_config.num_hidden_layers

    @property
    def num_experts(self) -> int:
        cfg = self.model_config
        return getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_experts", None) or cfg.num_local_experts

    # ---- weights
    @cached_property
    def reference_state(self) -> dict[str, torch.Tensor]:
        torch.manual_seed(self.case_seed)
        model = self.spec.reference(copy.deepcopy(self.config))
        adversarial_init_(model, self.case_seed, self.init_gains)
        if self.dtype != torch.float32:
            production_scale_(model)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    @property
    def init_gains(self) -> dict[str, float]:
        """The adversarial init's gains: the variant's first (the first suffix that matches a
        weight's name wins), then the arch's."""
        own = dict(self.variant.init_gains)
        return {**own, **{k: v for k, v in self.spec.init_gains.items() if k not in own}}

    def reference(self, config: Any = None, state: dict[str, torch.Tensor] | None = None, strict: bool = True,
                  dtype: torch.dtype | None = None):
        """A fresh reference model on the case's device, in eval mode: fp32, or ``dtype`` with
        what the reference class keeps in fp32 kept there (as its own from_pretrained would)."""
        torch.manual_seed(self.case_seed)
        model = self.spec.reference(copy.deepcopy(config or self.config))
        model.load_state_dict(state if state is not None else self.reference_state, strict=strict)
        if dtype is not None and dtype != torch.float32:
            from .checkpoint import keeps_fp32

            keep = keeps_fp32(type(model))
            with torch.no_grad():
                for name, t in [*model.named_parameters(), *model.named_buffers()]:
                    if t.is_floating_point() and not keep(name):
                        t.data = t.data.to(dtype)
        return model.to(self.device).eval()

    def save_reference(self, folder: Path, model=None) -> Path:
        """The reference's own save_pretrained (safetensors), renamed to the released on-disk
        naming when the converter declares a disk prefix."""
        model = model or self.reference()
        model.save_pretrained(folder)
        prefix = getattr(self.spec.converter, "disk_prefix", "")
        if prefix:
            from safetensors.torch import save_file

            for file in Path(folder).glob("*.safetensors"):
                tensors = load_file(file)
                # (a model loaded with a key_mapping saves under the mapped names already)
                renamed = {k if k.startswith(prefix) else prefix + k: v for k, v in tensors.items()}
                save_file(renamed, file, metadata={"format": "pt"})
            index = Path(folder) / "model.safetensors.index.json"
            if index.exists():
                raise ValueError(f"{index}: sharded checkpoints are not supported for tiny models")
        return Path(folder)

    @cached_property
    def disk_state(self) -> dict[str, torch.Tensor]:
        """The on-disk HF checkpoint tensors: the oracle for conversion checks (the reference's
        own save, plus the tensors the release holds that the reference does not load)."""
        with tempfile.TemporaryDirectory() as tmp:
            return self.with_extras(read_checkpoint(self.save_reference(Path(tmp))))

    def with_extras(self, disk: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``disk`` (a save of the reference) with the arch's declared extra tensors added
        (``ArchSpec.disk_extras``, e.g. MTP layers), shaped and typed like ``disk``'s own."""
        extras = self.spec.disk_extras
        if extras is None:
            return disk
        return {**disk, **extras.tensors(disk, self.model_config, seed=self.case_seed + 104729)}

    @cached_property
    def extra_disk_keys(self) -> frozenset[str]:
        """The on-disk keys the reference does not load (declared extras): checkpoints written
        for the reference carry them, and its loader is told to expect them."""
        extras = self.spec.disk_extras
        if extras is None:
            return frozenset()
        return frozenset(extras.tensors(self.disk_state, self.model_config, seed=None))

    # ---- conversion: the converter gets the case's config and copies (a converter that
    # mutates its input must not corrupt the cached checkpoint other checks read)
    def to_candidate(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert(self.spec.converter.to_candidate, _copied(hf_state), self.config)

    def to_hf(self, cand_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert(self.spec.converter.to_hf, _copied(cand_state), self.config)

    def candidate(self, state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None):
        """A fresh candidate loaded (strictly) with the converted on-disk checkpoint; with
        ``dtype``, put there by the plugin's ``cast``, the tensors the reference keeps in fp32 named."""
        torch.manual_seed(self.case_seed)
        model = self.spec.candidate(copy.deepcopy(self.config))
        cand_state = state if state is not None else self.to_candidate(self.disk_state)
        model.load_state_dict(cand_state, strict=True)
        if dtype is not None and dtype != torch.float32:
            model = self.spec.cast(model, dtype, self.candidate_fp32_names)
        return model.to(self.device).eval()

    @cached_property
    def candidate_fp32_names(self) -> frozenset[str]:
        """Candidate tensors whose on-disk tensors the reference keeps in fp32 in low precision
        (traced through the converter: no naming convention of the candidate assumed)."""
        from .checkpoint import keeps_fp32
        from .training import candidate_disk_names

        keep = keeps_fp32(type(self.reference()))
        prefix = getattr(self.spec.converter, "disk_prefix", "")
        state = dict(self.candidate().state_dict())
        return frozenset(n for n, disk in candidate_disk_names(self, state).items()
                         if disk and all(keep(d.removeprefix(prefix)) for d in disk))

    # ---- inputs
    @cached_property
    def batches(self):
        """The logit-parity inputs, each drawn until the reference's routing decisions on its
        real tokens clear the float noise (a near-tie in top-k turns noise into a routing flip
        on another CPU): figures then hold across machines and seeds."""
        out = {}
        for name in make_batches(self.model_config.vocab_size, self.case_seed):
            out[name] = self.clear_of_ties(
                lambda attempt, name=name: _to(make_batches(self.model_config.vocab_size,
                                                            self.case_seed + 7919 * attempt)[name], self.device))
        return out

    def routing_margin(self, batch) -> float:
        """The smallest top-k (and group) margin of the reference's routing on the real tokens
        of ``batch`` (inf when the reference has no readable router)."""
        from . import routing
        from .compare import run_reference
        from .probing import RoutingTap
        from .training import selection_biases

        model = self.reference_for_margins
        try:
            tap = RoutingTap(model, self, "ref")
        except Exception:  # noqa: BLE001 - no router to measure
            return float("inf")
        with torch.no_grad(), tap():
            run_reference(model, batch)
        caps = self.spec.capabilities
        oracle = routing.from_config(self.model_config, caps.router_scoring, caps.correction_bias)
        valid = batch.valid.reshape(-1)
        worst = float("inf")
        for reading, bias in zip(tap.ordered(), selection_biases(self, model, "ref")):
            logits = reading.logits.reshape(-1, reading.logits.shape[-1])[valid]
            b = None if bias is None else bias[1].to(logits.device)
            for margin in oracle.margins(logits, routing.top_k(self.model_config), b).values():
                worst = min(worst, float(margin.min()))
        return worst

    @cached_property
    def reference_for_margins(self):
        return self.reference()

    def clear_of_ties(self, draw, attempts: int = 8, floor: float = TIE_MARGIN):
        """The first of ``draw(0), draw(1), ...`` whose routing margin clears ``floor`` (the
        last drawn when none does: the tiny_config margins check then names the near-tie)."""
        for attempt in range(attempts):
            batch = draw(attempt)
            if self.routing_margin(batch) >= floor:
                return batch
        return batch

    def module_pairs(self) -> list:
        """The declared (reference, candidate) module pairs, one per layer where they have {i}
        (wave-1 plugins declared them on the converter: still read there)."""
        from .convert import expand_pairs

        if self.spec.probes.pairs:
            return expand_pairs(self.spec.probes.pairs, self.num_layers)
        legacy = getattr(self.spec.converter, "module_pairs", None)
        return list(legacy(self.num_layers)) if callable(legacy) else []

    def kernel_subjects(self) -> list:
        """The kernels under test: the plugin's declared ones, then the selected ones."""
        from .kernel_checks.subjects import resolve

        subjects, seen = [], set()
        for k in (*self.spec.kernels, *self.kernel_names):
            subject = resolve(k)
            if subject.name not in seen:
                seen.add(subject.name)
                subjects.append(subject)
        return subjects

    def routing_fields(self) -> frozenset[str]:
        """Which RouterReading fields the candidate's probes give on every MoE layer (one eval
        forward on the plain inputs; empty when they give nothing or fail)."""
        if self._routing_fields is None:
            from .probing import RoutingTap

            found: set[str] = set()
            try:
                model = self.candidate()
                tap = RoutingTap(model, self, "cand")
                with torch.no_grad(), tap():
                    model(**self.batches["plain"].kwargs)
                found = {f for f in ("indices", "weights", "logits", "scores") if tap.has(f)}
            except Exception:  # noqa: BLE001 - the contract family reports why
                found = set()
            self._routing_fields = frozenset(found)
        return self._routing_fields

    def parity_root_cause(self) -> str | None:
        """Why this case's candidate disagrees with the reference, when its fp32 logits do (on
        the first input case that fails): the first diverging module and the named cause.
        Failures of other checks in the case are grouped under it. None: parity holds."""
        if not hasattr(self, "_root_cause"):
            self._root_cause = None
            from . import tolerances
            from .compare import compare_logits, localize, run_candidate, run_reference
            from .diagnosis import describe, name_causes

            profile = tolerances.profile("logit_parity", "float32", self.spec.tolerances)
            try:
                ref, cand = self.reference(), self.candidate()
                for name, batch in self.batches.items():
                    with torch.no_grad():
                        ref_logits, cand_logits = run_reference(ref, batch), run_candidate(cand, batch)
                    result = compare_logits(ref_logits, cand_logits, batch.valid)
                    if result.nan_message or profile.violations(result.figures):
                        found = localize(self, ref, cand, batch)
                        where = (f"first divergence at reference {found.pair.ref} <-> candidate {found.pair.cand}"
                                 if found else "no declared module pair diverges")
                        cause = describe(name_causes(self, batch, cand_logits, profile.gates["max_abs_logit_delta"].limit)) \
                            if not result.nan_message else "non-finite logits"
                        self._root_cause = f"{self.id}: logit parity fails on '{name}' inputs: {where}; {cause}"
                        break
            except Exception:  # noqa: BLE001 - a crash is the failing check's own message
                self._root_cause = None
        return self._root_cause

    def fail(self, what: str, problems: list[str], limit: int = 10):
        """Fail the running check with one line per problem, naming this case."""
        import pytest

        more = f"\n  ... {len(problems) - limit} more" if len(problems) > limit else ""
        pytest.fail(f"{self.id}: {what}:\n  " + "\n  ".join(problems[:limit]) + more, pytrace=False)


def _copied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _to(batch, device):
    from dataclasses import replace

    def move(t):
        return None if t is None else t.to(device)

    return replace(
        batch, input_ids=move(batch.input_ids), attention_mask=move(batch.attention_mask), position_ids=move(batch.position_ids)
    )


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a transformers output, a candidate output object, or a bare tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return output[0]
    raise TypeError(f"cannot find logits in a {type(output).__name__}")
