"""The vLLM checks fail on a bad export: a converter whose exported lm_head is scaled (what a
tied/untied mix-up on export does) makes vLLM, loading the export, disagree with the trainer in
engine parity and during RL. Runs where the vLLM worker env exists (scripts/setup_vllm.sh; CI
has it), skips saying so elsewhere."""

from __future__ import annotations

import pytest

from helpers import run_planted_bug
from moe_conformance import engines


@pytest.fixture(autouse=True)
def _needs_vllm():
    python, why = engines.vllm_python()
    if python is None:
        pytest.skip(f"vLLM is not available here: {why}")


@pytest.mark.parametrize("suite, check, fragment", [
    ("test_engine_parity.py", "test_engine_parity_vllm", "engine 'vllm' prompt logprobs differ from the trainer's"),
    ("test_rl.py", "test_rl_vllm", "vLLM and trainer disagree during RL"),
])
def test_vllm_checks_fail_on_a_bad_export(pytester, suite, check, fragment):
    run_planted_bug(pytester, "planted_more", "scaled_head_export", suite, "faithful", check, [fragment])
