"""Expert parallelism (fp32; gloo on the CPU, NCCL with one GPU per rank under --device cuda).

The plugin declares how to shard its candidate (``ArchSpec(expert_parallel=ExpertParallel(
shard=..., ...))``, moe_conformance.contract). One launch per case (moe_conformance.distributed)
runs the shard on 2 and on 4 ranks, each rank on its own rows of the batch, and the same work on
one process, candidate and reference. The checks, for each world size:

- ``test_ep_shard_state``: every rank's shard holds exactly the full candidate's tensors where
  ``locate`` says (a wrong expert offset shows as the rows it holds instead), and the ranks
  together hold every expert row once;
- ``test_ep_experts_dispatch``: the experts module alone on drawn choices (spread, one hot
  expert, only the first experts, a rank with no token): each rank's outputs and the gradients
  of its inputs and routing weights equal the single-process experts' (dropped tokens are named
  by the slots whose terms are missing);
- ``test_ep_forward``: the model's logits on each rank's rows, and per MoE layer its routing and
  experts output, equal the single-process candidate's (first diverging layer named; routed
  scaling lost on the EP path is recognized), and the reference's logits;
- ``test_ep_gradients``: the ranks' loss shares add up to the batch loss; after the declared
  gradient reduction every parameter's gradient on every rank (router, replicated, expert rows)
  is the single-process gradient, and the assembled gradients match the reference's;
- ``test_ep_aux_loss``: the ranks' aux-loss shares add up to the single-process aux loss of the
  whole batch (load statistics all-reduced);
- ``test_ep_bias_update``: after the aux-loss-free bias update every rank's selection bias is the
  single-process update's (the load counted over the whole batch).

A rank that hangs or exits fails every check of the case naming the rank, and no process of the
launch outlives it. Gates: tolerances.PROFILES[("expert_parallel", "float32")].
"""

from __future__ import annotations

import math
import os
import weakref

import pytest
import torch

from moe_conformance import distributed, tolerances, training
from moe_conformance.checks import all_of, conformance, needs_capability, needs_routing_field
from moe_conformance.routing import from_config

pytestmark = pytest.mark.arch_variants("faithful")

# the world sizes checked (one launch of max(WORLD_SIZES) ranks per case); benchmarks/ep_gpu.py
# sets 1..N for a GPU host through the environment
WORLD_SIZES = tuple(int(w) for w in os.environ.get("MOE_CONFORMANCE_EP_WORLD_SIZES", "2,4").split(",") if w.strip())
ROUTING = ("forward", "converter", "state", "deterministic", "routing")
_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ---- applicability


def needs_expert_parallel(case) -> str | None:
    if getattr(case.spec, "expert_parallel", None) is not None:
        return None
    return ("no expert-parallel shard is declared: declare ArchSpec(expert_parallel=ExpertParallel(shard=..., "
            "locate=..., reduce_gradients=..., aux_loss=..., bias_update=...)) (moe_conformance.contract) to run the "
            "expert_parallel family")


def needs_ep_hook(hook: str, what: str):
    def applies(case) -> str | None:
        ep = getattr(case.spec, "expert_parallel", None)
        if ep is None or getattr(ep, hook) is not None:
            return needs_expert_parallel(case)
        return f"ExpertParallel.{hook} is not declared: declare the team's {what} to check it under expert parallelism"
    return applies


def needs_experts_probe(case) -> str | None:
    if case.spec.probes.experts is not None:
        return None
    return "Probes.experts is None: declare ExpertsProbe(call=...) so the experts module can be driven on its own"


# ---- the shared launch


def _run(arch) -> distributed.EPRun:
    if arch not in _RUNS:
        sizes = WORLD_SIZES
        if arch.device.type == "cuda":
            sizes = tuple(w for w in WORLD_SIZES if w <= torch.cuda.device_count())
        _RUNS[arch] = distributed.run_expert_parallel(arch, sizes) if sizes else None
    return _RUNS[arch]


