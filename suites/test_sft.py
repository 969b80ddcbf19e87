"""Short SFT on the reverse-text task: candidate and reference trained side by side, in fp32, or
under ``--dtype bf16`` (the production profile) both computing in bf16 and stepping fp32 master
weights (``training.MasterWeightAdamW``), under gates from a bf16 floor.

Both start from the same weights (the reference's adversarial init, converted into the
candidate) and take the same optimizer steps on the same batches (``training.run_sft``: AdamW,
warmup + cosine, grad clipping, aux loss + z-loss, DeepSeek-V3 bias update where the router has
a selection bias). The reference side runs the project's training definitions; the candidate
side runs the arch's ``training`` hooks (the team's code) when it declares them.

Checks: the loss falls below a measured fraction of its start; candidate and reference losses
agree step by step (tight over the first steps, looser over the whole run, where routing flips
from float noise compound); loss and grad norm finite at every step; the LR actually applied
follows the schedule; every parameter is in the optimizer and changes; router health (expert
utilization, load imbalance, aux loss, z-loss) per step, flagged against healthy ranges; the
trained checkpoint, written in the on-disk HF format with the tokenizer, reloads into both
models with identical logits (fp32; bf16: the candidate bit-identical, the reference within the
bf16 parity gates). Where the router has a selection bias, every bias update
lands in the model's bias as the definition says (a bias stored in bf16 rounds it away). Under
bf16 the team's optimizer keeps updates smaller than a bf16 weight's spacing, as master weights do.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch

from moe_conformance import data, tokenizer, tolerances, training
from moe_conformance.case import logits_of, read_checkpoint
from moe_conformance.checkpoint import load_reference, write_checkpoint
from moe_conformance.checks import ANY_DTYPE, conformance, needs_capability

_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
EARLY_STEPS = 2  # step 0 (pure forward parity) and the first update: before routing flips compound
FINAL_WINDOW = 4  # the final loss is the mean of the last steps (each step sees a new batch)


def _run(arch) -> training.SFTRun:
    if arch not in _RUNS:
        _RUNS[arch] = training.run_sft(arch, training.hooks_for(arch.spec))
    return _RUNS[arch]


def _profile(arch):
    return tolerances.profile("sft", str(arch.dtype).removeprefix("torch."), arch.spec.tolerances)




def _complete(arch, run: training.SFTRun) -> None:
    for side, log in (("candidate", run.candidate), ("reference", run.reference)):
        if log.error:
            arch.fail(f"the {side} training run crashed", [log.error])


def _round(values: list[float]) -> list[float]:
    return [float(f"{v:.6g}") if math.isfinite(v) else v for v in values]


@conformance(dtypes=ANY_DTYPE)
def test_sft_finite(arch, record):
    run = _run(arch)
    log = run.candidate
    record(figures={"steps": len(log.loss), "grad_norm_first": log.grad_norm[0] if log.grad_norm else math.nan,
                    "grad_norm_last": log.grad_norm[-1] if log.grad_norm else math.nan,
                    "grad_norm": _round(log.grad_norm)})
    _complete(arch, run)
    bad = [f"step {s}: loss {l:.4g}, grad norm {g:.4g}" for s, (l, g) in enumerate(zip(log.total, log.grad_norm))
           if not (math.isfinite(l) and math.isfinite(g))]
    if bad:
        arch.fail("loss or grad norm not finite", bad)


@conformance(dtypes=ANY_DTYPE)
def test_sft_loss_falls(arch, record):
    run = _run(arch)
    _complete(arch, run)
    gate = _profile(arch).thresholds()["loss_ratio"]
    cand, ref = run.candidate.loss, run.reference.loss
    ratio = sum(cand[-FINAL_WINDOW:]) / FINAL_WINDOW / cand[0]
    ref_ratio = sum(ref[-FINAL_WINDOW:]) / FINAL_WINDOW / ref[0]
    record(figures={"loss_ratio": ratio, "loss_initial": cand[0], "loss_final": sum(cand[-FINAL_WINDOW:]) / FINAL_WINDOW,
                    "reference_loss_ratio": ref_ratio, "steps": len(cand)}, thresholds={"loss_ratio": gate})
    if not ratio <= gate:
        arch.fail(f"the loss did not fall: mean of the last {FINAL_WINDOW} steps / step 0 = {ratio:.3g} (gate: <= {gate:.3g}; "
                    f"reference {ref_ratio:.3g})", [f"candidate losses: {_round(cand)}"])


@conformance(dtypes=ANY_DTYPE)
def test_sft_matches_reference(arch, record):
    run = _run(arch)
    _complete(arch, run)
    profile = _profile(arch)
    cand, ref = run.candidate.loss, run.reference.loss
    delta = [abs(c - r) if math.isfinite(c) else math.inf for c, r in zip(cand, ref)]
    figures = {"loss_delta_early": max(delta[:EARLY_STEPS]), "loss_delta_max": max(delta),
               "loss_delta_final": delta[-1],
               "curves": {"title": f"{arch.id}: SFT loss (reverse text)",
                          "panels": {"loss": {"candidate": _round(cand), "reference": _round(ref)},
                                     "|candidate - reference|": {"loss delta": [float(f"{d:.3g}") for d in delta]}},
                          "log_panels": ["|candidate - reference|"]}}
    gates = {k: v for k, v in profile.thresholds().items() if k in ("loss_delta_early", "loss_delta_max")}
    record(figures=figures, thresholds=gates)
    problems = profile.violations({k: figures[k] for k in gates})
    if problems:
        early, late = gates["loss_delta_early"], gates["loss_delta_max"]
        first = next(s for s, d in enumerate(delta) if d > (early if s < EARLY_STEPS else late))
        problems.append(f"first step beyond its gate: {first} (candidate {cand[first]:.6g}, reference {ref[first]:.6g})")
        lr_c, lr_r = run.candidate.lr, run.reference.lr
        lr_bad = [s for s, (a, b) in enumerate(zip(lr_c, lr_r)) if abs(a - b) > 1e-6 * abs(b)]
        if lr_bad:
            s = lr_bad[0]
            problems.append(f"the candidate's learning rate differs from step {s}: {lr_c[s]:.4g} vs {lr_r[s]:.4g} "
                            f"(ratio {lr_c[s] / lr_r[s]:.3g})")
        if run.not_in_optimizer:
            problems.append(f"the candidate's optimizer lacks {len(run.not_in_optimizer)} parameter(s): "
                            f"{', '.join(run.not_in_optimizer[:4])}")
        arch.fail("candidate and reference loss curves disagree", problems)


@conformance(dtypes=ANY_DTYPE)
def test_sft_lr_schedule(arch, record):
    """The LR applied at each step is the schedule's: linear warmup, cosine decay."""
    run = _run(arch)
    _complete(arch, run)
    cfg = run.cfg
    want = [training.lr_at(s, cfg) for s in range(len(run.candidate.lr))]
    got = run.candidate.lr
    rel = [abs(g - w) / w for g, w in zip(got, want)]
    gate = _profile(arch).thresholds()["lr_rel_delta"]
    record(figures={"lr_rel_delta": max(rel), "lr_peak": max(got), "lr": _round(got)}, thresholds={"lr_rel_delta": gate})
    if not max(rel) <= gate:
        s = next(i for i, r in enumerate(rel) if r > gate)
        ratios = {round(g / w, 4) for g, w in zip(got, want)}
        hint = (f"off by a constant factor {ratios.pop():.4g} at every step" if len(ratios) == 1
                else f"ratio to the schedule varies from {min(g / w for g, w in zip(got, want)):.3g} to "
                     f"{max(g / w for g, w in zip(got, want)):.3g}")
        arch.fail("the learning-rate schedule is wrong", [
            f"step {s}: LR {got[s]:.6g}, the schedule (warmup {cfg.warmup} to {cfg.lr:g}, cosine to "
            f"{cfg.min_lr_ratio * cfg.lr:g} at step {cfg.steps - 1}) says {want[s]:.6g}: {hint}"])


