"""Engine weight sync: what an RL loop needs from ``Engine.load`` (BUGS.md #51).

An RL trainer hands the inference engine new weights after every optimizer step. Three
properties, each checked by the engine_parity suite for every engine (the arch's RL engine,
transformers, vLLM), on the prompt logprobs of the parity sequences:

- **identity**: sending the weights the engine already holds changes nothing (SGLang #28676:
  the logprob diff jumps after the first update; a loader that accumulates into its buffers is
  right on the first load only);
- **complete**: after an update the engine serves exactly what an engine built fresh on those
  weights serves: every parameter reached it (SkyRL #1471: grouped expert exports never yielded
  to the engine; a sync loop that skips one layer);
- **composes**: two updates (S1, then S2) leave the engine where one update to S2 does (an
  engine applying updates as deltas against a stale base passes a single update).

Each property compares the engine with the same engine (built fresh, or updated once), which
sees the update path alone, and with the trainer where the engine matched the trainer before the
update (an engine that disagrees with the trainer everywhere fails engine parity, not these): an
export that stops carrying new weights after the first one (every engine built on it is stale)
shows there. On failure the stale part is named: the trainer's logprobs with one group of
parameters (a layer, a kind: experts, router, attention, ...) held at the old weights are compared
with the engine's, and the group whose staleness reproduces the engine is reported.

``run(case, factory, seqs, states)`` runs the protocol once (six engine states, one engine at a
time; four for an engine that rebuilds on every load, ``Engine.rebuilds_on_load``, where an updated
engine is a fresh one) and returns every logprob list with the trainer's; the checks read it (the
suite computes it once per case and engine per run).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import engines
from .tolerances import Gate, Profile

# Engine against the same engine (fresh, or updated once): the same code on the same weights.
# Measured floor 0 (bit-identical) for the candidate (KV cache), transformers and vLLM (fp32 CPU)
# engines on every built-in arch; the gate leaves room for an engine whose kernels reduce in a
# different order run to run (fp32: ~1e-7 on logprobs). The planted bugs move logprobs by >= 1e-2.
PROFILE = Profile(
    gates={"max_abs_logprob_delta": Gate(1e-5)},
    why="engine vs the same engine after an update: floor 0 (bit-identical), gate for run-to-run reduction order",
)


def profile(overrides=None) -> Profile:
    return PROFILE.with_overrides("engine_sync", overrides or {})


# --------------------------------------------------------------------------------------------
# Updates: seeded perturbations of every floating tensor (routing margins kept clear of noise)


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """``state`` with every floating tensor moved by ``scale`` times its own spread (a 1-element
    or constant tensor by ``scale`` times its magnitude): an optimizer step's worth of change in
    every parameter, so a stale one shows."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        spread = float(v.float().std()) if v.numel() > 1 else 0.0
        if not spread > 0:
            spread = float(v.float().abs().mean()) or 1.0
        noise = torch.randn(v.shape, generator=gen, dtype=torch.float32) * (scale * spread)
        out[k] = (v.float() + noise.to(v.device)).to(v.dtype)
    return out


def routing_margin(case, state: dict[str, torch.Tensor], seqs: list[list[int]]) -> float:
    """The smallest top-k (and group) margin of the candidate's routing on ``seqs`` with these
    weights (inf when its probes give no router logits)."""
    from . import routing
    from .probing import RoutingTap
    from .training import selection_biases

    model = case.candidate(state=state)
    caps = case.spec.capabilities
    oracle = routing.from_config(case.model_config, caps.router_scoring, caps.correction_bias)
    try:
        tap = RoutingTap(model, case, "cand")
        biases = selection_biases(case, model, "cand")
    except Exception:  # noqa: BLE001 - no readable router: nothing to keep clear of
        return math.inf
    worst = math.inf
    with torch.no_grad():
        for s in seqs:
            with tap():
                model(input_ids=torch.tensor([s], device=case.device))
            try:
                readings = tap.ordered()
            except Exception:  # noqa: BLE001
                return math.inf
            for reading, bias in zip(readings, biases):
                if reading.logits is None:
                    return math.inf
                b = None if bias is None else bias[1].detach().to(reading.logits.device)
                for m in oracle.margins(reading.logits, routing.top_k(case.model_config), b).values():
                    worst = min(worst, float(m.min()))
    return worst


