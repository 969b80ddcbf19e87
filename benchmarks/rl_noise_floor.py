"""Noise floors behind the `rl` and `engine_parity` gates (moe_conformance/tolerances.py).

For every built-in arch variant x seeds (2-core CPU, one thread), fp32:
- engine parity: prompt logprobs of the candidate engine (KV cache, left padding) and of the
  transformers engine vs the trainer's plain forward: max|delta logprob| of the next tokens,
  KL mean / max (fp64-renormalized), top-1 agreement;
- the RL loop with the default engine: engine/trainer mismatch on the sampled tokens over all
  steps (max |delta logprob|, |k3 mismatch KL|), routing flip rate per layer, the smallest KL
  after the first update, the smallest loss spread, the smallest reward gap.

    .venv/bin/python benchmarks/rl_noise_floor.py --seeds 3      # writes benchmarks/results/rl_noise_floor.md

With ``--dtype bfloat16`` (the bf16 production profile: policy, engine and reference policy in
bf16, fp32 master weights) only the RL loop is measured, into rl_noise_floor_bf16.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from moe_conformance import engines, rl
from moe_conformance.case import ArchCase
from moe_conformance.registry import discover

RESULTS = Path(__file__).resolve().parent / "results" / "rl_noise_floor.md"


def measure(case) -> dict[str, float]:
    out = {} if case.dtype != torch.float32 else engine_floor(case)
    return out | loop_floor(case)


def engine_floor(case) -> dict[str, float]:
    out = {}
    state = case.to_candidate(case.disk_state)
    seqs = engines.parity_sequences(case)
    trainer = engines.trainer_prompt_logprobs(case.candidate(), seqs)
    for name, factory in (("cand", engines.CandidateEngine), ("tf", engines.TransformersEngine)):
        eng = factory(case, state)
        f = engines.parity_figures(trainer, eng.prompt_logprobs(seqs), seqs)
        eng.close()
        for k in ("max_abs_logprob_delta", "kl_mean", "kl_max", "top1_agreement"):
            out[f"{name}.{k}"] = f[k]
    return out


def loop_floor(case) -> dict[str, float]:
    out = {}
    run = rl.run_rl(case)
    log = run.log
    assert log.error is None, log.error
    layers = len(log.routing_flips[0]) if log.routing_flips else 0
    tokens = max(sum(log.routing_tokens), 1)
    out.update({
        "rl.mismatch_max": max(log.mismatch_max), "rl.mismatch_kl": max(abs(v) for v in log.mismatch_kl),
        "rl.flip_rate": max((sum(s[i] for s in log.routing_flips) / tokens for i in range(layers)), default=0.0),
        "rl.kl_after_update_min": min(log.kl[1:]), "rl.loss_spread": max(log.loss) - min(log.loss),
        "rl.reward_std_max": max(log.reward_std), "rl.seconds": run.seconds,
    })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--arch", default="all")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", type=Path, default=None, help="results file (default: by dtype, under benchmarks/results)")
    args = parser.parse_args()
    out_file = args.out or (RESULTS if args.dtype == "float32" else RESULTS.with_name("rl_noise_floor_bf16.md"))
    torch.set_num_threads(1)
    known, _ = discover()
    names = sorted(known) if args.arch == "all" else args.arch.split(",")
    rows = []
    start = time.perf_counter()
    for name in names:
        spec = known[name].load()
        for v in spec.variants:
            for seed in range(args.seeds):
                figs = measure(ArchCase(spec, v.name, seed=seed, dtype=args.dtype))
                rows.append((f"{name}-{v.name}", seed, figs))
                print(name, v.name, seed, {k: f"{x:.3g}" for k, x in figs.items()}, flush=True)
    keys = list(rows[0][2])
    worst_is_min = {"cand.top1_agreement", "tf.top1_agreement", "rl.kl_after_update_min", "rl.loss_spread",
                    "rl.reward_std_max"}
    lines = ["# RL / engine parity noise floors", "",
             f"{len(rows)} runs ({len(names)} archs, every variant, {args.seeds} seeds), {args.dtype}, one thread, "
             f"{time.perf_counter() - start:.0f} s.", "", "| figure | worst | at |", "|---|---|---|"]
    for k in keys:
        pick = min if k in worst_is_min else max
        case, seed, figs = pick(rows, key=lambda r: r[2][k])
        lines.append(f"| {k} | {figs[k]:.3g} | {case} seed {seed} |")
    lines += ["", "Per arch variant (worst over seeds):", "",
              "| case | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for case in dict.fromkeys(r[0] for r in rows):
        sel = [r[2] for r in rows if r[0] == case]
        vals = [(min if k in worst_is_min else max)(s[k] for s in sel) for k in keys]
        lines.append(f"| {case} | " + " | ".join(f"{x:.3g}" for x in vals) + " |")
    out_file.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(keys) + 6]))


if __name__ == "__main__":
    main()
