"""The bugs teams ship: each planted bug of tests/planted_wave3.py makes the RIGHT check fail
with a message naming the fault (docs/bug_classes.md maps every BUGS.md class to one of these or
to the planted test of another file). Logit-parity bugs must clear the gate by >= 10x."""

from __future__ import annotations

import pytest

from helpers import checks_by_name, run_planted_bug, run_suites

# bug -> (suite, variant, failing check (prefix of the test name), fragments its message must hold)
EXPECTED = {
    # routing
    "scoring_softmax_for_sigmoid": ("test_logit_parity.py", "faithful", "test_logit_parity",
                                    ["layers.1.moe.router", "the gap is in routing"]),
    "softmax_before_topk": ("test_logit_parity.py", "faithful", "test_logit_parity",
                            ["layers.0.moe.router: same experts selected, routing weights differ"]),
    "group_mask_zero": ("test_logit_parity.py", "grouped", "test_logit_parity",
                        ["layers.1.moe.router: selected experts differ", "the gap is in routing"]),
    "router_math_bf16": ("test_logit_parity.py", "faithful", "test_logit_parity",
                         ["layers.1.moe.router: selected experts differ"]),
    "scaling_applied_twice": ("test_logit_parity.py", "faithful", "test_logit_parity",
                              ["routing weights differ", "weight sum reference 2.8270, candidate 7.99"]),
    "top1_renormalized": ("test_router_grad.py", "top1 and not faithful", "test_router_weights_get_gradient",
                          ["layers.1.moe.router.gate.weight: gradient vanishes",
                           "top-1 routing with renormalization: the single weight is always 1"]),
    # layout
    "layout_from_shapes": ("test_roundtrip.py", "square", "test_expert_functions_match_file",
                           ["matches no expert of the file"]),
    "square_gate_up_undeclared": ("test_tiny_config.py", "square", "test_sizes_pairwise_distinct",
                                  ["equal sizes hide transposes", "a trap variant declares the coincidence"]),
    "trap_declared_not_holding": ("test_tiny_config.py", "square_experts", "test_sizes_pairwise_distinct",
                                  ["declares trap(s) ['square_experts'], but its sizes do not coincide that way"]),
    # keys and buffers
    "shared_exported_as_zeros": ("test_roundtrip.py", "faithful", "test_hf_to_candidate_to_hf_bit_exact",
                                 ["model.layers.1.mlp.shared_experts.down_proj.weight: exported as zeros"]),
    "bias_zeroed_after_load": ("test_roundtrip.py", "faithful", "test_hf_to_candidate_to_hf_bit_exact",
                               ["language_model.model.layers.1.mlp.gate.e_score_correction_bias: exported as zeros"]),
    "bias_missing_on_import": ("test_contract.py", "faithful", "test_contract_converter",
                               ["to_candidate(checkpoint) does not match the candidate's state_dict()",
                                "layers.1.moe.router.expert_bias"]),
    "dense_layers_ignored": ("test_contract.py", "faithful", "test_contract_converter",
                             ["to_candidate(checkpoint) does not match the candidate's state_dict()",
                              "layers.0.moe.experts.w1", "has 3 key(s) the candidate does not (layers.0.feed_forward.w1.weight"]),
    "experts_collapsed_on_export": ("test_contract.py", "faithful", "test_contract_converter",
                                    ["to_hf(candidate state) does not give the checkpoint's key set",
                                     "model.layers.1.mlp.experts.1.down_proj.weight"]),
    # MTP layers
    # (a converter that drops declared extras is lossy, not a broken convention: the roundtrip
    # names the keys, and the parity checks still run)
    "mtp_skipped": ("test_roundtrip.py", "faithful", "test_hf_to_candidate_to_hf_bit_exact",
                    ["HF file -> candidate -> HF is not the original file", "model.layers.3."]),
    "mtp_one_layer": ("test_roundtrip.py", "yarn_mscale", "test_hf_to_candidate_to_hf_bit_exact",
                      ["HF file -> candidate -> HF is not the original file", "model.layers.4."]),
    "mtp_experts_grouped": ("test_contract.py", "faithful", "test_contract_converter",
                            ["model.layers.3.mlp.experts.0.down_proj.weight", "model.layers.3.mlp.experts.down_proj"]),
    # tied embeddings
    "head_tied_when_untied": ("test_contract.py", "faithful", "test_contract_converter",
                              ["to_candidate(checkpoint) does not match the candidate's state_dict()",
                               "has 1 key(s) the candidate does not (output.weight)"]),
    "tied_head_exported_twice": ("test_contract.py", "faithful", "test_contract_converter",
                                 ["unexpected ['lm_head.weight']"]),
    "tie_flag_ignored": ("test_contract.py", "faithful", "test_contract_converter",
                         ["lacks 1 key(s) the candidate has (output.weight)"]),
    # attention
    "window_off_by_one": ("test_logit_parity.py", "sliding", "test_logit_parity",
                          ["first divergence: reference model.layers.0.self_attn"]),
    "packed_documents_leak": ("test_logit_parity.py", "faithful", "test_logit_parity",
                              ["on 'packed' inputs", "first divergence: reference model.layers.0.self_attn"]),
    # training code
    "bias_update_bf16": ("test_router_grad.py", "faithful", "test_bias_update_definition",
                         ["moved the wrong way", "loads counted or compared in bf16"]),
    "aux_counted_twice": ("test_router_grad.py", "faithful", "test_aux_loss",
                          ["it equals twice the formula", "the aux loss is counted twice"]),
    "aux_detached": ("test_router_grad.py", "faithful", "test_aux_loss_gradient_flows",
                     ["has no gradient (requires_grad=False): it is detached from the router logits"]),
    # decoding
    "kv_cache_bf16": ("test_rl.py", "faithful", "test_rl_engine_mismatch", ["disagree on logprobs at step 0"]),
    # expert LoRA merges
    "lora_fused_dropped": ("test_lora_merge.py", "faithful", "test_lora_merge_changes_exactly_the_targets",
                           ["model.layers.1.mlp.experts.1.gate_proj.weight: the delta of layers.1.moe.experts.w1[1] "
                            "(routed expert 1) was silently dropped on merge"]),
    "lora_frozen": ("test_lora_merge.py", "faithful", "test_lora_adapters_train",
                    ["the adapter of layers.1.moe.experts.w1[1] (routed expert 1) is frozen (A: requires_grad=False)",
                     "'enabled' but never trains"]),
    # upcycling
    "upcycle_expert_transposed": ("test_upcycling.py", "faithful", "test_upcycled_experts_copy_the_dense_mlp",
                                  ["model.layers.0.mlp.experts.2.down_proj.weight holds model.layers.0.mlp.down_proj.weight "
                                   "transposed"]),
    "upcycle_scaling_left_on": ("test_upcycling.py", "faithful", "test_upcycled_moe_equals_dense",
                                ["the chosen experts' routing weights sum to 2.5", "routed_scaling_factor 2.5 left on"]),
}

