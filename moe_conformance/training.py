"""Training-side pieces the `router_grad` and `sft` suites run: the loss on the reverse-text
task, router-health statistics, load-balancing losses, the aux-loss-free bias update, a
force-route helper, gradient conversion for candidate/reference parity, and a short,
deterministic SFT loop run for candidate and reference side by side.

The candidate's training code is pluggable: an arch spec may carry ``training=TrainingHooks(...)``
(the team's own aux loss, z-loss, optimizer, LR schedule, bias update) and the suites check those
against the definitions here; the reference side always runs :data:`REFERENCE_HOOKS`.

Definitions (the oracles):
- aux loss: Switch/Mixtral load balancing, exactly transformers' ``load_balancing_loss_func``:
  ``E * sum_e f_e * P_e`` where ``P_e`` is the mean softmax(router_logits) of expert e and
  ``f_e`` the fraction of top-k slots (top-k of the same softmax) going to e, over every MoE
  layer's rows together, padding rows excluded. Balanced routing gives ``top_k``.
- z-loss (ST-MoE): mean over layers and valid rows of ``logsumexp(router_logits)^2``.
- aux-loss-free balancing (DeepSeek-V3): after each step, per layer,
  ``bias += rate * sign(mean_load - load)``; the bias only changes selection and never
  receives gradient.
- LR: linear warmup to ``lr`` over ``warmup`` steps, cosine decay to ``min_lr_ratio * lr`` at
  the last step. AdamW, decay on tensors with >= 2 dims only, global grad-norm clipping.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .case import logits_of
from .contract import ProbeError, RouterReading
from .data import IGNORE, TrainBatch
from .probing import RoutingTap, forced_routing, routing_layers

# --------------------------------------------------------------------------------------------
# Definitions


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 24
    batch_size: int = 8
    lr: float = 3e-3
    warmup: int = 4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0
    aux_coef: float = 1e-2
    z_coef: float = 1e-3
    # DeepSeek-V3 uses 1e-3 over long runs; a few dozen steps need a faster nudge to keep
    # routing healthy (measured: 1e-3 lets the tiny models collapse to one expert per layer).
    bias_rate: float = 2e-2


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``cfg.warmup`` steps, then cosine to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - 1 - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW for a model that computes in low precision, as production trains: every bf16/fp16
    parameter has an fp32 master copy that holds the optimizer's state and takes the update, and
    the model's parameter gets the master rounded to its dtype after each step. Plain AdamW on
    bf16 weights loses every update under half a weight's bf16 spacing: at lr 3e-3 a norm
    weight near 1 (spacing 2^-7) never moves."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self._masters = {p: p.detach().float() for g in self.param_groups for p in g["params"]
                         if p.is_floating_point() and p.dtype != torch.float32}

    @torch.no_grad()
    def step(self, closure=None):
        swapped = []
        for group in self.param_groups:
            for p in group["params"]:
                master = self._masters.get(p)
                if master is not None and p.grad is not None:
                    swapped.append((p, p.data, p.grad))
                    p.data, p.grad = master, p.grad.float()
        try:
            return super().step(closure)
        finally:
            for p, low, grad in swapped:
                low.copy_(p.data)
                p.data, p.grad = low, grad


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled decay on matrices only; with fp32 master weights when the model's
    parameters are in low precision (the bf16 profile), plain otherwise."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    low_precision = any(p.dtype in (torch.bfloat16, torch.float16) for p in params)
    return (MasterWeightAdamW if low_precision else torch.optim.AdamW)(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False,
    )


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions with a label (labels already shifted)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def _rows_mask(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if attention_mask is None else attention_mask.reshape(-1).to(router_logits[0].device, torch.float32)


def aux_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral load-balancing loss from the router logits of every MoE layer."""
    E = router_logits[0].shape[-1]
    mask = _rows_mask(router_logits, attention_mask)
    tokens = torch.zeros(E, device=router_logits[0].device)
    probs = torch.zeros(E, device=router_logits[0].device)
    rows = 0.0
    for logits in router_logits:
        p = logits.float().softmax(-1)
        chosen = p.topk(top_k, dim=-1).indices
        w = torch.ones(p.shape[0], device=p.device) if mask is None else mask
        tokens = tokens + torch.zeros(E, device=p.device).scatter_add_(0, chosen.reshape(-1), w.repeat_interleave(top_k))
        probs = probs + (p * w[:, None]).sum(0)
        rows = rows + w.sum()
    return E * (tokens / rows * probs / rows).sum()