def _carried_only(arch, cand) -> set[str]:
    """Candidate parameters that feed only declared extra checkpoint tensors (MTP layers): the
    reference cannot run them, so their training is not comparable here."""
    if not arch.extra_disk_keys:
        return set()
    state = dict(cand.state_dict())
    state.update(dict(cand.named_parameters()))
    names = training.candidate_disk_names(arch, state)
    return {k for k, disk in names.items() if disk and set(disk) <= arch.extra_disk_keys}


@conformance(dtypes=ANY_DTYPE)
def test_sft_all_parameters_train(arch, record):
    """Every candidate parameter is in the optimizer and changes, as every reference one does
    (parameters of tensors the reference cannot run, such as MTP layers, excepted; in bf16, a
    tensor whose reference counterpart kept its bf16 value too)."""
    run = _run(arch)
    _complete(arch, run)
    cand = run.cand_model
    carried = _carried_only(arch, cand)
    problems = []
    frozen = [n for n, p in cand.named_parameters() if not p.requires_grad]
    if frozen:
        problems.append(f"{len(frozen)} parameter(s) are frozen (requires_grad=False): {', '.join(frozen[:6])}")
    missing = [n for n in run.not_in_optimizer if n not in frozen]
    if missing:
        problems.append(f"{len(missing)} parameter(s) are missing from the optimizer's parameter groups: "
                        f"{', '.join(missing[:6])}")
    unchanged = [n for n, p in cand.named_parameters()
                 if n not in carried and torch.equal(p.detach(), run.initial_cand_state[n])]
    # in bf16 a weight whose updates stay under half its spacing keeps its bf16 value (the master
    # moves): excused where the reference's tensor did not move either
    disk = training.candidate_disk_names(arch, {**cand.state_dict(), **dict(cand.named_parameters())})
    like_reference = [n for n in unchanged if disk.get(n) and set(disk[n]) <= run.unchanged_reference_keys]
    unchanged = [n for n in unchanged if n not in like_reference]
    if unchanged:
        problems.append(f"{len(unchanged)} parameter(s) did not change in {len(run.candidate.loss)} steps: "
                        f"{', '.join(unchanged[:6])}")
    record(figures={"parameters": sum(1 for _ in cand.parameters()), "not_in_optimizer": len(run.not_in_optimizer),
                    "frozen": len(frozen), "unchanged": len(unchanged), "carried_not_trained": len(carried),
                    "unchanged_like_reference": like_reference})
    if problems:
        arch.fail("not every candidate parameter trains", problems)