def _ready(arch, world_size: int, record) -> distributed.EPRun:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    run = _run(arch)
    if run is None or world_size not in run.world_sizes:
        pytest.skip(f"{world_size} ranks need {world_size} GPUs (one per rank); {torch.cuda.device_count()} visible")
    record(figures={"launch_seconds": round(run.seconds, 2)})
    if run.error:
        arch.fail(f"the expert-parallel launch on {max(run.world_sizes)} ranks failed", [run.error])
    return run


def _profile(arch):
    return tolerances.profile("expert_parallel", "float32", arch.spec.tolerances)


def _gates(arch, *names: str) -> dict[str, float]:
    limits = _profile(arch).thresholds()
    return {n: limits[n] for n in names}


def _rel(delta: float, scale: float) -> float:
    return delta / scale if scale > 0 else (0.0 if delta == 0 else math.inf)


def _max_delta(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    d = (a.double() - b.double()).abs()
    return float(d.max()) if torch.isfinite(d).all() else math.inf


def _ranges(rows: list[int]) -> str:
    """[0, 1, 2, 5] -> '0:3, 5'"""
    if not rows:
        return "none"
    out, start, prev = [], rows[0], rows[0]
    for x in rows[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}:{prev + 1}" if prev > start else str(start))
        if x is not None:
            start = prev = x
    return ", ".join(out)


def _placements(run: distributed.EPRun, w: int) -> list[dict[str, tuple[str, int | None, int | None]]]:
    """Per rank, shard tensor -> (full name, first row, stop row); None rows: the whole tensor.
    ExpertParallel.locate None: same name, a shorter first dimension = contiguous rows in rank order."""
    full = run.single["state"]
    out, next_row = [], {}
    for res in run.ranks[w]:
        placed = {}
        for name, (full_name, a, b) in res["located"].items():
            if a == distributed.DEFAULT_ROWS:
                t, f = res["state"][name], full.get(full_name)
                if f is not None and t.dim() and t.shape[0] < f.shape[0] and t.shape[1:] == f.shape[1:]:
                    a = next_row.get(full_name, 0)
                    b = a + t.shape[0]
                    next_row[full_name] = b
                else:
                    a = b = None
            placed[name] = (full_name, a, b)
        out.append(placed)
    return out


def _routing_drift(run: distributed.EPRun, w: int) -> str | None:
    """Why the ranks' routing is not the single process's (None: the same experts on every
    valid token): aux-loss and bias figures then follow from a forward that already differs."""
    mask = run.inputs["batch"]["kwargs"]["attention_mask"].bool()
    S = mask.shape[1]
    flips = 0
    for r, res in enumerate(run.ranks[w]):
        b0, b1 = run.inputs["batch_rows"][w][r]
        tokens = mask[b0:b1].reshape(-1)
        for got, want in zip(res["routing"], run.single["routing"]):
            g, e = got["indices"][tokens], want["indices"][b0 * S:b1 * S][tokens]
            flips += int((g.sort(-1).values != e.sort(-1).values).any(-1).sum())
    if flips:
        return (f"the ranks route {flips} (token, layer) decisions differently from the single process, so this "
                f"follows from a forward that already differs (see test_ep_forward)")
    return None


def _where(full_name: str, a, b) -> str:
    return full_name if a is None else f"{full_name}[{a}:{b}]"


# ---- checks


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda w: f"{w}ranks")
@conformance(applies=needs_expert_parallel)
def test_ep_shard_state(arch, world_size, record):
    """Each rank holds the full candidate's tensors where its ``locate`` says, bit-exactly, and
    the ranks together hold every expert row exactly once."""
    run = _ready(arch, world_size, record)
    full = run.single["state"]
    placements = _placements(run, world_size)
    problems = []
    rows_by: dict[str, list[list[int]]] = {}
    whole_by: dict[str, list[int]] = {}
    per_rank_rows = []
    for r, (res, placed) in enumerate(zip(run.ranks[world_size], placements)):
        sharded = {}
        for name, t in sorted(res["state"].items()):
            full_name, a, b = placed[name]
            f = full.get(full_name)
            if f is None:
                problems.append(f"rank {r}: shard tensor {name} is located at {full_name}, which the full candidate's "
                                f"state does not have")
                continue
            want = f if a is None else f[a:b]
            if tuple(t.shape) != tuple(want.shape):
                problems.append(f"rank {r}: {name} has shape {tuple(t.shape)}, but {_where(full_name, a, b)} is "
                                f"{tuple(want.shape)}")
                continue
            if a is None:
                whole_by.setdefault(full_name, []).append(r)
            else:
                cover = rows_by.setdefault(full_name, [[] for _ in range(f.shape[0])])
                for i in range(a, b):
                    cover[i].append(r)
                sharded[name] = (a, b)
            if not torch.equal(t, want):
                held = [next((j for j in range(f.shape[0]) if torch.equal(row, f[j])), None) for row in t] if a is not None else []
                if held and all(j is not None for j in held):
                    problems.append(f"rank {r}: {name} should hold rows {a}:{b} of {full_name} (its experts {a}..{b - 1}) "
                                    f"but holds rows {_ranges(held)}: a wrong expert offset on this rank")
                else:
                    problems.append(f"rank {r}: {name} differs from {_where(full_name, a, b)} of the full candidate "
                                    f"(max |delta| {_max_delta(t, want):.3g}): the shard does not hold the loaded weights")
        per_rank_rows.append(sorted({f"{a}:{b}" for a, b in sharded.values()}))
    for full_name, f in sorted(full.items()):
        if full_name in whole_by:
            continue
        cover = rows_by.get(full_name)
        if cover is None:
            problems.append(f"{full_name}: held by no rank (every tensor of the full candidate must be on some rank)")
            continue
        missing = [i for i, holders in enumerate(cover) if not holders]
        twice = [i for i, holders in enumerate(cover) if len(holders) > 1]
        if missing:
            problems.append(f"{full_name}: rows (experts) {_ranges(missing)} are held by no rank")
        if twice:
            problems.append(f"{full_name}: rows (experts) {_ranges(twice)} are held by more than one rank "
                            f"(ranks {sorted({h for i in twice for h in cover[i]})})")
    record(figures={"sharded_tensors": len(rows_by), "replicated_tensors": len(whole_by),
                    "expert_rows_per_rank": per_rank_rows})
    if problems:
        arch.fail(f"on {world_size} ranks, the shards do not hold the full candidate's weights", problems)