def z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss: mean of logsumexp(logits)^2 over every layer's valid rows."""
    mask = _rows_mask(router_logits, attention_mask)
    total, rows = 0.0, 0.0
    for logits in router_logits:
        lse2 = logits.float().logsumexp(-1).pow(2)
        w = torch.ones_like(lse2) if mask is None else mask
        total = total + (lse2 * w).sum()
        rows = rows + w.sum()
    return total / rows


@torch.no_grad()
def bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3 aux-loss-free balancing: nudge each expert's selection bias toward the mean
    load (up for under-loaded experts, down for over-loaded ones)."""
    load = load.to(bias.device, torch.float32)
    bias.add_(rate * torch.sign(load.mean() - load).to(bias.dtype))


@dataclass(frozen=True)
class TrainingHooks:
    """The training code under test. A team plugs its own functions in through
    ``ArchSpec(training=TrainingHooks(aux_loss=my_aux_loss, ...))``."""

    aux_loss: Callable[..., torch.Tensor] = aux_loss  # (router_logits, top_k, attention_mask)
    z_loss: Callable[..., torch.Tensor] = z_loss  # (router_logits, attention_mask)
    optimizer: Callable[[torch.nn.Module, TrainConfig], torch.optim.Optimizer] = build_optimizer
    lr_at: Callable[[int, TrainConfig], float] = lr_at
    bias_update: Callable[[torch.Tensor, torch.Tensor, float], None] = bias_update


REFERENCE_HOOKS = TrainingHooks()


def hooks_for(spec) -> TrainingHooks:
    return getattr(spec, "training", None) or REFERENCE_HOOKS


# --------------------------------------------------------------------------------------------
# Routers: taps, loads, health, force-routing


def routing_tap(case, model: torch.nn.Module, side: str) -> RoutingTap:
    """A tap on every MoE layer's routing decision, read through that side's probes."""
    return RoutingTap(model, case, side)


def loads(indices: torch.Tensor, num_experts: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens per expert ([E], float) from top-k indices [T, K], counting only valid rows."""
    idx = indices if valid is None else indices[valid.reshape(-1).bool()]
    return torch.bincount(idx.reshape(-1), minlength=num_experts).float()


def health(layer_loads: list[torch.Tensor]) -> dict[str, float]:
    """Expert utilization (fraction of experts receiving tokens; worst layer) and load
    imbalance (max/mean tokens per expert; worst layer)."""
    util = min(float((load > 0).float().mean()) for load in layer_loads)
    imbalance = max(float(load.max() / load.mean().clamp_min(1e-9)) for load in layer_loads)
    return {"expert_utilization": util, "load_imbalance": imbalance}


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def selection_biases(case, model: torch.nn.Module, side: str) -> list[tuple[str, torch.Tensor] | None]:
    """Per MoE layer (probing.routing_layers order), its selection-only bias ``(name, tensor)``
    or None. The reference's are transformers' ``e_score_correction_bias`` buffers; the
    candidate's are found by tracing the converter (the candidate tensor that becomes the
    reference's bias on disk), so no naming convention of the candidate is assumed."""
    if side == "ref":
        # a buffer (DeepSeek-V3) or a frozen parameter (ERNIE 4.5's moe_statics)
        by_layer = {layer_of(n): (n, b) for n, b in [*model.named_buffers(), *model.named_parameters()]
                    if n.endswith("e_score_correction_bias")}
    else:
        state = model.state_dict(keep_vars=True)
        by_layer = {}
        for name, disk in candidate_bias_names(case).items():
            if name in state:
                by_layer[layer_of(disk[0])] = (name, state[name])
    return [by_layer.get(l.layer) for l in routing_layers(case, side, model)]