def healthy_ranges(arch) -> dict[str, tuple[float, float]]:
    """Healthy router statistics: most experts in use, imbalance well under the collapse value
    E/k, aux loss within 2x its balanced value k, router logsumexp within a few units of log E."""
    E, k = arch.num_experts, arch.model_config.num_experts_per_tok
    return {
        "expert_utilization": (0.75, 1.0),
        "load_imbalance": (1.0, max(2.0, 0.75 * E / k)),
        "aux_loss": (0.0, 2.0 * k),
        "z_loss": (0.0, (math.log(E) + 3.0) ** 2),
    }


def _out_of_range(values: list[float], low: float, high: float) -> list[int]:
    return [s for s, v in enumerate(values) if not low <= v <= high]


@conformance(dtypes_why="from bf16 production-scale weights both sides' routers mostly collapse within 24 steps "
                        "and correct implementations end up to 0.17 apart in utilization (benchmarks/results/training_noise_floor_bf16.md)")
def test_sft_router_health(arch, record):
    """Per-step router health into the report, flagged against healthy ranges. Fails when the
    candidate's router ends unhealthy where the reference's is healthy, or on non-finite values.
    fp32 only: from bf16 production-scale weights both sides' routers mostly collapse within 24
    steps and correct implementations end up to 0.17 apart in utilization (benchmarks/results/
    training_noise_floor_bf16.md), so these ranges separate nothing there."""
    run = _run(arch)
    _complete(arch, run)
    ranges = healthy_ranges(arch)
    if "logits" not in arch.routing_fields():  # no router logits from the probe: no aux or z-loss was trained
        ranges = {m: r for m, r in ranges.items() if m not in ("aux_loss", "z_loss")}
    figures, flags, problems = {}, [], []
    panels = {}
    for metric, (low, high) in ranges.items():
        cand, ref = getattr(run.candidate, metric), getattr(run.reference, metric)
        panels[metric] = {"candidate": _round(cand), "reference": _round(ref), "healthy low": [low] * len(cand),
                          "healthy high": [high] * len(cand)}
        end_c = sum(cand[-FINAL_WINDOW:]) / FINAL_WINDOW
        end_r = sum(ref[-FINAL_WINDOW:]) / FINAL_WINDOW
        figures[f"{metric}_final"] = end_c
        figures[f"reference_{metric}_final"] = end_r
        bad = _out_of_range(cand, low, high)
        if bad:
            flags.append(f"{metric} outside [{low:.3g}, {high:.3g}] at {len(bad)}/{len(cand)} steps (first {bad[0]})")
        if not all(math.isfinite(v) for v in cand):
            problems.append(f"{metric} is not finite at step {next(s for s, v in enumerate(cand) if not math.isfinite(v))}")
        elif not low <= end_c <= high and low <= end_r <= high:
            problems.append(f"{metric} ends at {end_c:.3g} (mean of the last {FINAL_WINDOW} steps), outside the healthy "
                            f"range [{low:.3g}, {high:.3g}], while the reference's ends at {end_r:.3g}")
    figures["health_flags"] = flags
    figures["curves"] = {"title": f"{arch.id}: router health during SFT (worst MoE layer)", "panels": panels}
    record(figures=figures, thresholds={f"{m}_range": list(r) for m, r in ranges.items()})
    if problems:
        arch.fail("router health", problems)


