"""Foreign candidates, reached only through the written contract (tests/foreign/): a
hand-written plain-PyTorch MoE with its own names, fused experts and a logits-only router; the
same model with a Megatron-Core-style router; and transformers' own Qwen3-MoE in its in-memory
layout (a team wrapping transformers). Each runs every family with no crash and no failure.
A transformers-based candidate that keeps its cache on lets packed documents attend to each
other: the suite fails it and names that cause."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import checks_by_name, run_suites

FOREIGN = Path(__file__).parent / "foreign"


def _run(pytester, plugin: str, *args):
    for f in FOREIGN.glob("*.py"):
        shutil.copy(f, pytester.path / f.name)
    if (FOREIGN / "__snapshots__").exists():
        shutil.copytree(FOREIGN / "__snapshots__", pytester.path / "__snapshots__", dirs_exist_ok=True)
    return run_suites(pytester, "--arch-plugin", str(pytester.path / plugin), "-k", "faithful", *args)


@pytest.mark.parametrize("plugin, archs", [
    ("plain_plugin.py", ["plain_mixtral", "megatron_mixtral"]),
    ("hf_candidate_plugin.py", ["hf_qwen3_moe"]),
])
def test_foreign_candidate_runs_every_family(pytester, plugin, archs):
    result, reports = _run(pytester, plugin)
    for arch in archs:
        statuses = {n: c["status"] for n, c in checks_by_name(reports[arch]).items()}
        bad = {n: checks_by_name(reports[arch])[n]["message"][:300] for n, s in statuses.items()
               if s in ("failed", "error", "interrupted", "blocked")}
        assert not bad, bad
        families = {c["family"] for c in reports[arch]["checks"]}
        assert {"contract", "logit_parity", "roundtrip", "router_grad", "sft", "rl", "engine_parity"} <= families


def test_a_transformers_candidate_with_its_cache_on_mixes_packed_documents(pytester):
    (pytester.path / "cached_plugin.py").write_text(
        "import hf_candidate_plugin as p\n"
        "from transformers import Qwen3MoeForCausalLM\n"
        "def candidate(config):\n"
        "    config._attn_implementation = 'eager'\n"
        "    config._experts_implementation = 'eager'\n"
        "    return Qwen3MoeForCausalLM(config)  # the bug: use_cache left on\n"
        "ARCH = p.ARCH.replace(name='hf_qwen3_moe_cached', candidate=candidate)\n")
    _, reports = _run(pytester, "cached_plugin.py", "--family", "logit_parity")
    checks = checks_by_name(reports["hf_qwen3_moe_cached"])
    failed = {n: c for n, c in checks.items() if c["status"] == "failed"}
    assert set(failed) == {"test_logit_parity[hf_qwen3_moe_cached-faithful-packed]"}, set(failed)
    assert "packed documents attending across their boundaries" in next(iter(failed.values()))["message"]


def test_a_candidate_that_cannot_run_in_bf16_is_one_root_cause(pytester):
    """Tried as a user: the hand-written model computes its rotary angles in fp32 and so fails in
    bf16 (fp32 queries into bf16 weights). Under --dtype bf16 the contract's forward item runs the
    cast candidate and names that, with the line in the model; the profile's checks are blocked
    by it instead of each failing with the same RuntimeError."""
    _, reports = _run(pytester, "plain_plugin.py", "--dtype", "bf16", "--family", "contract,logit_parity,router_grad")
    checks = checks_by_name(reports["plain_mixtral"])
    forward = checks["test_contract_forward[plain_mixtral-faithful]"]
    assert forward["status"] == "failed", forward
    for part in ("the candidate cast to bfloat16 (ArchSpec.cast", "RuntimeError", "plain_moe.py:"):
        assert part in forward["message"], forward["message"]
    others = {c["status"] for n, c in checks.items() if c["family"] != "contract"}
    assert others <= {"blocked", "not_applicable"} and "blocked" in others, others


def test_a_foreign_candidate_trains_under_the_bf16_profile(pytester):
    """transformers' Qwen3-MoE as a candidate (foreign code, reached through the contract) under
    --dtype bf16: SFT and the RL loop run it cast to bf16, stepping fp32 master weights, and
    every sft and rl check with bf16 gates runs to a pass; gradient parity pins the reference's
    routing onto it through its probes, and its aux and z-loss are checked on its bf16 logits."""
    _, reports = _run(pytester, "hf_candidate_plugin.py", "--dtype", "bf16", "--family", "sft,rl,router_grad")
    checks = checks_by_name(reports["hf_qwen3_moe"])
    statuses = {n.split("[")[0]: c["status"] for n, c in checks.items()}
    bad = {n: c["message"][:300] for n, c in checks.items() if c["status"] not in ("passed", "not_applicable")}
    assert not bad, bad
    for check in ("test_sft_matches_reference", "test_sft_optimizer_keeps_small_updates", "test_sft_all_parameters_train",
                  "test_rl_kl", "test_rl_engine_mismatch", "test_rl_engine_follows_updates", "test_rl_routing_consistency",
                  "test_gradient_parity", "test_aux_loss", "test_z_loss", "test_router_weights_get_gradient",
                  "test_routing_replay_matches_engine", "test_routing_replay_gradient"):
        assert statuses.get(check) == "passed", (check, statuses)
    parity = checks["test_gradient_parity[hf_qwen3_moe-faithful]"]
    assert "tokens_pinned" in parity["figures"] and parity["thresholds"]["grad_rel_delta.router"] == 0.1, parity
    # what stays fp32 says why, with the measurement
    health = checks["test_sft_router_health[hf_qwen3_moe-faithful]"]
    assert health["status"] == "not_applicable" and "routers mostly collapse" in health["message"], health
