"""The vLLM checks fail on bugs only vLLM sees, and say where: a converter whose exported lm_head
is scaled (what a tied/untied mix-up on export does) makes vLLM, loading the export, disagree with
the trainer in engine parity (localized after the final norm, the checkpoint at fault since
transformers on the same files disagrees too) and during RL; a config field only vLLM reads (a
softmax scoring_func on a sigmoid router) is localized to the first MoE layer with vLLM off; an
export that stops carrying new expert weights after its first one fails vLLM's weight sync with
the experts named. Runs where the vLLM worker env exists (scripts/setup_vllm.sh; CI has it),
skips saying so elsewhere."""

from __future__ import annotations

import pytest

from helpers import checks_by_name, run_planted_bug, run_suites
from moe_conformance import engines


@pytest.fixture(autouse=True)
def _needs_vllm():
    python, why = engines.vllm_python()
    if python is None:
        pytest.skip(f"vLLM is not available here: {why}")


@pytest.mark.parametrize("suite, check, fragments", [
    ("test_engine_parity.py", "test_engine_parity_vllm",
     ["engine 'vllm' prompt logprobs differ from the trainer's", "the difference comes after the final norm",
      "the checkpoint is off, not (only) vLLM"]),
    ("test_engine_parity.py", "test_rl_vllm", ["vLLM and trainer disagree during RL"]),
])
def test_vllm_checks_fail_on_a_bad_export(pytester, suite, check, fragments):
    run_planted_bug(pytester, "planted_more", "scaled_head_export", suite, "faithful and vllm", check, fragments)


def test_vllm_disagreement_is_localized_to_the_component(pytester):
    run_planted_bug(pytester, "planted_rl", "vllm_reads_softmax_scoring", "test_engine_parity.py",
                    "vllm_sized and parity_vllm", "test_engine_parity_vllm",
                    ["engine 'vllm' prompt logprobs differ from the trainer's", "first disagree at layer 1 MLP/MoE",
                     "vLLM is off: transformers loading vLLM's checkpoint agrees with the trainer"])


def test_vllm_weight_sync_names_stale_experts(pytester):
    hits = run_planted_bug(pytester, "planted_rl", "experts_stale_after_first_export", "test_engine_parity.py",
                           "faithful and sync and vllm", "test_engine_sync_complete",
                           ["after a weight update it does not serve the new weights",
                            "the export does not carry the new weights", "not synced: experts ("])
    assert any(name.endswith("-vllm]") for name in hits), sorted(hits)


def test_vllm_checks_pass_unbroken(pytester):
    """The control: kimi_k25 (MLA, on its vLLM-sized variant) and qwen3_moe (faithful) pass every
    vLLM check."""
    for arch, variant in (("kimi_k25", "vllm_sized"), ("qwen3_moe", "faithful")):
        result, reports = run_suites(pytester, "--arch", arch, "-k", f"{variant} and vllm", suite="test_engine_parity.py")
        statuses = {name: c["status"] for name, c in checks_by_name(reports[arch]).items()}
        vllm = {n: st for n, st in statuses.items() if n.startswith(("test_engine_parity_vllm", "test_rl_vllm"))
                or n.endswith("-vllm]")}
        assert len(vllm) == 5 and set(vllm.values()) == {"passed"}, statuses
        assert set(statuses.values()) <= {"passed", "not_applicable"}, statuses