def updates(case, state: dict[str, torch.Tensor], seqs: list[list[int]], floor: float = 1e-5,
            attempts: int = 8) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two updates S1, S2 of ``state``, each drawn until its routing on ``seqs`` clears ``floor``
    (a near-tie would turn float noise between engines into a routing flip)."""
    out = []
    for which in (1, 2):
        for attempt in range(attempts):
            candidate = perturbed(state, case.case_seed + 1000 * which + attempt)
            if routing_margin(case, candidate, seqs) >= floor:
                break
        out.append(candidate)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------
# The protocol


@dataclass
class SyncRun:
    engine: str
    seqs: list[list[int]]
    logprobs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # step -> per sequence [len-1, V]
    seconds: float = 0.0
    engine_calls: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # the engine's own (vLLM: vllm, torch, transformers)
    rebuilds_on_load: bool = False  # Engine.rebuilds_on_load: "fresh S1" is "S1", "S0 -> S2" is "S1 -> S2"
    error: str | None = None

    # the steps, in order: the engine built on S0 ("S0"), S0 sent again ("S0 again"), then S1
    # ("S1"), then S2 ("S1 -> S2"); an engine built fresh on S1 ("fresh S1"); an engine built on
    # S0 that gets S2 ("S0 -> S2"); and the trainer's own logprobs on each ("trainer S0" ...)
    STEPS = ("S0", "S0 again", "S1", "fresh S1", "S1 -> S2", "S0 -> S2", "trainer S0", "trainer S1", "trainer S2")


def run(case, factory: Callable[..., engines.Engine], seqs: list[list[int]],
        states: tuple[dict, dict, dict]) -> SyncRun:
    """Every step of the protocol for the engine ``factory(case, state)`` makes."""
    import time

    s0, s1, s2 = states
    out = SyncRun(engine="?", seqs=seqs)
    start = time.perf_counter()
    opened = []

    def build(state):
        e = factory(case, state)
        opened.append(e)
        out.engine = getattr(e, "name", type(e).__name__)
        out.rebuilds_on_load = bool(getattr(e, "rebuilds_on_load", False))
        return e

    try:
        for name, state in (("trainer S0", s0), ("trainer S1", s1), ("trainer S2", s2)):
            out.logprobs[name] = engines.trainer_prompt_logprobs(case.candidate(state=state), seqs, case.device)
        e = build(s0)
        out.logprobs["S0"] = e.prompt_logprobs(seqs)
        e.load(s0)
        out.logprobs["S0 again"] = e.prompt_logprobs(seqs)
        e.load(s1)
        out.logprobs["S1"] = e.prompt_logprobs(seqs)
        e.load(s2)
        out.logprobs["S1 -> S2"] = e.prompt_logprobs(seqs)
        if out.rebuilds_on_load:  # an updated engine is a fresh one: the trainer comparisons decide
            out.logprobs["fresh S1"] = out.logprobs["S1"]
            out.logprobs["S0 -> S2"] = out.logprobs["S1 -> S2"]
        else:
            f = build(s1)
            out.logprobs["fresh S1"] = f.prompt_logprobs(seqs)
            f.close()
            g = build(s0)
            g.load(s2)
            out.logprobs["S0 -> S2"] = g.prompt_logprobs(seqs)
    except Exception as exc:  # noqa: BLE001 - a crash is a finding, reported by the checks
        import traceback

        out.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"
    finally:
        for e in opened:
            out.engine_calls += list(getattr(e, "starts", []))
            out.versions = dict(getattr(e, "versions", None) or out.versions)
            e.close()
    out.seconds = time.perf_counter() - start
    return out


def difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, str]:
    """max |a - b| over every finite log-probability, and where (sequence, position)."""
    worst, where = 0.0, "nowhere"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            return math.inf, f"sequence {i}: shapes {tuple(x.shape)} vs {tuple(y.shape)}"
        finite = torch.isfinite(x) & torch.isfinite(y)
        if not bool((torch.isfinite(x) == torch.isfinite(y)).all()):
            return math.inf, f"sequence {i}: -inf entries differ"
        d = (x.double() - y.double()).abs().masked_fill(~finite, 0.0)
        m = float(d.max()) if d.numel() else 0.0
        if m > worst:
            worst, where = m, f"sequence {i}, position {int(d.amax(-1).argmax()) + 1}"
    return worst, where


# --------------------------------------------------------------------------------------------
# Naming the stale part: trainer logprobs with one group held at the old weights


def _kind(disk_names: list[str], key: str) -> str:
    text = " ".join(disk_names) or key
    if re.search(r"shared_expert", text):
        return "shared experts"
    if re.search(r"experts\.", text):
        return "experts"
    if re.search(r"(mlp\.gate\.|\.router\.|e_score_correction_bias|block_sparse_moe\.gate\.)", text):
        return "router"
    if re.search(r"(self_attn|attention|\.attn\.)", text):
        return "attention"
    if re.search(r"norm", text):
        return "norms"
    if re.search(r"embed", text):
        return "embeddings"
    if re.search(r"lm_head", text):
        return "LM head"
    if re.search(r"mlp\.", text):
        return "dense MLP"
    return "other"


def groups(case, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Candidate tensors grouped by layer ("layer 2"), by kind across layers ("experts") and by
    both ("layer 2 experts"), the kinds read from the on-disk names each tensor feeds (traced
    through the converter: no candidate naming assumed)."""
    from .training import candidate_disk_names, layer_of

    disk = candidate_disk_names(case, state)
    prefix = getattr(case.spec.converter, "disk_prefix", "")
    out: dict[str, list[str]] = {}
    for key, names in disk.items():
        if not state[key].is_floating_point():
            continue
        names = [n.removeprefix(prefix) for n in names]
        layer = next((l for l in (layer_of(n) for n in names) if l is not None), layer_of(key))
        kind = _kind(names, key)
        out.setdefault(kind, []).append(key)
        if layer is not None:
            out.setdefault(f"layer {layer}", []).append(key)
            out.setdefault(f"layer {layer} {kind}", []).append(key)
    return out