@conformance(applies=needs_capability("correction_bias", "no selection-only bias, so no bias updates"), dtypes=ANY_DTYPE)
def test_sft_selection_bias_updates(arch, record):
    """Each of the run's aux-loss-free bias updates lands in the candidate's own selection-bias
    tensor as ``bias + rate * sign(mean load - load)``: DeepSeek-V3 keeps that bias in fp32 because
    a bias stored in bf16 (a cast that takes it along) rounds each update by up to half its spacing."""
    run = _run(arch)
    _complete(arch, run)
    log = run.candidate
    gate = _profile(arch).thresholds()["bias_update_error"]
    worst = max(range(len(log.bias_update_error)), key=log.bias_update_error.__getitem__)
    error = log.bias_update_error[worst]
    record(figures={"bias_update_error": error, "bias_updates": len(log.bias_update_error),
                    "bias_tensor": log.bias_update_worst[worst]}, thresholds={"bias_update_error": gate})
    if not error <= gate:
        first = next(s for s, e in enumerate(log.bias_update_error) if not e <= gate)
        arch.fail("the selection bias does not take the bias update as defined", [
            f"bias_update_error = {error:.3g} (gate: <= {gate:.3g}): after update {worst} the bias of "
            f"{log.bias_update_worst[worst]} is {error:.3g} away from bias + {run.cfg.bias_rate:g} * sign(mean load - load)",
            f"first update beyond the gate: step {first}; a selection bias kept in bf16 rounds each update by up to "
            "half its bf16 spacing (keep it fp32: the plugin's cast gets the fp32 names)"])


SMALL_LR = 1e-5  # a production fine-tuning LR: AdamW's update (~lr) is under half the bf16 spacing of |w| >= 2^-9
SMALL_STEPS = 8


