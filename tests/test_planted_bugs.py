"""Every check can fail: each planted bug (tests/planted.py) must make the RIGHT check fail, with
a message naming the fault, while the feature it breaks is proven live by the tiny_config suite.

Logit-parity bugs must also clear the gate by >= 10x (DESIGN.md), so a slightly different CPU
cannot hide them.
"""

from __future__ import annotations

import pytest

from helpers import run_planted_bug

# bug -> (suite, variant, failing check (prefix of the test name), fragments its message must hold)
EXPECTED = {
    "gate_up_swapped": ("test_roundtrip.py", "faithful", "test_expert_functions_match_file",
                        ["gate and up projections are swapped"]),
    "experts_permuted": ("test_roundtrip.py", "faithful", "test_candidate_expert_layout",
                         ["layers.1.moe.experts.w1[0] holds model.layers.1.mlp.experts.11.gate_proj.weight",
                          "expected model.layers.1.mlp.experts.0.gate_proj.weight"]),
    "key_dropped": ("test_roundtrip.py", "faithful", "test_hf_to_candidate_to_hf_bit_exact",
                    ["missing 2 key(s)", "language_model.model.layers.1.mlp.gate.e_score_correction_bias"]),
    "extra_key": ("test_roundtrip.py", "faithful", "test_hf_to_candidate_to_hf_bit_exact",
                  ["unexpected 1 key(s): language_model.model.layers.1.mlp.gate.bias"]),
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
    "returns_nan": ("test_logit_parity.py", "faithful", "test_logit_parity",
                    ["candidate logits are not finite"]),
    "raises": ("test_logit_parity.py", "faithful", "test_logit_parity",
               ["planted: grouped GEMM launch failed"]),
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

# Bugs that only some input cases can expose, by design of those inputs.
ONLY_SOME_INPUTS = {"position_ids_positional": {"left_padded", "packed"}}
GATE_MARGIN = 10.0


@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_planted_bug_is_caught(pytester, bug):
    suite, variant, check, fragments = EXPECTED[bug]
    hits = run_planted_bug(pytester, "planted", bug, suite, variant, check, fragments)
    if bug in ONLY_SOME_INPUTS:
        failing_inputs = {n.split("-")[-1].rstrip("]") for n in hits}
        assert failing_inputs == ONLY_SOME_INPUTS[bug], failing_inputs
    if check == "test_logit_parity" and bug not in ("returns_nan", "raises"):
        for name, c in hits.items():
            delta, gate = c["figures"]["max_abs_logit_delta"], c["thresholds"]["max_abs_logit_delta"]
            assert delta >= GATE_MARGIN * gate, f"{bug}: {name} exceeds the gate by only {delta / gate:.1f}x"