def stale_parts(case, seqs, old: dict[str, torch.Tensor], new: dict[str, torch.Tensor],
                engine_lp: list[torch.Tensor], gate: float) -> list[str]:
    """Which parameter group, held at ``old`` while the rest is ``new``, makes the trainer
    reproduce the engine (the smallest such group; several when they tie)."""
    found = []
    trainer_new = engines.trainer_prompt_logprobs(case.candidate(state=new), seqs, case.device)
    far, _ = difference(engine_lp, trainer_new)
    trainer_old = engines.trainer_prompt_logprobs(case.candidate(state=old), seqs, case.device)
    whole, _ = difference(engine_lp, trainer_old)
    if whole <= gate:
        return [f"the engine serves the old weights entirely (max|delta| {whole:.3g} against the trainer on the old "
                f"weights, {far:.3g} against the new): the update did not reach the engine"]
    scored = []
    for name, keys in groups(case, new).items():
        hybrid = {k: (old[k] if k in keys else v) for k, v in new.items()}
        d, _ = difference(engine_lp, engines.trainer_prompt_logprobs(case.candidate(state=hybrid), seqs, case.device))
        scored.append((d, len(keys), name))
    scored.sort()
    if scored and scored[0][0] <= max(gate, 1e-3 * far):
        best = scored[0]
        ties = [s for s in scored if s[0] <= max(gate, 1e-3 * far)]
        # the largest group that reproduces it names the fault best (all experts, not one layer's)
        best = max(ties, key=lambda s: s[1])
        found.append(f"not synced: {best[2]} ({best[1]} tensor(s)): the trainer with them held at the old weights "
                     f"reproduces the engine (max|delta| {best[0]:.3g}; against the fully updated trainer {far:.3g})")
    else:
        closest = scored[0] if scored else None
        found.append("no single parameter group held at the old weights reproduces the engine"
                     + (f" (closest: {closest[2]}, max|delta| {closest[0]:.3g} vs {far:.3g} fully updated)" if closest else ""))
    return found