@conformance(dtypes=("bfloat16",))
def test_sft_optimizer_keeps_small_updates(arch, record):
    """The team's optimizer on the candidate in bf16, at a production learning rate, follows the
    definition's master-weight AdamW on the same gradients: every parameter ends within one bf16
    step of the fp32 trajectory rounded to bf16. Plain AdamW on bf16 weights drops each update
    smaller than half a weight's spacing, so at lr 1e-5 most weights never move."""
    hooks = training.hooks_for(arch.spec)
    cfg = dataclasses.replace(training.TrainConfig(), lr=SMALL_LR, warmup=0, min_lr_ratio=1.0)
    team, definition = arch.candidate(dtype=arch.dtype).train(), arch.candidate(dtype=arch.dtype).train()
    masters = {n: p.detach().float().clone() for n, p in definition.named_parameters()}
    fp32 = torch.nn.ParameterDict({n.replace(".", "/"): torch.nn.Parameter(v) for n, v in masters.items()})
    opt_team = hooks.optimizer(team, cfg)
    opt_def = training.build_optimizer(fp32, cfg)
    generator = torch.Generator().manual_seed(arch.case_seed + 31)
    params = dict(team.named_parameters())
    for step in range(SMALL_STEPS):
        for group in opt_team.param_groups:
            group["lr"] = hooks.lr_at(step, cfg)
        for group in opt_def.param_groups:
            group["lr"] = training.lr_at(step, cfg)
        for n, p in params.items():
            g = torch.randn(p.shape, generator=generator).to(p.dtype)
            p.grad = g.to(p.device)
            fp32[n.replace(".", "/")].grad = g.float().to(p.device)
        opt_team.step()
        opt_def.step()
    far, total, worst = 0, 0, ("", 0.0)
    for n, p in params.items():
        want = fp32[n.replace(".", "/")].detach().to(p.dtype)
        start = masters[n].to(p.dtype)
        ulp = torch.maximum(torch.finfo(p.dtype).eps * want.float().abs(), torch.tensor(torch.finfo(p.dtype).tiny))
        off = (p.detach().float() - want.float()).abs() > ulp
        far += int(off.sum())
        total += off.numel()
        moved = float((want != start).float().mean())
        if off.any() and float(off.float().mean()) > worst[1]:
            worst = (f"{n} ({p.dtype}): {int(off.sum())}/{off.numel()} elements off; the fp32 trajectory moved "
                     f"{moved:.0%} of them in bf16, the team's optimizer {float((p.detach() != start).float().mean()):.0%}",
                     float(off.float().mean()))
    fraction = far / max(total, 1)
    gate = _profile(arch).thresholds()["small_update_mismatch"]
    record(figures={"small_update_mismatch": fraction, "elements": total, "lr": SMALL_LR, "steps": SMALL_STEPS},
           thresholds={"small_update_mismatch": gate})
    if not fraction <= gate:
        arch.fail("the optimizer loses updates smaller than the bf16 spacing of the weights", [
            f"small_update_mismatch = {fraction:.3g} (gate: <= {gate:.3g}): after {SMALL_STEPS} AdamW steps at lr "
            f"{SMALL_LR:g} on drawn gradients, that fraction of parameter elements is more than one bf16 step away "
            "from master-weight AdamW rounded to bf16", f"worst: {worst[0]}",
            "keep fp32 master weights for bf16 parameters (training.MasterWeightAdamW is the definition)"])


