"""Every training check can fail: each planted training bug (tests/planted_training.py) makes the
RIGHT check of the router_grad or sft suite fail, with a message naming the fault, and the same
suite passes on the unbroken arch (so the failure is the bug's, not the setup's)."""

from __future__ import annotations

import pytest

import planted_training
from helpers import checks_by_name, run_planted_bug, run_suites

# bug -> (suite, variant, failing check (test name prefix), fragments its message must hold)
EXPECTED = {
    "router_detached": ("test_router_grad.py", "faithful", "test_router_weights_get_gradient",
                        ["router weights get no usable gradient", "layers.1.moe.router.gate.weight: no gradient",
                         "detached from the loss"]),
    "bias_receives_gradient": ("test_router_grad.py", "faithful", "test_correction_bias_gets_no_gradient",
                               ["the correction bias receives gradient", "layers.1.moe.router.expert_bias: receives gradient",
                                "requires_grad=True"]),
    "aux_softmax_of_softmax": ("test_router_grad.py", "faithful", "test_aux_loss",
                               ["aux_reference_rel_delta", "equal softmax(reference router logits)", "softmax of softmax"]),
    "aux_counts_padding": ("test_router_grad.py", "faithful", "test_aux_loss",
                           ["aux_rel_delta", "it counts padding tokens"]),
    "z_loss_wrong": ("test_router_grad.py", "faithful", "test_z_loss",
                     ["z-loss", "does not match its definition mean(logsumexp(router_logits)^2)",
                      "it equals mean(logsumexp)^2 (squared after averaging)"]),
    "optimizer_missing_experts": ("test_sft.py", "faithful", "test_sft_all_parameters_train",
                                  ["missing from the optimizer's parameter groups: layers.1.moe.experts.w1",
                                   "did not change in 24 steps"]),
    "lr_schedule_off": ("test_sft.py", "faithful", "test_sft_lr_schedule",
                        ["the learning-rate schedule is wrong", "off by a constant factor 2"]),
    "shared_expert_frozen": ("test_router_grad.py", "faithful", "test_shared_experts_get_gradient",
                             ["the shared expert does not train", "layers.1.moe.shared_experts.w1.weight: no gradient"]),
}


@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_planted_training_bug_is_caught(pytester, bug):
    suite, variant, check, fragments = EXPECTED[bug]
    run_planted_bug(pytester, "planted_training", bug, suite, variant, check, fragments)


@pytest.mark.parametrize("arch", ["glm4_moe", "kimi_k25", "mixtral"])
@pytest.mark.parametrize("suite", ["test_router_grad.py", "test_sft.py"])
def test_unbroken_arch_passes(pytester, arch, suite):
    """The control: the arches the bugs are planted in pass the same suites unbroken."""
    result, reports = run_suites(pytester, "--arch", arch, "-k", "faithful", suite=suite)
    statuses = {name: c["status"] for name, c in checks_by_name(reports[arch]).items()}
    assert statuses and set(statuses.values()) <= {"passed", "skipped", "not_applicable"}, statuses


def test_the_bf16_profile_checks_gradient_flow_in_bf16(pytester):
    """--dtype bf16 runs the gradient-flow checks on the candidate cast to bf16: a router that only
    the bf16 path detaches fails there, naming it, and passes the same check in fp32."""
    check = "test_router_weights_get_gradient[kimi_k25_router_detached_in_bf16-faithful]"
    source = "import planted_training\nARCH = planted_training.build('router_detached_in_bf16')\n"
    statuses = {}
    for dtype in ("bf16", "float32"):
        _, reports = run_suites(pytester, "--dtype", dtype, "-k", "faithful and test_router_weights_get_gradient",
                                suite="test_router_grad.py", plugin_source=source, plugin_name=f"planted_router_{dtype}")
        found = checks_by_name(reports["kimi_k25_router_detached_in_bf16"])[check]
        statuses[dtype] = found["status"]
        if dtype == "bf16":
            assert "router weights get no usable gradient" in found["message"], found["message"]
            assert "layers.1.moe.router.gate.weight: no gradient" in found["message"], found["message"]
    assert statuses == {"bf16": "failed", "float32": "passed"}, statuses