@contextmanager
def force_route(case, model: torch.nn.Module, side: str, experts: list[int], offset: float = 100.0):
    """Steer every MoE layer toward ``experts`` (the others get no token when
    ``len(experts) >= top_k``). A layer with a selection-only bias gets the offset there (its own
    routing code then picks the experts; weights unchanged). Otherwise the decision is forced
    through the probes: top-k of the boosted scores, weights from the shifted logits' softmax
    where the probe exposes logits (else the natural scores of the chosen experts)."""
    E = case.num_experts
    boost = torch.zeros(E)
    boost[experts] = offset
    undo = []
    biased = selection_biases(case, model, side)
    unbiased_layers = {l.layer for l, found in zip(routing_layers(case, side, model), biased) if found is None}

    def choose(layer, natural):
        if layer not in unbiased_layers:
            return natural
        k = natural.indices.shape[-1]
        base = natural.logits if natural.logits is not None else natural.scores
        if base is None:
            # no scores to steer: every token takes the first k of `experts`, with its own
            # (graph-attached) weights, so the router still gets a gradient
            idx = torch.tensor(experts[:k], device=natural.indices.device).expand(natural.indices.reshape(-1, k).shape[0], -1)
            return RouterReading(indices=idx.reshape(natural.indices.shape).to(natural.indices.dtype), weights=natural.weights)
        base = base.reshape(-1, E)
        shifted = base.float() + boost.to(base.device)
        idx = shifted.topk(k, dim=-1).indices
        source = shifted.softmax(-1) if natural.logits is not None else base.float()
        weights = source.gather(-1, idx).to(natural.weights.dtype)
        return RouterReading(indices=idx.reshape(natural.indices.shape), weights=weights.reshape(natural.weights.shape))

    try:
        for found in biased:
            if found is not None:
                bias = found[1]
                with torch.no_grad():
                    bias.add_(boost.to(bias))
                undo.append(lambda bias=bias: bias.data.sub_(boost.to(bias)))
        if unbiased_layers:
            with forced_routing(model, case, side, choose):
                yield
        else:
            yield
    finally:
        for fn in reversed(undo):
            fn()


# --------------------------------------------------------------------------------------------
# Names: candidate tensors in the on-disk naming, parameter groups


def candidate_disk_names(case, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """candidate key -> the on-disk key(s) it feeds (one per expert for stacked tensors, one
    fused key for several candidate tensors...). Traced, not parsed: every candidate tensor is
    filled with its own marker value, the whole state converted, and the markers read back, so
    any converter (renames, stacking, fused transforms) is followed without knowing its rules."""
    keys = [k for k, v in state.items() if v.is_floating_point()]
    # tensors that are one tensor under two names (a tied head) carry one marker: the name
    # met first gets the disk keys, its aliases none
    first: dict[tuple, int] = {}
    marker = {}
    for n, k in enumerate(keys):
        v = state[k]
        alias = (v.data_ptr(), tuple(v.shape), v.dtype) if v.data_ptr() else (k,)
        marker[k] = first.setdefault(alias, n + 1)
    marked = {k: torch.full(v.shape, float(marker[k]) if k in marker else 0, dtype=v.dtype if k in marker else torch.float32)
              for k, v in state.items()}
    out: dict[str, list[str]] = {k: [] for k in state}
    for disk_key, t in case.to_hf(marked).items():
        for marker in torch.unique(t.float()).tolist():
            if marker >= 1 and float(marker).is_integer() and int(marker) <= len(keys):
                out[keys[int(marker) - 1]].append(disk_key)
    return {k: sorted(v) for k, v in out.items()}


def reference_disk_name(case, ref_name: str) -> str:
    prefix = getattr(case.spec.converter, "disk_prefix", "")
    return prefix + ref_name if prefix + ref_name in case.disk_state else ref_name


def correction_bias_keys(case) -> list[str]:
    """On-disk keys of the selection-only biases: the reference routers' bias buffers, named as
    transformers saves them (its save-time renames applied, the release's prefix added)."""
    from transformers.core_model_loading import revert_weight_conversion

    ref = case.reference()
    named = {n: b for n, b in [*ref.named_buffers(), *ref.named_parameters()] if n.endswith("e_score_correction_bias")}
    prefix = getattr(case.spec.converter, "disk_prefix", "")
    return [k if k.startswith(prefix) else prefix + k for k in revert_weight_conversion(ref, named)]


def candidate_bias_names(case) -> dict[str, list[str]]:
    """Candidate tensor name -> the on-disk selection-bias key(s) it becomes (traced)."""
    keys = set(correction_bias_keys(case))
    if not keys:
        return {}
    model = case.candidate()
    state = dict(model.state_dict())
    return {name: disk for name, disk in candidate_disk_names(case, state).items() if disk and set(disk) <= keys}


def candidate_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    module, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module) if module else model, attr)


