"""Every check can fail: each planted bug (tests/planted.py) must make the RIGHT check fail, with
a message naming the fault, while the feature it breaks is proven live by the tiny_config suite.

Logit-parity bugs must also clear the gate by >= 10x (DESIGN.md), so a slightly different CPU
cannot hide them.
"""

from __future__ import annotations

import pytest

from helpers import checks_by_name, run_planted_bug, run_suites

# bug -> (suite, variant, failing check (prefix of the test name), fragments its message must hold)
EXPECTED = {
    "gate_up_swapped": ("test_roundtrip.py", "faithful", "test_expert_functions_match_file",
                        ["gate and up projections are swapped"]),
    "experts_permuted": ("test_roundtrip.py", "faithful", "test_candidate_expert_layout",
                         ["layers.1.moe.experts.w1[0] holds model.layers.1.mlp.experts.11.gate_proj.weight",
                          "expected model.layers.1.mlp.experts.0.gate_proj.weight"]),
    # key-set faults break the converter's contract: the roundtrip checks are blocked by it
    "key_dropped": ("test_contract.py", "faithful", "test_contract_converter",
                    ["to_hf(candidate state) does not give the checkpoint's key set",
                     "language_model.model.layers.1.mlp.gate.e_score_correction_bias"]),
    "extra_key": ("test_contract.py", "faithful", "test_contract_converter",
                  ["unexpected ['language_model.model.layers.1.mlp.gate.bias']"]),
    "bias_bf16": ("test_roundtrip.py", "faithful", "test_hf_to_candidate_to_hf_bit_exact",
                  ["language_model.model.layers.1.mlp.gate.e_score_correction_bias: values rounded to bfloat16"]),
    "bias_ignored": ("test_logit_parity.py", "faithful", "test_logit_parity",
                     ["model.layers.1.mlp.gate <-> candidate layers.1.moe.router: selected experts differ",
                      "the gap is in routing"]),
    "bias_in_weights": ("test_logit_parity.py", "faithful", "test_logit_parity",
                        ["layers.1.moe.router: same experts selected, routing weights differ"]),
    "norm_topk_flipped": ("test_logit_parity.py", "faithful", "test_logit_parity",
                          ["layers.1.moe.router: same experts selected, routing weights differ"]),
    "scaling_dropped": ("test_logit_parity.py", "faithful", "test_logit_parity",
                        ["routing weights differ", "weight sum reference 2.8270, candidate 1.0000"]),
    "group_limit_bypassed": ("test_logit_parity.py", "grouped", "test_logit_parity",
                             ["layers.1.moe.router: selected experts differ"]),
    "rope_interleave_flipped": ("test_logit_parity.py", "faithful", "test_logit_parity",
                                ["first divergence: reference model.layers.0.self_attn"]),
    "partial_rotary_ignored": ("test_logit_parity.py", "faithful", "test_logit_parity",
                               ["first divergence: reference model.layers.0.self_attn"]),
    "yarn_mscale_missing": ("test_logit_parity.py", "faithful", "test_logit_parity",
                            ["first divergence: reference model.layers.0.self_attn"]),
    "wrong_norm_eps": ("test_logit_parity.py", "faithful", "test_logit_parity",
                       ["first divergence: reference model.layers.0.input_layernorm <-> candidate layers.0.attention_norm"]),
    "position_ids_positional": ("test_logit_parity.py", "faithful", "test_logit_parity",
                                ["first divergence: reference model.layers.0.self_attn"]),
    # a forward that cannot run or returns NaN breaks the forward contract: everything else is blocked
    "returns_nan": ("test_contract.py", "faithful", "test_contract_forward", ["returned non-finite logits"]),
    "raises": ("test_contract.py", "faithful", "test_contract_forward", ["planted: grouped GEMM launch failed"]),
    "sinks_dropped": ("test_logit_parity.py", "faithful", "test_logit_parity",
                      ["first divergence: reference model.layers.0.self_attn"]),
    "sliding_window_ignored": ("test_logit_parity.py", "faithful", "test_logit_parity",
                               ["first divergence: reference model.layers.0.self_attn"]),
    "clamp_removed": ("test_logit_parity.py", "faithful", "test_logit_parity",
                      ["first divergence: reference model.layers.0.mlp.experts <-> candidate layers.0.moe.experts"]),
    "interleave_misread": ("test_roundtrip.py", "faithful", "test_expert_functions_match_file",
                           ["gate/up read as concatenated halves, but the file interleaves them"]),
    "shared_gate_sigmoid_dropped": ("test_logit_parity.py", "faithful", "test_logit_parity",
                                    ["first divergence: reference model.layers.0.mlp <-> candidate layers.0.moe",
                                     "not explained by routing alone"]),
    "qk_norm_skipped": ("test_logit_parity.py", "faithful", "test_logit_parity",
                        ["first divergence: reference model.layers.0.self_attn"]),
    "softmax_norm_topk_flipped": ("test_logit_parity.py", "faithful", "test_logit_parity",
                                  ["layers.0.moe.router: same experts selected, routing weights differ"]),
    "sizes_clash": ("test_tiny_config.py", "faithful", "test_sizes_pairwise_distinct",
                    ["equal sizes hide transposes", "hidden_size == intermediate_size == 64"]),
    "topk_all_experts": ("test_tiny_config.py", "faithful", "test_routing_topology",
                         ["top_k=12 must be > 1 and < num_experts=12"]),
    "flat_logits": ("test_tiny_config.py", "faithful", "test_logits_peaky", ["logits too flat"]),
    "router_constant": ("test_tiny_config.py", "faithful", "test_routing_margins",
                        ["routing near-ties", "model.layers.1.mlp.gate.topk_margin"]),
    "claimed_feature_inert": ("test_tiny_config.py", "faithful", "test_claimed_features_live",
                              ["claimed features are inert", "group_limit (moves logits by 0)"]),
    "yarn_mscale_all_dim_ignored": ("test_logit_parity.py", "yarn_mscale", "test_logit_parity",
                                    ["first divergence: reference model.layers.0.self_attn"]),
}

