"""Every check can fail: the index below names, for every check function in suites/, the
planted bug in the project's own tests that makes it fail with its message (README's table of
checks is generated from it and kept in sync by a test here). The bugs of tests/planted_more.py
are run here; the others live beside their own tests.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from helpers import checks_by_name, missing_proof, run_planted_bug, run_suites

REPO = Path(__file__).resolve().parent.parent

# bug (tests/planted_more.py) -> (suite, variant, failing check, fragments its message must hold)
MORE = {
    "expert_detached": ("test_router_grad.py", "faithful", "test_expert_gradients_follow_routing",
                        ["expert 0 received", "but its gradient is all zeros"]),
    "router_grad_halved": ("test_router_grad.py", "faithful", "test_gradient_parity",
                           ["grad_rel_delta.router", "worst tensor language_model.model.layers.1.mlp.gate.weight"]),
    "router_jitter_training": ("test_sft.py", "faithful", "test_sft_matches_reference",
                               ["candidate and reference loss curves disagree", "first step beyond its gate: 0"]),
    "nan_gradients": ("test_sft.py", "faithful", "test_sft_finite", ["not finite"]),
    "stale_export": ("test_roundtrip.py", "faithful", "test_candidate_to_hf_to_candidate_bit_exact",
                     ["candidate -> HF -> candidate is not the original candidate state", "tok_embeddings.weight"]),
    "scaled_head_export": ("test_engine_parity.py", "faithful", "test_engine_parity",
                           ["engine 'transformers' prompt logprobs differ from the trainer's"]),
    "bias_update_reversed": ("test_router_grad.py", "faithful", "test_aux_loss_free_balancing",
                             ["the bias update does not move load toward balance"]),
    "optimizer_never_steps": ("test_sft.py", "faithful", "test_sft_loss_falls", ["loss"]),
    "reference_fp32_norm_cast_ignores_it": ("test_roundtrip.py", "faithful", "test_bf16_checkpoint_keeps_dtypes",
                                            ["kv_a_layernorm.weight: dtype torch.bfloat16, file has torch.float32"]),
    "router_ignores_input": ("test_tiny_config.py", "faithful", "test_every_expert_routed",
                             ["experts never routed on the test inputs"]),
    "save_naming_unexcused": ("test_roundtrip.py", "faithful", "test_transformers_save_naming",
                              ["save_pretrained writes", "key(s) the release does not have"]),
}
# bugs that fail more than their own check: (bug, suite, check, fragments)
ALSO = [
    ("stale_export", "test_sft.py", "test_sft_checkpoint_reloads", ["the trained checkpoint does not reload faithfully"]),
    ("nan_gradients", "test_rl.py", "test_rl_loss_and_grads", ["grad norm is not finite"]),
    ("bias_update_reversed", "test_sft.py", "test_sft_router_health", ["router health", "load_imbalance ends at"]),
]


@pytest.mark.parametrize("bug", sorted(MORE))
def test_planted_bug_fails_its_check(pytester, bug):
    suite, variant, check, fragments = MORE[bug]
    run_planted_bug(pytester, "planted_more", bug, suite, variant, check, fragments)


@pytest.mark.parametrize("bug, suite, check, fragments", ALSO, ids=[f"{b}-{c}" for b, _, c, _ in ALSO])
def test_planted_bug_fails_another_check(pytester, bug, suite, check, fragments):
    run_planted_bug(pytester, "planted_more", bug, suite, "faithful", check, fragments)


def test_the_bf16_dtype_check_follows_the_reference(pytester):
    """The control of reference_fp32_norm_cast_ignores_it: a reference that keeps one more
    module in fp32, and the default cast keeps it too (the precision rule is read from the
    reference, not a hard-coded list)."""
    result, reports = run_suites(pytester, "-k", "faithful and bf16", suite="test_roundtrip.py",
                                 plugin_source="import planted_more\nARCH = planted_more.build('reference_fp32_norm')\n",
                                 plugin_name="planted_more_control")
    (check,) = [c for n, c in checks_by_name(reports["kimi_k25_reference_fp32_norm"]).items()]
    assert check["status"] == "passed", check
    assert "kv_a_layernorm.weight" in check["figures"]["fp32_modules_in_bf16_checkpoint"], check["figures"]


# check function -> the test that makes it fail (file::test[bug] or file::test)
INDEX = {
    # contract
    "test_contract_forward": "tests/test_planted_bugs.py::test_planted_bug_is_caught[raises]",
    "test_contract_converter": "tests/test_gate_honesty.py::test_a_mutating_converter_is_named_and_corrupts_nothing",
    "test_contract_deterministic": "tests/test_contract_violations.py::test_contract_violation_is_one_root_cause[dropout_left_on]",
    "test_contract_state": "tests/test_contract_violations.py::test_contract_violation_is_one_root_cause[stashed_tensor]",
    "test_contract_module_pairs": "tests/test_contract_violations.py::test_contract_violation_is_one_root_cause[pairs_misnamed]",
    "test_contract_routing_probe": "tests/test_contract_violations.py::test_contract_violation_is_one_root_cause[router_returns_two]",
    "test_contract_experts_probe": "tests/test_contract_violations.py::test_contract_violation_is_one_root_cause[experts_args_swapped]",
    "test_contract_capabilities": "tests/test_gate_honesty.py::test_understated_capabilities_fail_the_contract_naming_the_field",
    # tiny_config
    "test_sizes_pairwise_distinct": "tests/test_planted_bugs.py::test_planted_bug_is_caught[sizes_clash]",
    "test_routing_topology": "tests/test_planted_bugs.py::test_planted_bug_is_caught[topk_all_experts]",
    "test_logits_peaky": "tests/test_planted_bugs.py::test_planted_bug_is_caught[flat_logits]",
    "test_every_expert_routed": "tests/test_every_check_can_fail.py::test_planted_bug_fails_its_check[router_ignores_input]",
    "test_routing_margins": "tests/test_planted_bugs.py::test_planted_bug_is_caught[router_constant]",
    "test_claimed_features_live": "tests/test_planted_bugs.py::test_planted_bug_is_caught[claimed_feature_inert]",
    # logit parity
    "test_logit_parity": "tests/test_planted_bugs.py::test_planted_bug_is_caught[bias_ignored]",
    # roundtrip
    "test_hf_to_candidate_to_hf_bit_exact": "tests/test_planted_bugs.py::test_planted_bug_is_caught[bias_bf16]",
    "test_candidate_to_hf_to_candidate_bit_exact": "tests/test_every_check_can_fail.py::test_planted_bug_fails_its_check[stale_export]",
    "test_candidate_expert_layout": "tests/test_planted_bugs.py::test_planted_bug_is_caught[experts_permuted]",
    "test_expert_functions_match_file": "tests/test_planted_bugs.py::test_planted_bug_is_caught[gate_up_swapped]",
    "test_converted_checkpoint_reloads_into_reference": "tests/test_planted_bugs.py::test_bias_in_bf16_also_changes_the_reloaded_reference",
    "test_bf16_checkpoint_keeps_dtypes": "tests/test_every_check_can_fail.py::test_planted_bug_fails_its_check[reference_fp32_norm_cast_ignores_it]",
    "test_transformers_save_naming": "tests/test_every_check_can_fail.py::test_planted_bug_fails_its_check[save_naming_unexcused]",
    # schema
    "test_checkpoint_schema": "tests/test_schema_bugs.py::test_checkpoint_format_change_shows_as_a_schema_diff",
    "test_candidate_schema": "tests/test_schema_bugs.py::test_renamed_candidate_parameter_shows_as_a_schema_diff",
    # kernels
    "test_kernel_check_set": "tests/test_kernel_suite_bugs.py::test_broken_triton_experts_kernel_fails_every_kernel_check",
    "test_candidate_on_kernels_matches_reference": "tests/test_kernel_suite_bugs.py::test_broken_triton_experts_kernel_fails_every_kernel_check",
    "test_reference_with_kernel_experts": "tests/test_kernel_suite_bugs.py::test_broken_triton_experts_kernel_fails_every_kernel_check",
    # router_grad
    "test_router_weights_get_gradient": "tests/test_training_bugs.py::test_planted_training_bug_is_caught[router_detached]",
    "test_expert_gradients_follow_routing": "tests/test_every_check_can_fail.py::test_planted_bug_fails_its_check[expert_detached]",
    "test_shared_experts_get_gradient": "tests/test_training_bugs.py::test_planted_training_bug_is_caught[shared_expert_frozen]",
    "test_correction_bias_gets_no_gradient": "tests/test_training_bugs.py::test_planted_training_bug_is_caught[bias_receives_gradient]",
    "test_gradient_parity": "tests/test_every_check_can_fail.py::test_planted_bug_fails_its_check[router_grad_halved]",
    "test_aux_loss": "tests/test_training_bugs.py::test_planted_training_bug_is_caught[aux_counts_padding]",
    "test_z_loss": "tests/test_training_bugs.py::test_planted_training_bug_is_caught[z_loss_wrong]",
    "test_aux_loss_free_balancing": "tests/test_every_check_can_fail.py::test_planted_bug_fails_its_check[bias_update_reversed]",
    "test_aux_loss_gradient_flows": "tests/test_wave3_bugs.py::test_wave3_bug_is_caught[aux_detached]",
    "test_bias_update_definition": "tests/test_wave3_bugs.py::test_wave3_bug_is_caught[bias_update_bf16]",
    # lora_merge
    "test_lora_merge_matches_unmerged": "tests/test_wave3_bugs.py::test_lora_merge_bug_fails_every_merge_check[lora_fused_dropped]",
    "test_lora_merge_changes_exactly_the_targets": "tests/test_wave3_bugs.py::test_wave3_bug_is_caught[lora_fused_dropped]",
    "test_lora_merged_checkpoint_roundtrips": "tests/test_wave3_bugs.py::test_lora_merge_bug_fails_every_merge_check[lora_fused_dropped]",
    "test_lora_adapters_train": "tests/test_wave3_bugs.py::test_wave3_bug_is_caught[lora_frozen]",
    # upcycling
    "test_upcycled_moe_equals_dense": "tests/test_wave3_bugs.py::test_wave3_bug_is_caught[upcycle_scaling_left_on]",
    "test_upcycled_experts_copy_the_dense_mlp": "tests/test_wave3_bugs.py::test_wave3_bug_is_caught[upcycle_expert_transposed]",
    # sft
    "test_sft_finite": "tests/test_every_check_can_fail.py::test_planted_bug_fails_its_check[nan_gradients]",
    "test_sft_loss_falls": "tests/test_every_check_can_fail.py::test_planted_bug_fails_its_check[optimizer_never_steps]",
    "test_sft_matches_reference": "tests/test_every_check_can_fail.py::test_planted_bug_fails_its_check[router_jitter_training]",
    "test_sft_lr_schedule": "tests/test_training_bugs.py::test_planted_training_bug_is_caught[lr_schedule_off]",
    "test_sft_all_parameters_train": "tests/test_training_bugs.py::test_planted_training_bug_is_caught[optimizer_missing_experts]",
    "test_sft_router_health": "tests/test_every_check_can_fail.py::test_planted_bug_fails_another_check[bias_update_reversed-test_sft_router_health]",
    "test_sft_checkpoint_reloads": "tests/test_every_check_can_fail.py::test_planted_bug_fails_another_check[stale_export-test_sft_checkpoint_reloads]",
    "test_sft_selection_bias_updates": "tests/test_training_bugs.py::test_planted_bf16_training_bug_is_caught[bias_cast_to_bf16]",
    "test_sft_optimizer_keeps_small_updates": "tests/test_training_bugs.py::test_planted_bf16_training_bug_is_caught[optimizer_without_master_weights]",
    # rl and engines
    "test_rl_kl": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[kl_zero]",
    "test_rl_loss_and_grads": "tests/test_every_check_can_fail.py::test_planted_bug_fails_another_check[nan_gradients-test_rl_loss_and_grads]",
    "test_rl_engine_mismatch": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[temperature_on_logprobs]",
    "test_rl_engine_follows_updates": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[stale_engine_weights]",
    "test_rl_kl_estimator": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[kl_wrong_sign]",
    "test_rl_reward": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[reward_ignores_answer]",
    "test_rl_routing_consistency": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[routing_differs]",
    "test_rl_vllm": "tests/test_vllm_bugs.py::test_vllm_checks_fail_on_a_bad_export",
    "test_engine_parity": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[logprob_off_by_one]",
    "test_engine_parity_vllm": "tests/test_vllm_bugs.py::test_vllm_checks_fail_on_a_bad_export",
    "test_engine_sync_identity": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[experts_accumulate_on_update]",
    "test_engine_sync_complete": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[experts_not_synced]",
    "test_engine_sync_composes": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[update_against_stale_base]",
    "test_routing_replay_matches_engine": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[replay_on_orphan_routers]",
    "test_routing_replay_gradient": "tests/test_rl_bugs.py::test_planted_rl_bug_is_caught[replay_zeroed_gates]",
    # expert parallel
    "test_ep_shard_state": "tests/test_expert_parallel_bugs.py::test_planted_ep_bug_fails_its_check[wrong_expert_offset]",
    "test_ep_experts_dispatch": "tests/test_expert_parallel_bugs.py::test_planted_ep_bug_fails_its_check[tokens_dropped_at_capacity]",
    "test_ep_forward": "tests/test_expert_parallel_bugs.py::test_planted_ep_bug_fails_its_check[routed_scaling_skipped]",
    "test_ep_gradients": "tests/test_expert_parallel_bugs.py::test_planted_ep_bug_fails_its_check[replicated_grads_not_reduced]",
    "test_ep_aux_loss": "tests/test_expert_parallel_bugs.py::test_planted_ep_bug_fails_its_check[aux_statistics_local]",
    "test_ep_bias_update": "tests/test_expert_parallel_bugs.py::test_planted_ep_bug_fails_its_check[load_not_reduced]",
    # dry run
    "test_dry_run_parameters": "tests/test_dry_run_bugs.py::test_candidate_with_capped_dense_layers_fails_parameters",
    "test_dry_run_to_candidate": "tests/test_dry_run_bugs.py::test_uint8_expert_index_in_to_candidate_fails_full_size",
    "test_dry_run_roundtrip": "tests/test_dry_run_bugs.py::test_narrow_expert_index_passes_tiny_fails_full_size",
}


def _suite_families() -> dict[str, str]:
    """Each suite check and its family (the suite module's name, as the plugin reports it)."""
    families = {}
    for path in sorted((REPO / "suites").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        families |= {n.name: path.stem.removeprefix("test_") for n in tree.body
                     if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
    return families


def _suite_checks() -> set[str]:
    return set(_suite_families())


def test_every_suite_check_has_a_planted_bug():
    missing = sorted(_suite_checks() - set(INDEX))
    assert not missing, f"checks with no planted bug that makes them fail: {missing}"
    stale = sorted(set(INDEX) - _suite_checks())
    assert not stale, f"index entries for checks that no longer exist: {stale}"


def test_every_indexed_proof_exists():
    """Each named test exists (its file defines the function; a [param] is one of its cases)."""
    problems = [f"{check}: {why}" for check, proof in INDEX.items() if (why := missing_proof(proof))]
    assert not problems, problems


def test_readme_lists_every_check_with_its_planted_test():
    readme = (REPO / "README.md").read_text()
    rows = {c: (f, p) for c, f, p in re.findall(r"^\| `(test_\w+)` \| (\w+) \| `(tests/[^`]+)` \|$", readme, re.M)}
    families = _suite_families()
    missing = {c: p for c, p in INDEX.items() if rows.get(c) != (families.get(c), p)}
    assert not missing, f"README's check table is out of date (family or planted test) for: {sorted(missing)}"