GROUPS = ("attention", "router", "experts", "shared", "norms", "embeddings", "dense", "other")


def group_of(disk_key: str) -> str:
    """The parameter group of an on-disk key (DeepSeek/GLM, Mixtral, Qwen, gpt-oss namings)."""
    k = disk_key
    if "shared_expert" in k or "shared_mlp" in k:
        return "shared"
    if ".experts." in k:
        return "experts"
    if re.search(r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$", k):
        return "router"
    if "embed_tokens" in k or k.endswith("lm_head.weight") or ".wte." in k:
        return "embeddings"
    parts = k.split(".")
    if "norm" in parts[-2 if len(parts) > 1 else 0]:
        return "norms"
    if "attn" in k or "attention" in k:
        return "attention"
    if ".mlp." in k:
        return "dense"
    return "other"


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters(remove_duplicate=False)}


def reference_disk_grads(case, ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The reference's gradients in the on-disk naming, through transformers' own save-time
    conversion (fused experts -> per-expert keys), with the release's key prefix."""
    from transformers.core_model_loading import revert_weight_conversion

    prefix = getattr(case.spec.converter, "disk_prefix", "")
    out = revert_weight_conversion(ref, _grads(ref))
    out = {(k if k.startswith(prefix) else prefix + k): v for k, v in out.items()}
    # a tied head is one tensor saved once (as the embedding): its gradient is the embedding's
    return {k: v for k, v in out.items() if k in case.disk_state}


def candidate_disk_grads(case, cand: torch.nn.Module) -> dict[str, torch.Tensor]:
    return case.to_hf(_grads(cand))


@dataclass
class GradParity:
    figures: dict[str, float]
    worst: dict[str, tuple[str, float]]  # group -> (key, relative delta)
    problems: list[str]


def grad_parity(ref_grads: dict[str, torch.Tensor], cand_grads: dict[str, torch.Tensor]) -> GradParity:
    """Per group: max|g_cand - g_ref| over the group's tensors, relative to the group's largest
    reference gradient."""
    problems = []
    # a tensor the reference holds but never trains (a frozen statistics parameter: zero
    # gradient) needs no candidate gradient, as a candidate buffer that is never trained
    missing = sorted(k for k in set(ref_grads) - set(cand_grads) if ref_grads[k].abs().max() > 0)
    extra = sorted(k for k in set(cand_grads) - set(ref_grads) if cand_grads[k].abs().max() > 0)
    if missing:
        problems.append(f"candidate has no gradient for {len(missing)} reference parameter(s): {', '.join(missing[:6])}")
    if extra:
        problems.append(f"candidate has gradients for {len(extra)} tensor(s) the reference does not train: {', '.join(extra[:6])}")
    delta: dict[str, float] = {}
    scale: dict[str, float] = {}
    worst: dict[str, tuple[str, float]] = {}
    per_key = {}
    for k in sorted(set(ref_grads) & set(cand_grads)):
        g = group_of(k)
        r, c = ref_grads[k].double(), cand_grads[k].double()
        if r.shape != c.shape:
            problems.append(f"{k}: gradient shape {tuple(c.shape)}, reference {tuple(r.shape)}")
            continue
        d = float((r - c).abs().max()) if torch.isfinite(c).all() else math.inf
        per_key[k] = (g, d, float(r.abs().max()))
        delta[g] = max(delta.get(g, 0.0), d)
        scale[g] = max(scale.get(g, 0.0), float(r.abs().max()))
    figures = {}
    for k, (g, d, s) in per_key.items():
        rel = d / max(scale[g], 1e-30)
        if g not in worst or rel > worst[g][1]:
            worst[g] = (k, rel)
    for g in GROUPS:
        if g in delta:
            figures[f"grad_rel_delta.{g}"] = delta[g] / max(scale[g], 1e-30)
    return GradParity(figures, worst, problems)


# --------------------------------------------------------------------------------------------
# One forward+backward, and the short SFT run


def run_model(model, batch, reference: bool):
    if reference:
        return model(**batch.kwargs, use_cache=False)
    return model(**batch.kwargs)


def lm_backward(model, batch: TrainBatch, reference: bool, tap: RoutingTap | None = None) -> float:
    """Forward + backward of the task loss alone (no aux/z terms); returns the loss."""
    model.zero_grad(set_to_none=True)
    if tap is None:
        loss = lm_loss(logits_of(run_model(model, batch, reference)), batch.labels)
    else:
        with tap():
            loss = lm_loss(logits_of(run_model(model, batch, reference)), batch.labels)
    loss.backward()
    return float(loss.detach())


@dataclass
class SideLog:
    """Per-step series for one side (candidate or reference)."""

    loss: list[float] = field(default_factory=list)  # the task loss (cross-entropy)
    total: list[float] = field(default_factory=list)  # + aux_coef * aux + z_coef * z
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)  # as applied by the optimizer
    expert_utilization: list[float] = field(default_factory=list)
    load_imbalance: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    z_loss: list[float] = field(default_factory=list)
    # max |bias after the update - (bias before + rate * sign(mean load - load))| over layers: the
    # update as stored in the model's own selection-bias tensor (a bf16 bias rounds it)
    bias_update_error: list[float] = field(default_factory=list)
    bias_update_worst: list[str] = field(default_factory=list)  # that layer's bias tensor and dtype
    error: str | None = None


