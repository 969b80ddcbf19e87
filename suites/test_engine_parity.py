"""Engine parity and engine weight sync (fp32), for every engine an RL loop may roll out with.

**Parity**: the prompt logprobs an inference engine computes for a sequence match the trainer's
(one plain candidate forward) on the tiny checkpoint: KL mean and max over the full vocabulary,
top-1 agreement, max |delta logprob| of the actual next tokens. Engines: the arch's RL engine
(``ArchSpec.rl.engine``; by default the candidate with a KV cache, left-padded batches and
token-by-token decoding), the transformers reference (the checkpoint exported with ``to_hf`` and
loaded with ``from_pretrained``), and vLLM (``MOE_CONFORMANCE_VLLM_PYTHON`` or an importable
vllm) on one variant per arch: its engine variant (``Variant.families``, sized for vLLM's
kernels) where it declares one, else the faithful one. On failure: the first (sequence,
position) beyond the gate with both numbers and known faults by their signature (an off-by-one
shift); for vLLM also the first module output (embedding, per layer: input norm, attention,
post-attention norm, MLP/MoE, residual stream; final norm) where vLLM and transformers, on the
same checkpoint, disagree, and which engine is off (transformers on vLLM's checkpoint agreeing
with the trainer or not).

**Weight sync** (``moe_conformance.weight_sync``, BUGS.md #51), per engine: re-sending the
weights the engine holds changes nothing (identity); after an update the engine serves what an
engine built on those weights serves (complete; a stale layer or kind of parameter is named);
two updates end where one update to the final weights does (composes). The RL engine and
transformers run them on the faithful variant, vLLM on its variant.

**RL with vLLM rollouts** (``test_rl_vllm``): the rl family's GRPO loop for two steps with vLLM
as the engine, the engine/trainer mismatch on the sampled tokens under the rl gates.

vLLM engines are built by one worker process per pytest process (``engines.VLLMServer``: one
cold start, then ~2 s per engine); the parity and weight-sync checks of a case share one run of
the sync protocol (four vLLM engines: vLLM rebuilds on every load, so an updated engine is a
fresh one), computed once per pytest run even under pytest-xdist (``moe_conformance.shared_cache``).
"""

from __future__ import annotations

import pytest

from moe_conformance import engines, rl, shared_cache, tolerances, weight_sync
from moe_conformance.checks import conformance

ENGINES = ("candidate", "transformers", "vllm")


def _profile(arch):
    return tolerances.profile("engine_parity", "float32", arch.spec.tolerances)


def _factory(arch, engine_name):
    if engine_name == "candidate":
        return rl.hooks_for(arch.spec).engine
    return {"transformers": engines.TransformersEngine, "vllm": engines.VLLMEngine}[engine_name]


def _sync_applies(case, params) -> str | None:
    """The sync checks run once per arch and engine: vLLM on its variant, the others on faithful."""
    if params.get("engine_name") == "vllm":
        return engines.vllm_applies(case)
    if case.variant.name != "faithful":
        return "the weight-sync checks of the RL and transformers engines run on the faithful variant"
    return None


def _skip_without_vllm(arch, record):
    why = engines.vllm_skip_reason(arch)
    if why:
        record(figures={"engine": "vllm", "skipped_because": why})
        pytest.skip(f"vLLM not run for {arch.id}: {why}")


# --------------------------------------------------------------------------------------------
# The sync protocol, once per (case, engine): its first step is also the vLLM parity reading


@pytest.fixture(scope="session")
def _shared(tmp_path_factory):
    return shared_cache.run_directory(tmp_path_factory)


def _states(arch, seqs):
    s0 = arch.to_candidate(arch.disk_state)
    s1, s2 = weight_sync.updates(arch, s0, seqs)
    return s0, s1, s2


def _sync_run(arch, engine_name, shared) -> weight_sync.SyncRun:
    seqs = engines.parity_sequences(arch)

    def compute():  # plain data across processes
        return dict(vars(weight_sync.run(arch, _factory(arch, engine_name), seqs, _states(arch, seqs))))

    return weight_sync.SyncRun(**shared_cache.get(shared, f"sync/{arch.id}/{arch.seed}/{engine_name}", compute))


# --------------------------------------------------------------------------------------------
# Parity


