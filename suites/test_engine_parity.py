"""Engine parity (fp32): the prompt logprobs an inference engine computes for a sequence match
the trainer's (one plain candidate forward) on the tiny checkpoint: KL mean and max over the
full vocabulary, top-1 agreement, max |delta logprob| of the actual next tokens.

Engines: the arch's RL engine (``ArchSpec.rl.engine``; by default the candidate with a KV cache,
left-padded batches and token-by-token decoding), the transformers reference (the checkpoint
exported with ``to_hf`` and loaded with ``from_pretrained``), and vLLM when it is available
(``MOE_CONFORMANCE_VLLM_PYTHON`` or an importable vllm) and can load the tiny config (skipped
with the reason otherwise). vLLM loads the on-disk checkpoint + tokenizer in a worker process;
one engine start answers the check.

On failure the check localizes like logit_parity: the first (sequence, position) beyond the gate
with the trainer's and the engine's numbers, and known faults recognized by their signature (an
off-by-one shift: the engine's distribution at position t is the trainer's at t +/- 1).
"""

from __future__ import annotations

import pytest

from moe_conformance import engines, rl, tolerances


def _profile(arch):
    return tolerances.profile("engine_parity", "float32", arch.spec.tolerances)


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


def _check(arch, record, engine_name: str, engine):
    seqs = engines.parity_sequences(arch)
    trainer_model = arch.candidate()
    trainer = engines.trainer_prompt_logprobs(trainer_model, seqs, arch.device)
    got = engine.prompt_logprobs(seqs)
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
        return figures
    lines = [f"{arch.id}: engine {engine_name!r} prompt logprobs differ from the trainer's: " + "; ".join(problems)]
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
    pytest.fail("\n  ".join(lines), pytrace=False)


@pytest.mark.parametrize("engine_name", ["candidate", "transformers"])
def test_engine_parity(arch, record, engine_name):
    """The arch's RL engine (default: the candidate with a KV cache) and the transformers engine
    against the trainer's forward."""
    state = arch.to_candidate(arch.disk_state)
    factory = rl.hooks_for(arch.spec).engine if engine_name == "candidate" else engines.TransformersEngine
    engine = factory(arch, state)
    try:
        _check(arch, record, getattr(engine, "name", engine_name), engine)
    finally:
        engine.close()


@pytest.mark.arch_variants("faithful")
def test_engine_parity_vllm(arch, record):
    """vLLM (a worker process on the on-disk checkpoint + tokenizer) against the trainer."""
    why = engines.unavailable("vllm", arch)
    if why:
        record(figures={"engine": "vllm", "skipped_because": why})
        pytest.skip(f"vLLM not run for {arch.id}: {why}")
    state = arch.to_candidate(arch.disk_state)
    engine = engines.VLLMEngine(arch, state)
    try:
        _check(arch, record, "vllm", engine)
    finally:
        # (wall seconds, engine start included, are the check's own `seconds` in the report)
        record(figures={"engine_starts": len(engine.starts), "vllm_versions": getattr(engine, "versions", {})})
        engine.close()

