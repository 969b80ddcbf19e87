"""Measure the floors behind the `router_grad` and `sft` tolerance profiles.

For every built-in arch variant and several seeds (fp32, one thread, as the suites run):
- gradient parity: per parameter group, max|g_cand - g_ref| / max|g_ref| after conversion to
  the on-disk naming, fp32 candidate vs fp32 reference (what the suite gates), and the larger
  of |fp32 - fp64 reference| for both (the fp64 reference on the same right-padded batch: right
  padding leaves no fully masked query row, so no NaN);
- aux loss / z-loss: |candidate training code on candidate logits - fp64 formula on reference
  logits| relative, on a right-padded batch;
- aux-loss-free balancing: the imbalance ratio (last / first) reached from the skewed start (bf16:
  at the rate the suite scales to the router scores' spread, shown with it);
- SFT: max |loss_cand - loss_ref| over the first steps and over the whole run, the loss
  ratio (mean of the last steps / first step), for candidate and reference, and the largest
  error of a selection-bias update as stored in the candidate (and, for information, in the
  reference: transformers' MiniMax-M2 keeps its bias in bf16 under bf16).

With ``--dtype bfloat16``, the bf16 production profile: both sides in bf16 (SFT with fp32 master
weights, the suite's own run); gradients, aux/z-loss and balancing candidate vs reference as the
suite gates them (no fp64 comparison).

    .venv/bin/python benchmarks/training_noise_floor.py [--seeds 5] [--arch glm4_moe,kimi_k25] [--dtype bfloat16]

Prints a Markdown table and the maxima; moe_conformance/tolerances.py quotes them.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "suites"))

import test_router_grad as rg  # noqa: E402  (the suite's own helpers, so the floor measures what it gates)
import test_sft as sft  # noqa: E402

from moe_conformance import data, tokenizer, training  # noqa: E402
from moe_conformance.case import ArchCase  # noqa: E402
from moe_conformance.registry import discover  # noqa: E402


def grad_floor_low_precision(case: ArchCase) -> dict[str, float]:
    """Both in the case's dtype (the bf16 profile), candidate vs reference, as the suite gates:
    the tokens the candidate routes differently pinned to the reference's experts
    (``grad_*``, ``tokens_pinned``); and, for the record, both routing on their own
    (``grad_unpinned_max``)."""
    batch = data.lm_batch(tokenizer.load(), rg.BATCH_SIZE, case.case_seed).to(case.device)
    ref, cand = case.reference(dtype=case.dtype).train(), case.candidate(dtype=case.dtype).train()
    _, _, pinned = rg.pinned_backward(case, ref, cand, batch)
    ref_grads = training.reference_disk_grads(case, ref)
    direct = training.grad_parity(ref_grads, training.candidate_disk_grads(case, cand)).figures
    training.lm_backward(cand, batch, False)
    unpinned = training.grad_parity(ref_grads, training.candidate_disk_grads(case, cand)).figures
    out = {"grad_" + k.removeprefix("grad_rel_delta."): v for k, v in direct.items()}
    out["grad_max"] = max(direct.values())
    out["grad_unpinned_max"] = max(unpinned.values())
    out["tokens_pinned"] = float(sum(pinned))
    return out


def grad_floor(case: ArchCase) -> dict[str, float]:
    batch = data.lm_batch(tokenizer.load(), rg.BATCH_SIZE, case.case_seed).to(case.device)
    ref, cand = case.reference().train(), case.candidate().train()
    ref64 = copy.deepcopy(ref).double().train()
    training.lm_backward(ref, batch, True)
    training.lm_backward(cand, batch, False)
    training.lm_backward(ref64, batch, True)
    r32, c32 = training.reference_disk_grads(case, ref), training.candidate_disk_grads(case, cand)
    r64 = training.reference_disk_grads(case, ref64)
    direct = training.grad_parity(r32, c32).figures
    vs64 = {k: max(a, b) for (k, a), (_, b) in zip(training.grad_parity(r64, r32).figures.items(),
                                                    training.grad_parity(r64, c32).figures.items())}
    out = {"grad_" + k.removeprefix("grad_rel_delta."): v for k, v in direct.items()}
    out["grad_max"] = max(direct.values())
    out["grad_vs_fp64_max"] = max(vs64.values())
    return out


def loss_floor(case: ArchCase) -> dict[str, float]:
    """The suite's aux/z figures: the training code against the fp64 formula on the candidate's
    logits (``aux_rel``, ``z_rel``), and that formula on the candidate's logits against the
    reference's (``aux_logits_rel``, ``z_logits_rel``)."""
    batch, ref_logits, cand_logits, ref_aux = rg._router_logits(case)
    hooks, k = training.REFERENCE_HOOKS, case.model_config.num_experts_per_tok
    aux = float(hooks.aux_loss(cand_logits, k, batch.attention_mask))
    z = float(hooks.z_loss(cand_logits, batch.attention_mask))
    aux_formula, z_formula = rg.formula_aux_loss(cand_logits, k, batch.valid), rg.formula_z_loss(cand_logits, batch.valid)
    out = {"aux_rel": rg._rel(aux, aux_formula), "z_rel": rg._rel(z, z_formula),
           "aux_logits_rel": rg._rel(aux_formula, rg.formula_aux_loss(ref_logits, k, batch.valid)),
           "z_logits_rel": rg._rel(z_formula, rg.formula_z_loss(ref_logits, batch.valid))}
    if ref_aux is not None:
        out["aux_reference_rel"] = rg._rel(aux, float(ref_aux))
    return out


