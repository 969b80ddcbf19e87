"""Every RL / engine check can fail: each planted bug (tests/planted_rl.py, BUGS.md #31-32, #51-52)
makes the RIGHT check of the rl or engine_parity suite fail with a message naming the fault, and
the same suites pass on the unbroken archs (the control)."""

from __future__ import annotations

import pytest

from helpers import checks_by_name, run_planted_bug, run_suites

# bug -> (suite, failing check (test name prefix), fragments its message must hold)
EXPECTED = {
    "temperature_on_logprobs": ("test_rl.py", "test_rl_engine_mismatch",
                                ["disagree on logprobs at step 0",
                                 "temperature applied to the logprobs instead of the logits"]),
    "logprob_off_by_one": ("test_engine_parity.py", "test_engine_parity",
                           ["engine 'candidate' prompt logprobs differ from the trainer's", "first divergence",
                            "off-by-one logprob shift", "position t+1"]),
    "stale_engine_weights": ("test_rl.py", "test_rl_engine_follows_updates",
                             ["disagree on logprobs after weight updates",
                              "stale weights, the engine did not receive the weight update"]),
    "kl_wrong_sign": ("test_rl.py", "test_rl_kl_estimator",
                      ["the KL estimator named 'k3' does not compute its definition",
                       "it equals k3 with the sign of the log-ratio flipped"]),
    "kl_zero": ("test_rl.py", "test_rl_kl", ["KL is zero after the first update"]),
    "kl_reference_shifted": ("test_rl.py", "test_rl_kl", ["KL is not zero at step 0", "misaligned logprobs"]),
    "reward_ignores_answer": ("test_rl.py", "test_rl_reward",
                              ["the reward does not score the answer", "the reward ignores the answer"]),
    "routing_differs": ("test_rl.py", "test_rl_routing_consistency",
                        ["routing differs between rollout (candidate) and training", "flip rate per MoE layer",
                         "routed to different experts"]),
    # engine weight sync (BUGS.md #51)
    "last_layer_not_synced": ("test_engine_parity.py", "test_engine_sync_complete",
                              ["after a weight update it does not serve the new weights", "not synced: layer 1 ("]),
    "experts_not_synced": ("test_engine_parity.py", "test_engine_sync_complete",
                           ["after a weight update it does not serve the new weights", "not synced: experts ("]),
    "experts_accumulate_on_update": ("test_engine_parity.py", "test_engine_sync_identity",
                                     ["an identity update (the same weights again) changes its logprobs",
                                      "the update is not idempotent"]),
    "update_against_stale_base": ("test_engine_parity.py", "test_engine_sync_composes",
                                  ["two updates do not compose", "applies updates against a stale base"]),
    # routing replay (BUGS.md #52)
    "replay_on_orphan_routers": ("test_rl.py", "test_routing_replay_matches_engine",
                                 ["routing replay does not make the trainer route like the engine",
                                  "replay silently does nothing", "orphan routers"]),
    "replay_zeroed_gates": ("test_rl.py", "test_routing_replay_gradient",
                            ["the gates or the router's gradient are wrong", "router gradient relative delta",
                             "post-top-k tensor"]),
}
# the engine bugs sit in the RL engine: the other engines' parametrizations are not needed
ONLY = {"last_layer_not_synced": "candidate", "experts_not_synced": "candidate",
        "experts_accumulate_on_update": "candidate", "update_against_stale_base": "candidate",
        "replay_on_orphan_routers": "replay", "replay_zeroed_gates": "replay"}


@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_planted_rl_bug_is_caught(pytester, bug):
    suite, check, fragments = EXPECTED[bug]
    selection = f"faithful and {ONLY[bug]}" if bug in ONLY else "faithful"
    run_planted_bug(pytester, "planted_rl", bug, suite, selection, check, fragments)


@pytest.mark.parametrize("arch", ["kimi_k25", "qwen3_moe", "mixtral"])
def test_unbroken_arch_passes_rl_suites(pytester, arch):
    """The control: the archs the bugs are planted in pass both suites unbroken."""
    result, reports = run_suites(pytester, "--arch", arch, "-k", "faithful",
                                 suite="test_rl.py")
    statuses = {name: c["status"] for name, c in checks_by_name(reports[arch]).items()}
    result, reports = run_suites(pytester, "--arch", arch, "-k", "faithful", suite="test_engine_parity.py")
    statuses.update({name: c["status"] for name, c in checks_by_name(reports[arch]).items()})
    assert statuses and set(statuses.values()) <= {"passed", "skipped", "not_applicable"}, statuses


# the bf16 production profile (--dtype bf16: policy, engine and reference in bf16, gates from
# benchmarks/results/rl_noise_floor_bf16.md) catches the same faults with its own gates
BF16 = ["kl_zero", "replay_on_orphan_routers", "replay_zeroed_gates", "routing_differs", "stale_engine_weights",
        "temperature_on_logprobs"]


@pytest.mark.parametrize("bug", BF16)
def test_planted_rl_bug_is_caught_in_bf16(pytester, bug):
    suite, check, fragments = EXPECTED[bug]
    run_planted_bug(pytester, "planted_rl", bug, suite, "faithful", check, fragments, args=("--dtype", "bf16"))


@pytest.mark.parametrize("arch", ["kimi_k25", "qwen3_moe"])
def test_unbroken_arch_passes_rl_in_bf16(pytester, arch):
    """The control for the bf16 plants: the same archs pass the rl suite under --dtype bf16."""
    result, reports = run_suites(pytester, "--arch", arch, "--dtype", "bf16", "-k", "faithful", suite="test_rl.py")
    statuses = {name: c["status"] for name, c in checks_by_name(reports[arch]).items()}
    assert statuses and set(statuses.values()) <= {"passed", "skipped", "not_applicable"}, statuses
    assert sum(s == "passed" for s in statuses.values()) >= 6, statuses