def _slots_missing(contrib: torch.Tensor, got: torch.Tensor, tol: float) -> tuple[int, ...] | None:
    """The slots whose terms are absent from ``got`` (one token's output), if leaving out some
    slots explains it within ``tol``; None otherwise."""
    K = contrib.shape[0]
    best = None
    for mask in range(2 ** K):
        kept = [k for k in range(K) if mask >> k & 1]
        total = contrib[kept].sum(0) if kept else torch.zeros_like(got)
        d = float((total - got).abs().max())
        if best is None or d < best[0]:
            best = (d, tuple(k for k in range(K) if not mask >> k & 1))
    return best[1] if best and best[0] <= tol and best[1] else None


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda w: f"{w}ranks")
@conformance(requires=ROUTING + ("experts",), applies=all_of(needs_expert_parallel, needs_experts_probe))
def test_ep_experts_dispatch(arch, world_size, record):
    """The experts module alone, on each rank's tokens with drawn choices: outputs, and the
    gradients of its inputs and routing weights, equal the single-process experts'."""
    run = _ready(arch, world_size, record)
    gate = _gates(arch, "dispatch_rel_delta")["dispatch_rel_delta"]
    worst: dict[str, float] = {}
    problems = []
    for s in distributed.SCENARIOS:
        drawn = run.inputs["scenarios"][s.name]
        single = run.single["dispatch"][s.name]
        for r, res in enumerate(run.ranks[world_size]):
            lo, hi = drawn["rows"][world_size][r]
            for name, got in sorted(res["dispatch"][s.name].items()):
                want = single[name]
                for key, label in (("out", "output"), ("grad_x", "input gradient"), ("grad_weights", "routing-weight gradient")):
                    g, full = got[key], want[key]
                    e = full[lo:hi]
                    if g is None:
                        if hi > lo:
                            problems.append(f"rank {r}, '{s.name}' choices: {name} gives no {label}")
                        continue
                    if tuple(g.shape) != tuple(e.shape):
                        problems.append(f"rank {r}, '{s.name}' choices: {name} {label} has shape {tuple(g.shape)}, "
                                        f"expected {tuple(e.shape)}")
                        continue
                    scale = float(full.abs().max())
                    rel = _rel(_max_delta(g, e), scale)
                    worst[key] = max(worst.get(key, 0.0), rel)
                    if rel <= gate:
                        continue
                    line = (f"rank {r}, '{s.name}' choices ({s.what}): {name} {label} differs from the single-process "
                            f"experts': max rel delta {rel:.3g} (gate: <= {gate:.3g})")
                    if key == "out":
                        bad = [i for i in range(hi - lo) if _rel(_max_delta(g[i], e[i]), scale) > gate]
                        line += f" on {len(bad)} of {hi - lo} token rows"
                        contrib = run.single["contributions"][s.name][name]
                        idx = drawn["indices"]
                        missing = {}
                        for i in bad:
                            slots = _slots_missing(contrib[lo + i], g[i].float(), gate * scale * 10)
                            if slots is not None:
                                missing[lo + i] = [int(idx[lo + i, k]) for k in slots]
                        if missing:
                            experts = sorted({x for v in missing.values() for x in v})
                            line += (f"; {len(missing)} of them lack exactly the terms of their slots on expert(s) "
                                     f"{experts} (e.g. token {next(iter(missing))}: {next(iter(missing.values()))}): those "
                                     f"(token, expert) pairs never came back: tokens silently dropped (a capacity "
                                     f"limit?) or sent to a rank that does not compute them")
                    problems.append(line)
    record(figures={f"dispatch_rel_delta.{k}": v for k, v in worst.items()},
           thresholds={f"dispatch_rel_delta.{k}": gate for k in worst})
    if problems:
        arch.fail(f"on {world_size} ranks, the expert-parallel experts module differs from the single-process one",
                  problems)