@conformance(dtypes=ANY_DTYPE)
def test_sft_checkpoint_reloads(arch, record, tmp_path):
    """The trained candidate, exported with to_hf into an on-disk checkpoint (+ tokenizer),
    reloads into the candidate (bit-identical logits; under bf16 cast as it trained, so an export
    that rounds what the model keeps in fp32 shows) and the reference (fp32: the logit parity
    gate; bf16: loaded as its own ``from_pretrained(dtype=bf16)`` would, next-token KL and the
    loose logit bound of the bf16 parity profile)."""
    run = _run(arch)
    _complete(arch, run)
    cand = run.cand_model
    low = arch.dtype != torch.float32
    exported = arch.to_hf({k: v.detach().cpu().clone() for k, v in cand.state_dict().items()})
    source = arch.save_reference(tmp_path / "original")
    folder = write_checkpoint(tmp_path / "trained", exported, source)
    tokenizer.copy_to(folder)
    disk = read_checkpoint(folder)
    reloaded_cand = arch.candidate(state=arch.to_candidate(disk), dtype=arch.dtype)
    reloaded_ref = load_reference(type(arch.reference()), folder, getattr(arch.spec.converter, "disk_prefix", ""),
                                  ignore=arch.extra_disk_keys, **({"dtype": arch.dtype} if low else {})).to(arch.device)
    batch = data.lm_batch(tokenizer.load(), 4, arch.case_seed + 2).to(arch.device)
    valid = batch.valid
    with torch.no_grad():
        trained = logits_of(cand(**batch.kwargs))[valid].double()
        again = logits_of(reloaded_cand(**batch.kwargs))[valid].double()
        ref = logits_of(reloaded_ref(**batch.kwargs, use_cache=False))[valid].double()
    cand_delta = float((trained - again).abs().max())
    ref_delta = float((trained - ref).abs().max())
    parity = tolerances.profile("logit_parity", str(arch.dtype).removeprefix("torch."), arch.spec.tolerances).thresholds()
    gate = parity["max_abs_logit_delta"]
    figures = {"reloaded_candidate_max_abs_logit_delta": cand_delta, "reloaded_reference_max_abs_logit_delta": ref_delta,
               "checkpoint_tensors": len(disk)}
    thresholds = {"reloaded_candidate_max_abs_logit_delta": 0.0, "reloaded_reference_max_abs_logit_delta": gate}
    if low:
        kl = float((trained.log_softmax(-1).exp() * (trained.log_softmax(-1) - ref.log_softmax(-1))).sum(-1).mean())
        figures["reloaded_reference_kl_mean"], thresholds["reloaded_reference_kl_mean"] = kl, parity["kl_mean"]
        figures["fp32_tensors_on_disk"] = sorted(k for k, v in disk.items() if v.dtype == torch.float32)[:8]
    record(figures=figures, thresholds=thresholds)
    problems = []
    if not cand_delta == 0.0:
        problems.append(f"the candidate reloaded from the checkpoint changes logits by up to {cand_delta:.3g} (must be 0)")
        trained_state, again_state = cand.state_dict(), reloaded_cand.state_dict()
        changed = [k for k, v in trained_state.items() if k in again_state
                   and not (v.dtype == again_state[k].dtype and torch.equal(v, again_state[k]))]
        if changed:
            disk_names = training.candidate_disk_names(arch, dict(trained_state))
            problems.append("tensors that differ after the reload: " + ", ".join(
                f"{k} ({trained_state[k].dtype} in the trained model, "
                f"{'/'.join(sorted({str(disk[d].dtype) for d in disk_names.get(k, []) if d in disk})) or '?'} on disk)"
                for k in changed[:4]) + (" (the export rounds what the model holds: write each tensor in its own "
                                         "dtype)" if low else ""))
    if not ref_delta <= gate:
        problems.append(f"the reference loaded from the trained checkpoint differs from the trained candidate by up to "
                        f"{ref_delta:.3g} (gate: <= {gate:.3g})")
    if low and not figures["reloaded_reference_kl_mean"] <= thresholds["reloaded_reference_kl_mean"]:
        problems.append(f"next-token KL between the trained candidate and the reference loaded from its checkpoint: "
                        f"{figures['reloaded_reference_kl_mean']:.3g} (gate: <= {thresholds['reloaded_reference_kl_mean']:.3g})")
    if problems:
        arch.fail("the trained checkpoint does not reload faithfully", problems)
