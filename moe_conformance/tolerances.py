"""Named tolerance profiles keyed by (check, dtype), each from a measured noise floor.

How the floors were measured: ``python benchmarks/noise_floor.py`` (see its header), on the
2-core x86-64 CPU machine, over 5 seeds x every built-in arch variant x every input case:
the larger of |fp32 reference - fp64 reference| and |fp32 candidate - fp64 reference|, with
the fp64 reference scored per row with padding stripped (FACTS.md: padded rows turn NaN in
fp64 eager attention). benchmarks/results/noise_floor.md holds the last table.

The gate is the floor times a margin; planted bugs must exceed the gate by >= 10x (the
project's own tests assert that ratio for every planted bug).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Gate:
    limit: float
    at_least: bool = False  # True: the figure must be >= limit (agreement); else <= limit

    def violated_by(self, value: float) -> bool:
        return value < self.limit if self.at_least else not value <= self.limit  # NaN violates


@dataclass(frozen=True)
class Profile:
    gates: Mapping[str, Gate]
    why: str

    def with_overrides(self, check: str, overrides: Mapping[str, float]) -> Profile:
        gates = dict(self.gates)
        for key, value in overrides.items():
            name, _, figure = key.partition(".")
            if name == check and figure in gates:
                gates[figure] = Gate(value, gates[figure].at_least)
        return Profile(gates, self.why + (" (arch overrides applied)" if gates != dict(self.gates) else ""))

    def violations(self, figures: Mapping[str, float]) -> list[str]:
        out = []
        for name, gate in self.gates.items():
            if name in figures and gate.violated_by(figures[name]):
                op = ">=" if gate.at_least else "<="
                out.append(f"{name} = {figures[name]:.3g} (gate: {op} {gate.limit:.3g})")
        return out

    def thresholds(self) -> dict[str, float]:
        return {name: gate.limit for name, gate in self.gates.items()}


PROFILES: dict[tuple[str, str], Profile] = {
    ("logit_parity", "float32"): Profile(
        gates={
            # floor: max|fp32 - fp64| 3.8e-5 (logits std ~4; candidate vs reference 2.5e-5);
            # gate 13x the floor
            "max_abs_logit_delta": Gate(5e-4),
            # floor: KL mean 4.8e-12, max 3.8e-11. KL is quadratic in the logit delta, so the
            # same 13x margin on logits is ~170x here: gates 1e-9 and 1e-8.
            "kl_mean": Gate(1e-9),
            "kl_max": Gate(1e-8),
            # top-1 must agree wherever the reference's top-2 margin exceeds 1e-3
            "top1_agreement": Gate(1.0, at_least=True),
        },
        why="fp32 semantic parity: gates ~10x the measured fp32-vs-fp64 floor (benchmarks/noise_floor.py)",
    ),
    ("kernels_in_reference", "float32"): Profile(
        gates={
            # the kernels inside transformers' model vs its eager experts, fp32 (Triton
            # interpreter on CPU): floor 6.7e-6 on logits, 1.3e-6 relative on gradients
            "max_abs_logit_delta": Gate(5e-4),
            "max_grad_relative_delta": Gate(2e-5),
        },
        why="same math, different summation order: gates >= 15x the measured floor",
    ),
    ("router_grad", "float32"): Profile(
        gates={
            **{f"grad_rel_delta.{g}": Gate(1e-3) for g in ("attention", "router", "experts", "shared", "norms", "embeddings", "dense", "other")},
            "aux_rel_delta": Gate(1e-4),
            "z_rel_delta": Gate(1e-4),
            "balance_ratio": Gate(0.75),
        },
        why="placeholder",
    ),
    ("sft", "float32"): Profile(
        gates={
            "loss_ratio": Gate(0.7),
            "loss_delta_early": Gate(1e-2),
            "loss_delta_max": Gate(0.5),
            "lr_rel_delta": Gate(1e-6),
        },
        why="placeholder",
    ),
}


def profile(check: str, dtype: str = "float32", overrides: Mapping[str, float] = None) -> Profile:
    try:
        base = PROFILES[(check, dtype)]
    except KeyError:
        known = ", ".join(f"{c}/{d}" for c, d in PROFILES)
        raise KeyError(f"no tolerance profile for check {check!r} at {dtype} (known: {known})") from None
    return base.with_overrides(check, overrides or {})