def _scaling_hint(ep: torch.Tensor, single: torch.Tensor, scale: float, what: str) -> str | None:
    """'the EP path's {what} are the single-process ones / routed_scaling_factor' and the like."""
    if scale == 1.0 or single.numel() == 0:
        return None
    denom = float((single.double() * single.double()).sum())
    if denom == 0:
        return None
    ratio = float((ep.double() * single.double()).sum()) / denom
    if abs(ratio * scale - 1) < 1e-3:
        return (f"the EP path's {what} are the single-process ones divided by routed_scaling_factor {scale:g} "
                f"(ratio {ratio:.4g}): the routed scaling is skipped on the expert-parallel path")
    if abs(ratio / scale - 1) < 1e-3:
        return (f"the EP path's {what} are the single-process ones times routed_scaling_factor {scale:g}: the routed "
                f"scaling is applied twice on the expert-parallel path")
    return None


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda w: f"{w}ranks")
@conformance(requires=ROUTING, applies=needs_expert_parallel)
def test_ep_forward(arch, world_size, record):
    """Logits on each rank's rows, and per MoE layer the routing and the experts' output, equal
    the single-process candidate's; the logits equal the reference's."""
    run = _ready(arch, world_size, record)
    gates = _gates(arch, "logits_max_abs_delta", "routing_mismatched_tokens", "routing_weights_max_abs_delta",
                   "experts_out_rel_delta")
    ref_gate = tolerances.profile("logit_parity", "float32", arch.spec.tolerances).thresholds()["max_abs_logit_delta"]
    caps = arch.spec.capabilities
    scaling = from_config(arch.model_config, caps.router_scoring, caps.correction_bias).routed_scaling_factor
    single, reference = run.single, run.reference
    mask = run.inputs["batch"]["kwargs"]["attention_mask"].bool()
    S = mask.shape[1]
    figures = {"logits_max_abs_delta": 0.0, "logits_max_abs_delta_vs_reference": 0.0, "routing_mismatched_tokens": 0,
               "routing_weights_max_abs_delta": 0.0, "experts_out_rel_delta": 0.0}
    problems = []
    for r, res in enumerate(run.ranks[world_size]):
        b0, b1 = run.inputs["batch_rows"][world_size][r]
        valid = mask[b0:b1]
        got = res["logits"]
        d = _max_delta(got[valid], single["logits"][b0:b1][valid])
        d_ref = _max_delta(got[valid], reference["logits"][b0:b1][valid])
        figures["logits_max_abs_delta"] = max(figures["logits_max_abs_delta"], d)
        figures["logits_max_abs_delta_vs_reference"] = max(figures["logits_max_abs_delta_vs_reference"], d_ref)
        layer_lines = []
        tokens = valid.reshape(-1)
        for got_l, want_l in zip(res["routing"], single["routing"]):
            where = got_l["router"] or got_l["experts"]
            w_idx, w_w = want_l["indices"][b0 * S:b1 * S][tokens], want_l["weights"][b0 * S:b1 * S][tokens]
            g_idx, g_w = got_l["indices"][tokens], got_l["weights"][tokens]
            flips = int((g_idx.sort(-1).values != w_idx.sort(-1).values).any(-1).sum())
            figures["routing_mismatched_tokens"] += flips
            if flips > gates["routing_mismatched_tokens"]:
                layer_lines.append(f"{where}: selected experts differ on {flips} of {int(tokens.sum())} tokens")
                continue
            order_g, order_w = g_idx.argsort(-1), w_idx.argsort(-1)
            wd = _max_delta(g_w.gather(-1, order_g), w_w.gather(-1, order_w))
            figures["routing_weights_max_abs_delta"] = max(figures["routing_weights_max_abs_delta"], wd)
            if wd > gates["routing_weights_max_abs_delta"]:
                hint = _scaling_hint(g_w.gather(-1, order_g), w_w.gather(-1, order_w), scaling, "routing weights")
                layer_lines.append(f"{where}: routing weights differ by up to {wd:.3g} (gate: <= "
                                   f"{gates['routing_weights_max_abs_delta']:.3g})" + (f": {hint}" if hint else ""))
                continue
            name = got_l["experts"]
            if name and name in res["experts_out"] and name in single["experts_out"]:
                g_out = res["experts_out"][name].reshape(-1, res["experts_out"][name].shape[-1])[tokens]
                w_out = single["experts_out"][name].reshape(-1, g_out.shape[-1])[b0 * S:b1 * S][tokens]
                rel = _rel(_max_delta(g_out, w_out), float(w_out.abs().max()) if w_out.numel() else 0.0)
                figures["experts_out_rel_delta"] = max(figures["experts_out_rel_delta"], rel)
                if rel > gates["experts_out_rel_delta"]:
                    hint = _scaling_hint(g_out, w_out, scaling, "experts outputs")
                    layer_lines.append(f"{name}: output differs by rel {rel:.3g} (gate: <= {gates['experts_out_rel_delta']:.3g})"
                                       + (f": {hint}" if hint else ""))
        if d > gates["logits_max_abs_delta"] or layer_lines:
            line = (f"rank {r} (batch rows {b0}:{b1}): logits differ from the single-process candidate's by up to "
                    f"{d:.3g} (gate: <= {gates['logits_max_abs_delta']:.3g})")
            if layer_lines:
                line += f"; first divergence at {layer_lines[0]}"
            problems.append(line)
        if d_ref > ref_gate:
            problems.append(f"rank {r} (batch rows {b0}:{b1}): logits differ from the reference's by up to {d_ref:.3g} "
                            f"(gate: <= {ref_gate:.3g}, logit_parity's)")
    record(figures=figures, thresholds={**gates, "logits_max_abs_delta_vs_reference": ref_gate})
    if problems:
        arch.fail(f"on {world_size} ranks, the expert-parallel forward differs", problems)