def _shift_signature(trainer, engine, gate: float) -> str | None:
    for shift, words in ((1, "t+1"), (-1, "t-1")):
        deltas = []
        for t, e in zip(trainer, engine):
            if len(t) < 3 or len(e) != len(t):
                return None
            a, b = (e[:-1], t[1:]) if shift == 1 else (e[1:], t[:-1])
            deltas.append(float((a.double() - b.double()).abs().max()))
        if max(deltas) <= gate:
            return (f"off-by-one logprob shift: the engine's distribution at position t equals the trainer's at "
                    f"position {words} (max|delta| {max(deltas):.3g} after shifting); "
                    f"{'it scores token t with the logits of position t instead of t-1' if shift == 1 else 'it scores token t with the logits of position t-2'}")
    return None


def _parity_problems(arch, record, engine_name: str, got, seqs, trainer) -> list[str]:
    profile = _profile(arch)
    gates = profile.thresholds()
    record(thresholds=gates)
    bad_shape = [f"sequence {i} ({len(s)} tokens): {tuple(e.shape)} rows, expected {tuple(t.shape)}"
                 for i, (s, t, e) in enumerate(zip(seqs, trainer, got)) if tuple(e.shape) != tuple(t.shape)]
    if len(got) != len(seqs) or bad_shape:
        pytest.fail(f"{arch.id}: engine {engine_name!r} returned prompt logprobs of the wrong shape: "
                    + "; ".join(bad_shape[:4] or [f"{len(got)} sequences for {len(seqs)}"]), pytrace=False)
    figures = engines.parity_figures(trainer, got, seqs)
    record(figures={"engine": engine_name, **figures})
    problems = profile.violations(figures)
    if not problems:
        return []
    lines = [f"engine {engine_name!r} prompt logprobs differ from the trainer's: " + "; ".join(problems)]
    gate = gates["max_abs_logprob_delta"]
    for i, (s, t, e) in enumerate(zip(seqs, trainer, got)):
        d = (t.double() - e.double()).abs().amax(-1)
        over = (d > gate).nonzero()
        if len(over):
            p = int(over[0])
            lines.append(f"first divergence: sequence {i}, position {p + 1} (token {s[p + 1]}): max|delta logprob| "
                         f"{float(d[p]):.3g}; trainer logprob {float(t[p, s[p + 1]]):.4g}, engine {float(e[p, s[p + 1]]):.4g}")
            break
    signature = _shift_signature(trainer, got, gate)
    if signature:
        lines.append(signature)
    return lines


def _check(arch, record, engine_name: str, engine):
    seqs = engines.parity_sequences(arch)
    trainer = engines.trainer_prompt_logprobs(arch.candidate(), seqs, arch.device)
    problems = _parity_problems(arch, record, engine_name, engine.prompt_logprobs(seqs), seqs, trainer)
    if problems:
        pytest.fail(f"{arch.id}: " + "\n  ".join(problems), pytrace=False)


@pytest.mark.parametrize("engine_name", ["candidate", "transformers"])
def test_engine_parity(arch, record, engine_name):
    """The arch's RL engine (default: the candidate with a KV cache) and the transformers engine
    against the trainer's forward."""
    state = arch.to_candidate(arch.disk_state)
    engine = _factory(arch, engine_name)(arch, state)
    try:
        _check(arch, record, getattr(engine, "name", engine_name), engine)
    finally:
        engine.close()


def _localize_vllm(arch, seqs, trainer) -> list[str]:
    """Where vLLM departs from transformers on vLLM's own checkpoint, and which engine is off."""
    from moe_conformance.checkpoint import load_reference

    state = arch.to_candidate(arch.disk_state)
    engine = engines.VLLMEngine(arch, state)
    try:
        vllm_out = engine.layer_outputs(seqs[:1])[0]
        reference = load_reference(type(arch.reference()), engine.folder, "",
                                   ignore=getattr(arch, "extra_disk_keys", ())).to(arch.device)
        ref_out = engines.module_outputs(reference, seqs[0], arch.device)
        found = engines.localize(vllm_out, ref_out, "vLLM")
        lines = found["lines"] + engines.explain(reference, vllm_out, seqs[0], found["first"], "vLLM", arch.device)
        tf = engines.parity_figures(trainer, engines.trainer_prompt_logprobs(reference, seqs, arch.device), seqs)
    finally:
        engine.close()
    gate = _profile(arch).thresholds()["max_abs_logprob_delta"]
    if tf["max_abs_logprob_delta"] <= gate:
        lines.append(f"vLLM is off: transformers loading vLLM's checkpoint agrees with the trainer (max|delta logprob| "
                     f"{tf['max_abs_logprob_delta']:.3g}, gate {gate:.3g})")
    else:
        lines.append(f"the checkpoint is off, not (only) vLLM: transformers loading vLLM's checkpoint disagrees with the "
                     f"trainer too (max|delta logprob| {tf['max_abs_logprob_delta']:.3g}): the export (to_hf, config)")
    return lines