# bf16-only training bugs: (suite, check, fragments of the bf16 failure)
BF16_EXPECTED = {
    "bias_cast_to_bf16": ("test_sft.py", "test_sft_selection_bias_updates",
                          ["the selection bias does not take the bias update as defined",
                           "layers.1.moe.router.expert_bias (torch.bfloat16)", "keep it fp32"]),
    "optimizer_without_master_weights": ("test_sft.py", "test_sft_optimizer_keeps_small_updates",
                                         ["the optimizer loses updates smaller than the bf16 spacing",
                                          "small_update_mismatch", "keep fp32 master weights"]),
    "export_in_compute_dtype": ("test_sft.py", "test_sft_checkpoint_reloads",
                                ["the trained checkpoint does not reload faithfully",
                                 "layers.1.moe.router.gate.weight (torch.float32 in the trained model, torch.bfloat16 on disk)",
                                 "write each tensor in its own dtype"]),
    "aux_loss_in_bf16": ("test_router_grad.py", "test_aux_loss",
                         ["aux_rel_delta", "the aux loss comes back as torch.bfloat16", "upcast the router logits to fp32 first"]),
    "z_loss_in_bf16": ("test_router_grad.py", "test_z_loss",
                       ["z_rel_delta", "the z-loss comes back as torch.bfloat16", "upcast the router logits to fp32 first"]),
}


@pytest.mark.parametrize("bug", sorted(BF16_EXPECTED))
def test_planted_bf16_training_bug_is_caught(pytester, bug):
    """Under --dtype bf16 the bug fails its check with its message; in fp32 the same check passes
    or does not apply (the bug is bf16's alone)."""
    suite, check, fragments = BF16_EXPECTED[bug]
    arch = planted_training.BUGS[bug][0] + "_" + bug
    source = f"import planted_training\nARCH = planted_training.build({bug!r})\n"
    statuses = {}
    for dtype in ("bf16", "float32"):
        _, reports = run_suites(pytester, "--dtype", dtype, "-k", f"faithful and {check}", suite=suite,
                                plugin_source=source, plugin_name=f"planted_{bug}_{dtype}")
        (found,) = [c for name, c in checks_by_name(reports[arch]).items() if name.startswith(check + "[")]
        statuses[dtype] = found["status"]
        if dtype == "bf16":
            for fragment in fragments:
                assert fragment in found["message"], f"{bug}: message lacks {fragment!r}:\n{found['message']}"
    assert statuses["bf16"] == "failed" and statuses["float32"] in ("passed", "not_applicable"), statuses



# under --dtype bf16 the aux loss's gradient flow is checked on the candidate cast to bf16: the
# planted aux loss cut from the graph fails it there too
def test_a_detached_aux_loss_is_caught_in_bf16(pytester):
    run_planted_bug(pytester, "planted_wave3", "aux_detached", "test_router_grad.py", "faithful",
                    "test_aux_loss_gradient_flows", ["the aux loss sends no gradient to the routers", "it is detached from the router logits"],
                    args=("--dtype", "bf16"))


# under --dtype bf16 gradient parity runs with the reference's routing pinned where the candidate
# routes a token differently: the planted halved router gradient, and the router detached only
# in the bf16 path, fail it there
@pytest.mark.parametrize("module, bug, fragments", [
    ("planted_more", "router_grad_halved", ["grad_rel_delta.router = 0.5", "mlp.gate.weight"]),
    ("planted_training", "router_detached_in_bf16", ["grad_rel_delta.router", "gate.weight"]),
])
def test_gradient_parity_catches_router_bugs_in_bf16(pytester, module, bug, fragments):
    hits = run_planted_bug(pytester, module, bug, "test_router_grad.py", "faithful", "test_gradient_parity", fragments,
                           args=("--dtype", "bf16"))
    for c in hits.values():
        assert "tokens_pinned" in c["figures"], c["figures"]


# under --dtype bf16 balancing runs at a rate scaled to the router scores' spread: the planted
# reversed bias update fails there as in fp32
def test_a_reversed_bias_update_is_caught_in_bf16(pytester):
    hits = run_planted_bug(pytester, "planted_more", "bias_update_reversed", "test_router_grad.py", "faithful",
                           "test_aux_loss_free_balancing", ["the bias update does not move load toward balance"],
                           args=("--dtype", "bf16"))
    for c in hits.values():
        assert c["figures"]["score_spread"] > 0 and c["figures"]["balance_ratio"] > 0.9, c["figures"]