def _assembled(run: distributed.EPRun, w: int, placements, key: str = "grads") -> dict[str, torch.Tensor]:
    """The full candidate's tensors put together from the ranks' pieces (replicated ones from
    rank 0)."""
    out = {}
    for full_name, f in run.single["grads"].items():
        out[full_name] = torch.zeros_like(f)
    for r in reversed(range(w)):
        for name, g in run.ranks[w][r][key].items():
            full_name, a, b = placements[r][name]
            if g is None or full_name not in out:
                continue
            if a is None:
                out[full_name] = g.clone()
            elif tuple(out[full_name][a:b].shape) == tuple(g.shape):
                out[full_name][a:b] = g
    return out


def _group(disk_names: dict, name: str) -> str:
    keys = disk_names.get(name) or []
    groups = {training.group_of(k) for k in keys}
    return groups.pop() if len(groups) == 1 else "other"


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda w: f"{w}ranks")
@conformance(requires=ROUTING, applies=needs_expert_parallel)
def test_ep_gradients(arch, world_size, record):
    """The loss shares add up to the batch loss; after the declared reduction every gradient on
    every rank is the single-process gradient (router, replicated and expert rows), and the
    assembled gradients match the reference's."""
    run = _ready(arch, world_size, record)
    gates = _gates(arch, "loss_rel_delta", "grad_rel_delta")
    ref_gates = tolerances.profile("router_grad", "float32", arch.spec.tolerances).thresholds()
    single = run.single
    ranks = run.ranks[world_size]
    placements = _placements(run, world_size)
    loss = sum(res["loss_share"] for res in ranks)
    figures = {"loss": loss, "loss_rel_delta": _rel(abs(loss - single["loss"]), abs(single["loss"])),
               "loss_rel_delta_vs_reference": _rel(abs(loss - run.reference["loss"]), abs(run.reference["loss"]))}
    problems = []
    for key, other, whose in (("loss_rel_delta", single["loss"], "single-process candidate's"),
                              ("loss_rel_delta_vs_reference", run.reference["loss"], "reference's")):
        if not figures[key] <= gates["loss_rel_delta"]:
            problems.append(f"the ranks' loss shares {[round(x['loss_share'], 6) for x in ranks]} add up to {loss:.7g}, "
                            f"the {whose} loss is {other:.7g} (rel delta {figures[key]:.3g}, gate: <= "
                            f"{gates['loss_rel_delta']:.3g})" + (": the forward already differs (see test_ep_forward)"
                                                                   if key == "loss_rel_delta" else ""))
    worst: dict[str, float] = {}
    for r, (res, placed) in enumerate(zip(ranks, placements)):
        for name, g in sorted(res["grads"].items()):
            full_name, a, b = placed[name]
            full = single["grads"].get(full_name)
            if full is None:
                continue
            want = full if a is None else full[a:b]
            scale = float(full.abs().max())
            where = f"{name}" + ("" if a is None else f" (rows {a}:{b})")
            if g is None:
                if scale > 0:
                    problems.append(f"rank {r}: {where}: no gradient, the single-process gradient is non-zero")
                continue
            rel = _rel(_max_delta(g, want), scale)
            group = _group(single["disk_names"], full_name)
            worst[group] = max(worst.get(group, 0.0), rel)
            if rel <= gates["grad_rel_delta"]:
                continue
            line = (f"rank {r}: {where} gradient differs from the single-process gradient: rel delta {rel:.3g} (gate: "
                    f"<= {gates['grad_rel_delta']:.3g})")
            if a is None:
                others = [ranks[q]["grads"].get(n) for q in range(world_size)
                          for n, (fn, _, _) in placements[q].items() if fn == full_name]
                if all(o is not None for o in others) and len(others) == world_size:
                    summed = torch.stack([o.double() for o in others]).sum(0)
                    if _rel(_max_delta(summed, want), scale) <= gates["grad_rel_delta"]:
                        line += ("; the ranks' gradients add up to it: this replicated parameter's gradient is not "
                                 "all-reduced over the group (ExpertParallel.reduce_gradients)")
                    elif _rel(_max_delta(g * world_size, want), scale) <= gates["grad_rel_delta"]:
                        line += (f"; it is the batch gradient / {world_size}: averaged over the ranks, where each rank's "
                                 f"loss is already its share (sum them)")
                    elif _rel(_max_delta(g / world_size, want), scale) <= gates["grad_rel_delta"]:
                        line += f"; it is {world_size} x the batch gradient: reduced twice"
            problems.append(line)
    for group, v in worst.items():
        figures[f"grad_rel_delta.{group}"] = v
    parity = training.grad_parity(run.reference["disk_grads"], arch.to_hf(_assembled(run, world_size, placements)))
    for k, v in parity.figures.items():
        figures[k.replace("grad_rel_delta.", "grad_rel_delta_vs_reference.")] = v
    thresholds = {"loss_rel_delta": gates["loss_rel_delta"], "loss_rel_delta_vs_reference": gates["loss_rel_delta"],
                  **{f"grad_rel_delta.{g}": gates["grad_rel_delta"] for g in worst}}
    for k, v in parity.figures.items():
        limit = ref_gates.get(k)
        if limit is None:
            continue
        thresholds[k.replace("grad_rel_delta.", "grad_rel_delta_vs_reference.")] = limit
        if not v <= limit:
            key, _ = parity.worst[k.removeprefix("grad_rel_delta.")]
            problems.append(f"assembled over the {world_size} ranks, the {k.removeprefix('grad_rel_delta.')} gradients "
                            f"differ from the reference's: rel delta {v:.3g} (gate: <= {limit:.3g}, router_grad's); worst "
                            f"tensor {key}")
    problems += [f"assembled gradients: {p}" for p in parity.problems]
    record(figures=figures, thresholds=thresholds)
    if problems:
        arch.fail(f"on {world_size} ranks, the expert-parallel gradients differ", problems)


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda w: f"{w}ranks")
@conformance(requires=ROUTING, applies=all_of(needs_ep_hook("aux_loss", "distributed aux loss (ExpertParallel.aux_loss)"),
                                              needs_routing_field("logits")))