# the logit-parity bugs whose deviation the diagnosis catalog names (moe_conformance.diagnosis)
CAUSES = {
    "scaling_applied_twice": "behaves like the reference with routed_scaling_factor",
}
GATE_MARGIN = 10.0
# bugs only some input cases show, by design of those inputs
ONLY_SOME_INPUTS = {"packed_documents_leak": {"packed"}}


@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_wave3_bug_is_caught(pytester, bug):
    suite, variant, check, fragments = EXPECTED[bug]
    hits = run_planted_bug(pytester, "planted_wave3", bug, suite, variant, check, fragments)
    if bug in ONLY_SOME_INPUTS:
        assert {n.split("-")[-1].rstrip("]") for n in hits} == ONLY_SOME_INPUTS[bug], sorted(hits)
    if check == "test_logit_parity":
        for name, c in hits.items():
            delta, gate = c["figures"]["max_abs_logit_delta"], c["thresholds"]["max_abs_logit_delta"]
            assert delta >= GATE_MARGIN * gate, f"{bug}: {name} exceeds the gate by only {delta / gate:.1f}x"


@pytest.mark.parametrize("bug, check, variant", [
    ("layout_from_shapes", "test_expert_functions_match_file", "faithful"),
    ("mtp_one_layer", "test_hf_to_candidate_to_hf_bit_exact", "faithful"),
])
def test_only_the_variant_that_switches_it_on_catches_it(pytester, bug, check, variant):
    """The control: the same bug passes on the variant whose sizes (distinct) or layer count
    (one MTP layer) hide it, which is why the trap and two-MTP-layer variants exist."""
    suite = {"test_expert_functions_match_file": "test_roundtrip.py", "test_hf_to_candidate_to_hf_bit_exact": "test_roundtrip.py"}[check]
    result, reports = run_suites(pytester, "-k", f"{variant} and {check}", suite=suite, plugin_name=f"control_{bug}",
                                 plugin_source=f"import planted_wave3\nARCH = planted_wave3.build({bug!r})\n")
    (report,) = reports.values()
    statuses = {n: c["status"] for n, c in checks_by_name(report).items() if n.startswith(check + "[")}
    assert statuses and set(statuses.values()) == {"passed"}, statuses


@pytest.mark.parametrize("bug", ["lora_fused_dropped"])
def test_lora_merge_bug_fails_every_merge_check(pytester, bug):
    """A delta dropped for the stacked experts fails the logit checks of the merge too: the
    merged candidate and the reference loaded from the merged file both differ from the
    unmerged forward, and the message names the dropped tensors."""
    result, reports = run_suites(pytester, suite="test_lora_merge.py", plugin_name=f"merge_{bug}",
                                 plugin_source=f"import planted_wave3\nARCH = planted_wave3.build({bug!r})\n")
    (report,) = reports.values()
    checks = {n.split("[")[0]: c for n, c in checks_by_name(report).items()}
    for name in ("test_lora_merge_matches_unmerged", "test_lora_merged_checkpoint_roundtrips"):
        assert checks[name]["status"] == "failed", (name, checks[name])
        message = checks[name]["message"]
        assert "does not compute the unmerged candidate's logits" in message, message
        assert "was silently dropped on merge" in message, message
    assert checks["test_lora_adapters_train"]["status"] == "passed", checks["test_lora_adapters_train"]