@conformance(applies=engines.vllm_applies)
def test_engine_parity_vllm(arch, record, _shared):
    """vLLM (the shared worker process, on the exported checkpoint + tokenizer) against the trainer."""
    _skip_without_vllm(arch, record)
    run = _sync_run(arch, "vllm", _shared)
    # the session's worker calls (engine builds) are recorded once per case, here
    record(figures={"vllm_versions": run.versions, "engine_builds": len(run.engine_calls), "vllm_call_seconds": run.engine_calls,
                    "sync_protocol_seconds": round(run.seconds, 2)})
    if run.error and "S0" not in run.logprobs:
        arch.fail("the vLLM engine failed", [run.error])
    seqs = run.seqs
    trainer = engines.trainer_prompt_logprobs(arch.candidate(), seqs, arch.device)
    problems = _parity_problems(arch, record, "vllm", run.logprobs["S0"], seqs, trainer)
    if problems:
        where = _localize_vllm(arch, seqs, trainer)
        record(figures={"localization": where})
        pytest.fail(f"{arch.id}: " + "\n  ".join(problems + where), pytrace=False)


# --------------------------------------------------------------------------------------------
# Weight sync


def _sync(arch, record, engine_name, shared) -> weight_sync.SyncRun:
    if engine_name == "vllm":
        _skip_without_vllm(arch, record)
    run = _sync_run(arch, engine_name, shared)
    record(figures={"engine": run.engine, "rebuilds_on_load": run.rebuilds_on_load},
           thresholds=weight_sync.profile(arch.spec.tolerances).thresholds())
    if run.error:
        arch.fail(f"engine {run.engine!r} crashed during the weight-sync protocol", [run.error])
    return run


def _compare(arch, record, run, got: str, want: str, what: str) -> tuple[float, str, float]:
    gate = weight_sync.profile(arch.spec.tolerances).thresholds()["max_abs_logprob_delta"]
    delta, where = weight_sync.difference(run.logprobs[got], run.logprobs[want])
    record(figures={f"max_abs_logprob_delta[{got} vs {want}]": delta})
    return delta, where, gate


def _trainer_drift(arch, record, run, step: str, trainer: str) -> tuple[str | None, float]:
    """Whether the engine, which matched the trainer on the first weights, stops matching it
    after the update (None: it still matches, or never did); the parity gate."""
    gate = _profile(arch).thresholds()["max_abs_logprob_delta"]
    before, _ = weight_sync.difference(run.logprobs["S0"], run.logprobs["trainer S0"])
    after, where = weight_sync.difference(run.logprobs[step], run.logprobs[trainer])
    record(figures={"engine_vs_trainer_before_update": before, f"engine_vs_trainer[{step}]": after})
    if before <= gate < after:
        return (f"it matched the trainer before the update (max|delta logprob| {before:.3g}) but not after it "
                f"({after:.3g} at {where}; gate {gate:.3g})"), gate
    return None, gate


@pytest.mark.parametrize("engine_name", ENGINES)
@conformance(applies=_sync_applies)
def test_engine_sync_identity(arch, record, engine_name, _shared):
    """Sending the engine the weights it already holds leaves its logprobs unchanged."""
    run = _sync(arch, record, engine_name, _shared)
    delta, where, gate = _compare(arch, record, run, "S0 again", "S0", "identity")
    if not delta <= gate:
        moved, _ = weight_sync.difference(run.logprobs["S0 again"], run.logprobs["S1"])
        arch.fail(f"engine {run.engine!r}: an identity update (the same weights again) changes its logprobs", [
            f"max|delta logprob| {delta:.3g} at {where} (gate: <= {gate:.3g}): the update is not idempotent: the "
            f"engine's loader transforms or accumulates what it loads (right on its first load only)",
            f"after that identity update the engine is {moved:.3g} from an engine updated to the next weights"])