def test_ep_aux_loss(arch, world_size, record):
    """The ranks' aux-loss shares add up to the single-process aux loss of the whole batch."""
    run = _ready(arch, world_size, record)
    gate = _gates(arch, "aux_rel_delta")["aux_rel_delta"]
    hooks = training.hooks_for(arch.spec)
    k = arch.model_config.num_experts_per_tok
    ranks = run.ranks[world_size]
    errors = [f"rank {r}: {res['aux_error']}" for r, res in enumerate(ranks) if "aux_error" in res]
    if errors or any("aux_share" not in res for res in ranks):
        arch.fail(f"on {world_size} ranks, the distributed aux loss could not be computed",
                  errors or ["the ranks' routing probes gave no router logits"])
    shares = [res["aux_share"] for res in ranks]
    total = sum(shares)
    want = run.single["aux"]
    rel = abs(total - want) / max(abs(want), 1e-30)
    record(figures={"aux_ep": total, "aux_single_process": want, "aux_rel_delta": rel, "aux_shares": shares},
           thresholds={"aux_rel_delta": gate})
    if rel <= gate:
        return
    mask = run.inputs["batch"]["kwargs"]["attention_mask"]
    local = []
    for r, res in enumerate(ranks):
        b0, b1 = run.inputs["batch_rows"][world_size][r]
        logits = tuple(layer["logits"] for layer in res["routing"])
        local.append(float(hooks.aux_loss(logits, k, mask[b0:b1])) if b1 > b0 else 0.0)
    problems = [f"rank {r}: aux-loss share {s:.6g} (its own tokens alone give {l:.6g})" for r, (s, l) in
                enumerate(zip(shares, local))]
    hint = []
    drift = _routing_drift(run, world_size)
    if drift:
        hint.append(drift)
    elif abs(total - sum(local) / world_size) <= gate * abs(want):
        hint.append("the shares add up to the mean of the ranks' own aux losses: the load statistics (tokens per "
                    "expert) are not all-reduced over the group before the aux loss")
    elif abs(total - want * world_size) <= gate * abs(want) * world_size:
        hint.append(f"the shares add up to {world_size} x the batch's aux loss: every rank returns the whole batch's "
                    f"aux loss instead of its share")
    arch.fail(f"on {world_size} ranks, the aux loss of the whole batch is {total:.6g} (sum of the ranks' shares), the "
              f"single-process aux loss is {want:.6g} (rel delta {rel:.3g}, gate: <= {gate:.3g})", problems + hint)


