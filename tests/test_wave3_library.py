"""Library pieces of the wave-3 bug classes, without running a suite: the spec validator's
routing topology and trap declarations (BUGS.md #35, #40), the extreme-bias routing edge case of
the kernel check set (#33), the tied-head converter rule (#44), the synthesized MTP layers (#43)."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from moe_conformance.convert import ConversionError
from moe_conformance.extras import MTPLayers
from moe_conformance.kernel_checks import checks
from moe_conformance.kernel_checks.strategies import RouteCase, RoutingConfig, route_edge_cases
from moe_conformance.native import native_converter
from moe_conformance.native.kernels import torch_backend
from moe_conformance.registry import discover
from moe_conformance.spec import SpecError, Variant, validate

GROUPED = RoutingConfig("sigmoid", n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                        has_correction_bias=True)


@pytest.fixture(scope="module")
def glm():
    return discover()[0]["glm4_moe"].load()


def _with_config(spec, **changes):
    faithful = spec.variant("faithful")

    def config():
        cfg = faithful.config()
        for k, v in changes.items():
            setattr(cfg, k, v)
        return cfg

    return spec.replace(variants=(dataclasses.replace(faithful, config=config),))


# ---- BUGS #35: invalid group topology is refused at load, by name


@pytest.mark.parametrize("changes, message", [
    ({"n_group": 12, "topk_group": 6}, "n_group=12 equals the expert count"),
    ({"n_group": 4, "topk_group": 1, "num_experts_per_tok": 4}, "top_k=4 exceeds the 3 experts that topk_group=1 kept groups"),
    ({"n_group": 5, "topk_group": 2}, "num_experts=12 is not divisible by n_group=5"),
])
def test_invalid_routing_topology_is_a_named_spec_error(glm, changes, message):
    with pytest.raises(SpecError) as info:
        validate(_with_config(glm, **changes), "team_plugin.py")
    text = str(info.value)
    assert "arch plugin team_plugin.py: field 'variants' variant 'faithful' has an invalid routing topology" in text, text
    assert message in text, text


# ---- BUGS #40: traps are declared, and only declared ones are accepted


@pytest.mark.parametrize("variant, message", [
    (Variant("stress", dict, traps=frozenset({"square_everything"})), "declares unknown traps ['square_everything']"),
    (Variant("stress", dict, traps={"top1"}), "traps must be a frozenset"),
    (Variant("stress", dict, init_gains={"e_score_correction_bias": "negative"}), "init_gains must map"),
])
def test_trap_declarations_are_validated(glm, variant, message):
    variants = (glm.variant("faithful"), variant) if variant.name != "faithful" else (variant,)
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(glm.replace(variants=variants), "team_plugin.py")


# ---- BUGS #33: a bias far above the scores cancels in `selected - bias`


def _selected_minus_bias(router_logits, *, scoring, top_k, correction_bias, n_group, topk_group, norm_topk_prob,
                         routed_scaling_factor):
    """A route kernel that recovers the unbiased score of each chosen expert as the biased
    score minus the bias (flashinfer #3875): in fp32, sigmoid ~1e-8 + 12 rounds to 12."""
    weights, indices = torch_backend.route_torch(
        router_logits, scoring=scoring, top_k=top_k, correction_bias=correction_bias, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=False, routed_scaling_factor=1.0)
    if correction_bias is not None:
        scores = torch.sigmoid(router_logits.float()) if scoring == "sigmoid" else router_logits.float().softmax(-1)
        biased = (scores + correction_bias.float()).gather(1, indices)
        weights = biased - correction_bias.float()[indices]  # the bug
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


@pytest.fixture
def selected_minus_bias(monkeypatch):
    from moe_conformance.native import kernels

    subject = dataclasses.replace(kernels.TORCH, name="torch_selected_minus_bias", route=_selected_minus_bias)
    return subject


def test_the_extreme_bias_edge_case_catches_selected_minus_bias(monkeypatch, selected_minus_bias):
    (case,) = route_edge_cases(GROUPED)
    assert case.bias_offset == 12.0 and case.logit_shift == -18.0
    with pytest.raises(AssertionError) as err:
        checks.check_route(case, backend=selected_minus_bias)
    message = str(err.value)
    assert "[route]" in message and "bias_offset=12 logit_shift=-18" in message and "weights (run 1)" in message, message
    with monkeypatch.context() as m:
        m.setattr(checks, "GATES", {k: math.inf for k in checks.GATES})
        lifted = checks.check_route(case, backend=selected_minus_bias)["max_error"]
    assert lifted > 10 * checks.gate_for("route", torch.float32), lifted


def test_ordinary_bias_offsets_hide_selected_minus_bias(selected_minus_bias):
    """Why the edge case exists: with biases around 2 the cancellation stays under the gate."""
    for seed in range(4):
        checks.check_route(RouteCase(12, 20, 4, GROUPED, seed=seed), backend=selected_minus_bias)


def test_the_check_set_runs_the_edge_case(selected_minus_bias):
    with pytest.raises(AssertionError, match=r"\[route\] .*bias_offset=12 logit_shift=-18"):
        checks.run_kernel_checks(GROUPED, backends=(selected_minus_bias,), dtypes=(torch.float32,), max_examples=1)


@pytest.mark.parametrize("routing", [GROUPED, RoutingConfig("sigmoid", has_correction_bias=True),
                                     RoutingConfig("softmax", norm_topk_prob=True, has_correction_bias=True)],
                         ids=["grouped_sigmoid", "sigmoid", "softmax_with_bias"])
def test_the_project_kernels_pass_the_extreme_bias_case(routing):
    for case in route_edge_cases(routing):
        checks.check_route(case, backend="torch")


def test_routers_without_a_bias_get_no_extreme_case():
    assert route_edge_cases(RoutingConfig("softmax")) == [] and route_edge_cases(None) == []


# ---- BUGS #44: a tied head has no on-disk key and must stay tied


def _checkpoint(lm_head: bool):
    t = lambda *s: torch.randn(*s)  # noqa: E731
    sd = {"model.embed_tokens.weight": t(5, 4), "model.norm.weight": t(4)}
    if lm_head:
        sd["lm_head.weight"] = t(5, 4)
    return sd


TIED, UNTIED = types.SimpleNamespace(tie_word_embeddings=True), types.SimpleNamespace(tie_word_embeddings=False)


def _tied(in_state: bool):
    from moe_conformance.convert import KeyMapConverter, Rename, Tied

    return KeyMapConverter([Rename("model.embed_tokens.weight", "tok_embeddings.weight"), Rename("model.norm.weight", "norm.weight"),
                            Tied("lm_head.weight", "output.weight", source="tok_embeddings.weight", in_state=in_state)])


def test_a_tied_head_comes_from_the_embeddings_and_is_not_exported():
    sd = _checkpoint(lm_head=False)
    cand = _tied(in_state=True).to_candidate(sd, TIED)  # a candidate whose state dict names the alias
    assert torch.equal(cand["output.weight"], sd["model.embed_tokens.weight"])
    assert cand["output.weight"].data_ptr() != cand["tok_embeddings.weight"].data_ptr()  # a copy: no aliasing
    assert set(_tied(in_state=True).to_hf(cand, TIED)) == set(sd)
    # the native candidate's state dict holds the embedding only: nothing to fill, nothing to drop
    native = native_converter("gqa").to_candidate(sd, TIED)
    assert "output.weight" not in native and set(native_converter("gqa").to_hf(native, TIED)) == set(sd)


def test_an_untied_head_is_its_own_tensor_both_ways():
    conv = native_converter("gqa")
    sd = _checkpoint(lm_head=True)
    cand = conv.to_candidate(sd, UNTIED)
    assert torch.equal(cand["output.weight"], sd["lm_head.weight"])
    back = conv.to_hf(cand, UNTIED)
    assert set(back) == set(sd) and torch.equal(back["lm_head.weight"], sd["lm_head.weight"])


def test_a_head_key_in_a_tied_checkpoint_is_an_error():
    with pytest.raises(ConversionError, match="lm_head.weight is present, but the config ties it to the embeddings"):
        native_converter("gqa").to_candidate(_checkpoint(lm_head=True), TIED)


def test_a_head_that_drifted_from_its_embedding_is_not_exported_as_tied():
    conv = _tied(in_state=True)
    cand = conv.to_candidate(_checkpoint(lm_head=False), TIED)
    cand["output.weight"] = cand["output.weight"] + 1e-3
    with pytest.raises(ConversionError, match="output.weight is tied to tok_embeddings.weight .* holds different values"):
        conv.to_hf(cand, TIED)


def test_the_nested_text_config_decides_the_tie():
    """kimi_k25-style configs: the text tower's flag, not the outer one (NeMo Automodel #2268)."""
    conv = native_converter("gqa")
    outer = types.SimpleNamespace(tie_word_embeddings=True, text_config=UNTIED)
    sd = _checkpoint(lm_head=True)
    assert set(conv.to_hf(conv.to_candidate(sd, outer), outer)) == set(sd)


# ---- BUGS #43: MTP layers synthesized like the last decoder layer


def test_mtp_layers_are_shaped_like_the_last_decoder_layer():
    cfg = types.SimpleNamespace(num_hidden_layers=2, num_nextn_predict_layers=2, hidden_size=4, vocab_size=5)
    disk = {"model.embed_tokens.weight": torch.zeros(5, 4, dtype=torch.bfloat16),
            "model.layers.1.mlp.experts.0.gate_proj.weight": torch.zeros(3, 4, dtype=torch.bfloat16),
            "model.layers.1.mlp.gate.e_score_correction_bias": torch.zeros(2)}
    extra = MTPLayers().tensors(disk, cfg, seed=0)
    for layer in (2, 3):
        assert extra[f"model.layers.{layer}.mlp.experts.0.gate_proj.weight"].dtype == torch.bfloat16
        assert extra[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"].dtype == torch.float32
        assert extra[f"model.layers.{layer}.eh_proj.weight"].shape == (4, 8)
        assert extra[f"model.layers.{layer}.shared_head.head.weight"].shape == (5, 4)
    assert len(extra) == 2 * (2 + 6)
    meta = MTPLayers().tensors(disk, cfg)
    assert set(meta) == set(extra) and all(t.is_meta for t in meta.values())
    assert torch.equal(extra["model.layers.2.enorm.weight"], MTPLayers().tensors(disk, cfg, seed=0)["model.layers.2.enorm.weight"])
    assert MTPLayers().tensors(disk, types.SimpleNamespace(**{**vars(cfg), "num_nextn_predict_layers": 0})) == {}
