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
from moe_conformance.registry import discover


def _case(arch, variant="faithful"):
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
    assert "softmax scoring" in engines.vllm_unsupported(_case("minimax_m2"))


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