@pytest.mark.parametrize("world_size", WORLD_SIZES, ids=lambda w: f"{w}ranks")
@conformance(requires=ROUTING, applies=all_of(
    needs_capability("correction_bias", "no selection-only bias, so no aux-loss-free balancing"),
    needs_ep_hook("bias_update", "distributed aux-loss-free bias update (ExpertParallel.bias_update)")))
def test_ep_bias_update(arch, world_size, record):
    """After the bias update every rank's selection bias is the single-process update's, made
    from the whole batch's load."""
    run = _ready(arch, world_size, record)
    gate = _gates(arch, "bias_max_abs_delta")["bias_max_abs_delta"]
    hooks = training.hooks_for(arch.spec)
    ranks = run.ranks[world_size]
    figures = {"bias_max_abs_delta": 0.0, "load_max_abs_delta": 0.0, "bias_layers": len(run.single["bias"])}
    problems = []
    if not run.single["bias"]:
        arch.fail("capabilities say correction bias, but no candidate tensor converts to the reference's selection bias", [])
    errors = [f"rank {r}: {res['bias_error']}" for r, res in enumerate(ranks) if "bias_error" in res]
    if errors:
        arch.fail(f"on {world_size} ranks, the distributed bias update failed", errors)
    for name, want in run.single["bias"].items():
        loads = []
        for r, res in enumerate(ranks):
            got = res.get("bias", {}).get(name)
            if got is None:
                problems.append(f"rank {r}: {name} was not updated (no selection bias found in the shard under this name)")
                continue
            loads.append(got["local_load"])
            d = _max_delta(got["after"], want["after"])
            figures["bias_max_abs_delta"] = max(figures["bias_max_abs_delta"], d)
            if d <= gate:
                continue
            off = int(((got["after"].double() - want["after"].double()).abs() > gate).sum())
            line = (f"rank {r}: {name} after the bias update differs from the single-process update on {off} of "
                    f"{want['after'].numel()} experts (max |delta| {d:.3g}, gate: <= {gate:.3g})")
            alone = want["before"].clone()
            hooks.bias_update(alone, got["local_load"], distributed.BIAS_RATE)
            drift = _routing_drift(run, world_size)
            if drift:
                line += f"; {drift}"
            elif _max_delta(got["after"], alone) <= gate:
                line += (f"; it equals the update from rank {r}'s own load {got['local_load'].int().tolist()} (the "
                         f"batch's is {want['load'].int().tolist()}): the load counts are not all-reduced over the "
                         f"group before the update")
            problems.append(line)
        if len(loads) == len(ranks):
            figures["load_max_abs_delta"] = max(figures["load_max_abs_delta"], _max_delta(torch.stack(loads).sum(0), want["load"]))
    record(figures=figures, thresholds={"bias_max_abs_delta": gate})
    if problems:
        arch.fail(f"on {world_size} ranks, the aux-loss-free bias update differs from the single-process one", problems)