@pytest.mark.parametrize("engine_name", ENGINES)
@conformance(applies=_sync_applies)
def test_engine_sync_complete(arch, record, engine_name, _shared):
    """After an update every parameter reached the engine: it serves what an engine built on the
    new weights serves (and, where it matched the trainer before, the trainer's logprobs on the
    new weights); a stale layer or kind of parameter is named."""
    run = _sync(arch, record, engine_name, _shared)
    delta, where, gate = _compare(arch, record, run, "S1", "fresh S1", "complete")
    drift, parity_gate = _trainer_drift(arch, record, run, "S1", "trainer S1")
    if not delta <= gate or drift:
        seqs = run.seqs
        s0, s1, _ = _states(arch, seqs)
        named = weight_sync.stale_parts(arch, seqs, s0, s1, run.logprobs["S1"], parity_gate)
        record(figures={"stale": named})
        if not delta <= gate:
            first = f"max|delta logprob| {delta:.3g} at {where} against an engine built on the new weights (gate: <= {gate:.3g})"
        elif run.rebuilds_on_load:
            first = f"{drift}; the engine is rebuilt from the export on every load: the export does not carry the new weights"
        else:
            first = f"{drift}, as is an engine built on the new weights: the export does not carry the new weights"
        arch.fail(f"engine {run.engine!r}: after a weight update it does not serve the new weights", [first, *named])


@pytest.mark.parametrize("engine_name", ENGINES)
@conformance(applies=_sync_applies)
def test_engine_sync_composes(arch, record, engine_name, _shared):
    """Two updates (S1, then S2) leave the engine where one update to S2 does (and, where it
    matched the trainer before, at the trainer's logprobs on S2)."""
    run = _sync(arch, record, engine_name, _shared)
    delta, where, gate = _compare(arch, record, run, "S1 -> S2", "S0 -> S2", "composes")
    drift, parity_gate = _trainer_drift(arch, record, run, "S1 -> S2", "trainer S2")
    if not delta <= gate or drift:
        seqs = run.seqs
        _, s1, s2 = _states(arch, seqs)
        single, _ = weight_sync.difference(run.logprobs["S1"], run.logprobs["fresh S1"])
        first = (f"after S1 then S2 its logprobs are {delta:.3g} (at {where}) from an engine given S2 in one update "
                 f"(gate: <= {gate:.3g}), while a single update lands ({single:.3g} from a fresh engine): the engine "
                 f"applies updates against a stale base (deltas from the weights it was built with, or a cached copy)"
                 if not delta <= gate else drift)
        arch.fail(f"engine {run.engine!r}: two updates do not compose",
                  [first, *weight_sync.stale_parts(arch, seqs, s1, s2, run.logprobs["S1 -> S2"], parity_gate)])


# --------------------------------------------------------------------------------------------
# RL with vLLM rollouts

VLLM_STEPS = 2  # each step builds an engine on the updated checkpoint (in the shared worker)


@conformance(applies=engines.vllm_applies)
def test_rl_vllm(arch, record):
    """The RL loop (moe_conformance.rl) with vLLM as the engine, on the arch's vLLM variant: KL and
    loss finite, the engine/trainer mismatch on the sampled tokens under the rl gates at every step."""
    import math

    _skip_without_vllm(arch, record)
    run = rl.run_rl(arch, rl.hooks_for(arch.spec), rl.RLConfig(steps=VLLM_STEPS), engine_factory=engines.VLLMEngine)
    gates = {k: v for k, v in tolerances.profile("rl", "float32", arch.spec.tolerances).thresholds().items()
             if k in ("mismatch_kl", "mismatch_max")}
    log, r = run.log, rl.rounded
    record(figures={"engine": "vllm", "steps": len(log.loss), "kl": r(log.kl), "loss": r(log.loss),
                    "mismatch_kl": r(log.mismatch_kl), "mismatch_max": r(log.mismatch_max),
                    "mismatch_max_worst": max(log.mismatch_max) if log.mismatch_max else math.nan,
                    "engine_starts": len(run.engine_seconds), "vllm_call_seconds": run.engine_seconds,
                    "curves": rl.mismatch_curves(arch.id, run)}, thresholds=gates)
    if log.error:
        arch.fail("the RL run crashed (engine 'vllm')", [log.error])
    problems = rl.mismatch_problems(run, list(range(len(log.mismatch_max))), gates)
    bad = [s for s, v in enumerate(log.kl + log.loss) if not math.isfinite(v)]
    if bad:
        problems.append(f"KL or loss not finite: kl {log.kl}, loss {log.loss}")
    if problems:
        arch.fail("vLLM and trainer disagree during RL", problems + rl.diagnose(run, list(range(len(log.kl))), gates))