# The cause the diagnosis names (moe_conformance.diagnosis) for the planted parity bugs whose
# deviation the catalog holds; the others have no catalog entry (bias added to the weights,
# position_ids in the mask slot, NaN, an exception, the shared-gate sigmoid dropped).
CAUSES = {
    "bias_ignored": "behaves like the reference with the correction bias ignored in expert selection",
    "norm_topk_flipped": "behaves like the reference with norm_topk_prob flipped",
    "scaling_dropped": "behaves like the reference with routed_scaling_factor dropped (1.0)",
    "group_limit_bypassed": "behaves like the reference with group-limited routing bypassed",
    "rope_interleave_flipped": "behaves like the reference with RoPE interleave flipped",
    "partial_rotary_ignored": "behaves like the reference with RoPE over the whole head",
    "yarn_mscale_missing": "behaves like the reference with YaRN mscale_all_dim ignored in the softmax scale",
    "wrong_norm_eps": "behaves like the reference with rms_norm_eps=1e-06",
    "sinks_dropped": "behaves like the reference with attention sinks dropped",
    "sliding_window_ignored": "behaves like the reference with the sliding window ignored",
    "clamp_removed": "behaves like the reference with the SwiGLU clamp removed",
    "qk_norm_skipped": "behaves like the reference with qk-norm skipped",
    "softmax_norm_topk_flipped": "behaves like the reference with norm_topk_prob flipped",
}

# Bugs that only some input cases can expose, by design of those inputs.
ONLY_SOME_INPUTS = {"position_ids_positional": {"left_padded", "packed"}}
GATE_MARGIN = 10.0


@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_planted_bug_is_caught(pytester, bug):
    suite, variant, check, fragments = EXPECTED[bug]
    hits = run_planted_bug(pytester, "planted", bug, suite, variant, check, fragments + ([CAUSES[bug]] if bug in CAUSES else []))
    if bug in ONLY_SOME_INPUTS:
        failing_inputs = {n.split("-")[-1].rstrip("]") for n in hits}
        assert failing_inputs == ONLY_SOME_INPUTS[bug], failing_inputs
    if check == "test_logit_parity":
        for name, c in hits.items():
            delta, gate = c["figures"]["max_abs_logit_delta"], c["thresholds"]["max_abs_logit_delta"]
            assert delta >= GATE_MARGIN * gate, f"{bug}: {name} exceeds the gate by only {delta / gate:.1f}x"


def test_bias_in_bf16_also_changes_the_reloaded_reference(pytester):
    """The checkpoint exported by a candidate that rounds its routing bias reloads into the
    reference with different logits: the exported file itself is wrong, not only its bits."""
    run_planted_bug(pytester, "planted", "bias_bf16", "test_roundtrip.py", "faithful",
                    "test_converted_checkpoint_reloads_into_reference",
                    ["the reference reloaded from the converted checkpoint changes logits by up to"])


def test_bf16_profile_catches_a_bf16_routing_bias(pytester):
    """The bf16 production profile (--dtype bf16): a candidate that rounds its routing bias to
    bf16 flips routing decisions 10x past the profile's gate (measured bf16 floor x2), while the
    unbroken arch passes the same profile."""
    result, reports = run_suites(pytester, "--dtype", "bf16", "-k", "faithful", suite="test_logit_parity.py",
                                 plugin_source="import planted\nARCH = planted.build('bias_bf16')\n",
                                 plugin_name="planted_bias_bf16_in_bf16")
    checks = checks_by_name(reports["kimi_k25_bias_bf16"])
    failed = [c for c in checks.values() if c["status"] == "failed"]
    assert len(failed) == len(checks) == 5, {n: c["status"] for n, c in checks.items()}
    flips = [c["figures"]["routing_flip_rate"] for c in failed]
    gate = failed[0]["thresholds"]["routing_flip_rate"]
    assert all("routing_flip_rate" in c["message"] for c in failed)
    assert max(flips) >= GATE_MARGIN * gate, (flips, gate)
    assert all("the correction bias rounded to bf16" in c["message"] for c in failed)
    _, control = run_suites(pytester, "--arch", "kimi_k25", "--dtype", "bf16", "-k", "faithful",
                            suite="test_logit_parity.py")
    assert {c["status"] for c in control["kimi_k25"]["checks"]} == {"passed"}