@dataclass
class SFTRun:
    cfg: TrainConfig
    candidate: SideLog
    reference: SideLog
    cand_model: torch.nn.Module
    ref_model: torch.nn.Module
    initial_cand_state: dict[str, torch.Tensor]
    # on-disk keys of the reference parameters that ended where they started (in bf16, an
    # update under half a weight's spacing leaves the bf16 value as it was; fp32: none)
    unchanged_reference_keys: frozenset[str]
    not_in_optimizer: list[str]
    seconds: float = 0.0


class _Side:
    def __init__(self, case, model, hooks: TrainingHooks, side: str, cfg: TrainConfig):
        self.model, self.hooks, self.cfg = model, hooks, cfg
        self.reference = side == "ref"
        self.tap = routing_tap(case, model, side)
        self.opt = hooks.optimizer(model, cfg)
        self.E = case.num_experts
        self.top_k = case.model_config.num_experts_per_tok
        # aux and z-loss need router logits: both sides train without them when the candidate's
        # probe exposes none (the curves are compared like for like)
        self.router_losses = "logits" in case.routing_fields()
        self.biases = []
        if case.spec.capabilities.correction_bias:
            self.biases = [f if f is not None else (None, None) for f in selection_biases(case, model, side)]
        self.log = SideLog()

    def step(self, step: int, batch: TrainBatch) -> None:
        cfg, log = self.cfg, self.log
        lr = self.hooks.lr_at(step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        with self.tap():
            logits = logits_of(run_model(self.model, batch, self.reference))
        ce = lm_loss(logits, batch.labels)
        if self.router_losses:
            router_logits = self.tap.logits
            aux = self.hooks.aux_loss(router_logits, self.top_k, batch.attention_mask)
            z = self.hooks.z_loss(router_logits, batch.attention_mask)
            total = ce + cfg.aux_coef * aux + cfg.z_coef * z
        else:
            aux = z = torch.tensor(float("nan"))
            total = ce
        total.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip, foreach=False) if params else torch.tensor(0.0)
        log.lr.append(float(self.opt.param_groups[0]["lr"]))
        self.opt.step()
        layer_loads = [loads(idx, self.E, batch.valid) for idx in self.tap.indices]
        error, worst = 0.0, ""
        for (name, bias), load in zip(self.biases, layer_loads):
            if bias is not None:
                want = bias.detach().float().clone()
                bias_update(want, load, cfg.bias_rate)
                self.hooks.bias_update(bias, load, cfg.bias_rate)
                err = float((bias.detach().float() - want).abs().max())
                if err > error or not worst:
                    error, worst = err, f"{name} ({bias.dtype})"
        log.bias_update_error.append(error)
        log.bias_update_worst.append(worst)
        log.loss.append(float(ce.detach()))
        log.total.append(float(total.detach()))
        log.grad_norm.append(float(norm))
        log.aux_loss.append(float(aux.detach()))
        log.z_loss.append(float(z.detach()))
        h = health(layer_loads)
        log.expert_utilization.append(h["expert_utilization"])
        log.load_imbalance.append(h["load_imbalance"])