def balance(case: ArchCase) -> dict[str, float]:
    class Rec:
        def __call__(self, figures=None, thresholds=None):
            self.figures = figures

    rec = Rec()
    try:
        rg.test_aux_loss_free_balancing(case, rec)
    except BaseException:  # noqa: BLE001 - the gate may be a placeholder while measuring
        pass
    figures = getattr(rec, "figures", None) or {}
    return {k: figures[k] for k in ("balance_ratio", "score_spread", "bias_rate") if k in figures}


def sft_floor(case: ArchCase) -> dict[str, float]:
    run = training.run_sft(case, training.REFERENCE_HOOKS)
    c, r = run.candidate.loss, run.reference.loss
    d = [abs(a - b) for a, b in zip(c, r)]
    w = sft.FINAL_WINDOW
    return {"loss_delta_early": max(d[:sft.EARLY_STEPS]), "loss_delta_max": max(d),
            "loss_ratio": max(sum(c[-w:]) / w / c[0], sum(r[-w:]) / w / r[0]),
            "imbalance_final": max(run.candidate.load_imbalance[-w:]), "sft_seconds": run.seconds,
            "bias_update_error": max(run.candidate.bias_update_error, default=0.0),
            "reference_bias_update_error": max(run.reference.bias_update_error, default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--arch", default=None, help="comma-separated archs (default: every built-in)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--no-sft", action="store_true", help="leave the SFT runs out (the slow part)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    known, _ = discover()
    names = args.arch.split(",") if args.arch else sorted(known)
    rows, worst = [], {}
    for name in names:
        spec = known[name].load()
        for variant in spec.variants:
            for seed in range(args.seeds):
                case = ArchCase(spec, variant.name, seed=seed, dtype=args.dtype)
                if args.dtype == "float32":
                    figures = {**grad_floor(case), **loss_floor(case), **balance(case)}
                else:
                    figures = {**grad_floor_low_precision(case), **loss_floor(case), **balance(case)}
                if not args.no_sft:
                    figures.update(sft_floor(case))
                rows.append((case.id, seed, figures))
                for k, v in figures.items():
                    worst[k] = max(worst.get(k, 0.0), v)
                print(f"{case.id} seed {seed}: " + ", ".join(f"{k}={v:.3g}" for k, v in figures.items()), file=sys.stderr, flush=True)
    cols = ["grad_max", "grad_vs_fp64_max", "grad_unpinned_max", "tokens_pinned", "aux_rel", "z_rel", "aux_logits_rel",
            "z_logits_rel", "aux_reference_rel", "balance_ratio", "score_spread", "bias_rate", "loss_delta_early", "loss_delta_max",
            "loss_ratio", "imbalance_final", "bias_update_error", "reference_bias_update_error"]
    print("| case | seed | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for case_id, seed, f in rows:
        print(f"| {case_id} | {seed} | " + " | ".join(f"{f[c]:.3g}" if c in f else "-" for c in cols) + " |")
    print("| **max** | | " + " | ".join(f"**{worst[c]:.3g}**" if c in worst else "-" for c in cols) + " |")
    groups = sorted(k for k in worst if k.startswith("grad_") and k not in ("grad_max", "grad_vs_fp64_max", "grad_unpinned_max"))
    print("\nper-group gradient floor (max over cases): " + ", ".join(f"{g[5:]} {worst[g]:.3g}" for g in groups))


if __name__ == "__main__":
    main()
