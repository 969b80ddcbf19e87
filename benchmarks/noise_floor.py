"""Measure the fp32 noise floor behind the logit-parity tolerance profile.

For every built-in arch variant, several seeds and every input case: the larger of
|fp32 reference - fp64 reference| and |fp32 candidate - fp64 reference| on valid tokens, plus
the KL of each fp32 model to the fp64 reference. The fp64 reference is run per batch row with
the padding stripped (transformers' eager attention turns fully padded rows into NaN in fp64,
and the NaN reaches valid tokens: FACTS.md). Also: fp32 reference vs fp32 candidate directly,
which is what the suite gates. Input cases the arch declares as expected failures are skipped.

    .venv/bin/python benchmarks/noise_floor.py [--seeds 5] [--arch glm4_moe,kimi_k25]

Prints a Markdown table; moe_conformance/tolerances.py quotes its maxima.
"""

from __future__ import annotations

import argparse
import copy

import torch

from moe_conformance.case import ArchCase, logits_of
from moe_conformance.registry import discover


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def fp64_rowwise(model64, batch) -> torch.Tensor:
    """fp64 reference logits at the valid positions of each row, padding stripped."""
    rows = []
    for b in range(batch.input_ids.shape[0]):
        keep = batch.valid[b]
        kwargs = {"input_ids": batch.input_ids[b:b + 1, keep]}
        if batch.position_ids is not None:
            kwargs["position_ids"] = batch.position_ids[b:b + 1, keep]
        with torch.no_grad():
            rows.append(logits_of(model64(**kwargs, use_cache=False))[0])
    return torch.cat(rows)


def measure(case: ArchCase) -> dict[str, float]:
    ref32, cand32 = case.reference(), case.candidate()
    ref64 = copy.deepcopy(ref32).double()
    worst = {"ref32_vs_64": 0.0, "cand32_vs_64": 0.0, "cand_vs_ref32": 0.0, "kl_mean": 0.0, "kl_max": 0.0}
    for name, batch in case.batches.items():
        if case.spec.expected_failure("test_logit_parity", "logit_parity", case.variant.name, f"{case.id}-{name}"):
            continue  # a known divergence of the reference, not noise
        with torch.no_grad():
            r32 = logits_of(ref32(**batch.kwargs, use_cache=False))[batch.valid].double()
            c32 = logits_of(cand32(**batch.kwargs))[batch.valid].double()
        r64 = fp64_rowwise(ref64, batch)
        worst["ref32_vs_64"] = max(worst["ref32_vs_64"], float((r32 - r64).abs().max()))
        worst["cand32_vs_64"] = max(worst["cand32_vs_64"], float((c32 - r64).abs().max()))
        worst["cand_vs_ref32"] = max(worst["cand_vs_ref32"], float((c32 - r32).abs().max()))
        k = kl(r32, c32)
        worst["kl_mean"] = max(worst["kl_mean"], float(k.mean()))
        worst["kl_max"] = max(worst["kl_max"], float(k.max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--arch", default=None, help="comma-separated arch names (default: all built-in)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    known, _ = discover()
    names = args.arch.split(",") if args.arch else sorted(known)
    cols = ["ref32_vs_64", "cand32_vs_64", "cand_vs_ref32", "kl_mean", "kl_max"]
    print("| arch-variant | seeds | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    overall = dict.fromkeys(cols, 0.0)
    for name in names:
        spec = known[name].load()
        for variant in spec.variants:
            worst = dict.fromkeys(cols, 0.0)
            for seed in range(args.seeds):
                for k, v in measure(ArchCase(spec, variant.name, seed=seed)).items():
                    worst[k] = max(worst[k], v)
            overall = {k: max(overall[k], worst[k]) for k in cols}
            print(f"| {name}-{variant.name} | {args.seeds} | " + " | ".join(f"{worst[c]:.2e}" for c in cols) + " |")
    print("| **max** | | " + " | ".join(f"**{overall[c]:.2e}**" for c in cols) + " |")
    floor = max(overall["ref32_vs_64"], overall["cand32_vs_64"])
    print(f"\nfloor (max |fp32 - fp64| over reference and candidate): {floor:.2e}")


if __name__ == "__main__":
    main()