def run_sft(case, hooks: TrainingHooks, cfg: TrainConfig = TrainConfig()) -> SFTRun:
    """``cfg.steps`` optimizer steps for reference and candidate from the same initialization on
    the same reverse-text batches; reference with REFERENCE_HOOKS, candidate with ``hooks``."""
    import time

    from . import data, tokenizer

    start = time.perf_counter()
    batches = [b.to(case.device) for b in data.batches(tokenizer.load(), cfg.steps, cfg.batch_size, case.case_seed)]
    # under the bf16 profile both sides compute in bf16 (the candidate through its plugin's cast, the
    # reference keeping what its class keeps in fp32) and train with the optimizer's master weights
    ref, cand = case.reference(dtype=case.dtype).train(), case.candidate(dtype=case.dtype).train()
    # by parameter name: a candidate's parameter names may differ from its state-dict keys
    initial = {k: v.detach().clone() for k, v in cand.named_parameters()}
    initial_ref = {k: v.detach().clone() for k, v in ref.named_parameters()}
    sides = {"ref": _Side(case, ref, REFERENCE_HOOKS, "ref", cfg), "cand": _Side(case, cand, hooks, "cand", cfg)}
    in_opt = {id(p) for g in sides["cand"].opt.param_groups for p in g["params"]}
    not_in_optimizer = [n for n, p in cand.named_parameters() if id(p) not in in_opt]
    for name, side in sides.items():
        for step, batch in enumerate(batches):
            try:
                side.step(step, batch)
            except Exception as exc:  # noqa: BLE001 - a crash is a finding, reported by the checks
                side.log.error = f"step {step}: {type(exc).__name__}: {exc}"
                break
    unchanged_ref = frozenset(reference_disk_name(case, k) for k, v in ref.named_parameters() if torch.equal(v.detach(), initial_ref[k]))
    return SFTRun(cfg, sides["cand"].log, sides["ref"].log, cand.eval(), ref.eval(), initial, unchanged_ref, not_in_optimizer,
                  time.perf_counter() - start)
