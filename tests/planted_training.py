"""Deliberately broken training code or candidates for the `router_grad` and `sft` suites.

``build(bug)`` returns a built-in arch's spec with exactly one training bug planted, under the
name ``<arch>_<bug>``: in the candidate model (a detached router, a correction bias that
receives gradient, router logits returned after softmax, a shared expert cut from the graph) or
in the team's training code it declares through ``ArchSpec.training`` (aux loss counting
padding, a wrong z-loss, an optimizer missing the experts, an LR schedule off by a factor), or
in its bf16 cast (a router detached in the bf16 path only), or in both (bf16 router logits that
the aux or z-loss takes without upcasting), or in its export (a bf16 model's fp32 tensors
written rounded).
"""

from __future__ import annotations

import dataclasses
import types

import torch

from moe_conformance import training
from moe_conformance.contract import default_cast
from moe_conformance.native.model import MoE, Router
from planted import WrappedConverter, _each, _patched, base_spec


def _wrap_router(model, post):
    """Replace each Router's forward by ``post(router, *original outputs)``."""

    def patch(r):
        original = r.forward
        r.forward = lambda x, r=r, original=original: post(r, *original(x))

    _each(model, Router, patch)


def _router_detached(model):
    # routing weights computed from a detached copy of the scores: the LM loss never reaches the gate
    _wrap_router(model, lambda r, logits, weights, indices: (logits, weights.detach(), indices))


def _bias_receives_gradient(model):
    # the correction bias made a Parameter and leaked into the weights straight-through: the
    # forward is unchanged (logits match) but the bias gets gradient and would be trained
    def patch(r):
        bias = r._buffers.pop("expert_bias")
        r.expert_bias = torch.nn.Parameter(bias.clone())
        r._apply = types.MethodType(torch.nn.Module._apply, r)
        original = r.forward

        def forward(x, r=r, original=original):
            logits, weights, indices = original(x)
            leak = (r.expert_bias - r.expert_bias.detach())[indices]
            return logits, weights + leak, indices

        r.forward = forward

    _each(model, Router, patch)


def _router_logits_after_softmax(model):
    # the router hands back probabilities as its logits: the aux loss then sees softmax(softmax(x))
    _wrap_router(model, lambda r, logits, weights, indices: (logits.softmax(-1), weights, indices))


def _shared_expert_detached(model):
    # the shared expert's output is cut from the graph: it computes, but never trains
    _each(model, MoE, lambda m: m.shared_experts.register_forward_hook(lambda mod, args, out: out.detach())
          if hasattr(m, "shared_experts") else None)


def _aux_ignores_mask(router_logits, top_k, attention_mask=None):
    return training.aux_loss(router_logits, top_k, None)  # the bug: padding rows counted


def _z_squared_after_mean(router_logits, attention_mask=None):
    keep = attention_mask.reshape(-1).bool() if attention_mask is not None else slice(None)
    rows = torch.cat([logits[keep] for logits in router_logits])
    return rows.float().logsumexp(-1).mean() ** 2  # the bug: square of the mean, not mean of squares


def _optimizer_without_experts(model, cfg):
    params = [p for n, p in model.named_parameters() if ".experts." not in n]  # the bug: experts left out
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)


def _lr_doubled(step, cfg):
    return 2.0 * training.lr_at(step, cfg)  # the bug: peak LR read from the wrong field (x2)


def _cast_detaching_router_in_bf16(model, dtype, keep_fp32=frozenset()):
    # a bf16 fast path whose routing weights come from a kernel without a backward: fp32 trains
    # fine; cast to bf16, as production trains, the router gets no gradient
    model = default_cast(model, dtype, keep_fp32)
    if dtype != torch.float32:
        _router_detached(model)
    return model


def _cast_taking_the_bias_along(model, dtype, keep_fp32=frozenset()):
    # a cast that takes the selection bias along into bf16 (past the native Router's own fp32
    # guard): every aux-loss-free update to it is rounded
    model = default_cast(model, dtype, keep_fp32)

    def unguard(r):
        r._apply = types.MethodType(torch.nn.Module._apply, r)
        r._buffers["expert_bias"] = r.expert_bias.to(dtype)

    _each(model, Router, unguard)
    return model


def _adamw_on_bf16_weights(model, cfg):
    # plain AdamW straight on the bf16 parameters: no fp32 master copy, so an update under half a
    # weight's bf16 spacing is lost
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=False)


def _cast_handing_out_bf16_logits(model, dtype, keep_fp32=frozenset()):
    # a router whose logits come out in the compute dtype (as transformers' Mixtral's do): not a
    # bug alone, but what the aux and z-loss below then take as they come
    model = default_cast(model, dtype, keep_fp32)
    if dtype != torch.float32:
        _wrap_router(model, lambda r, logits, weights, indices: (logits.to(dtype), weights, indices))
    return model


def _aux_in_logits_dtype(router_logits, top_k, attention_mask=None):
    # the bug: no upcast, so softmax, counts and sums run in bf16 under the bf16 profile
    dt, E = router_logits[0].dtype, router_logits[0].shape[-1]
    keep = attention_mask.reshape(-1).bool() if attention_mask is not None else slice(None)
    rows = [logits[keep] for logits in router_logits]
    counts = sum(torch.zeros(E, dtype=dt).scatter_add_(0, r.softmax(-1).topk(top_k, -1).indices.reshape(-1),
                                                       torch.ones(r.shape[0] * top_k, dtype=dt)) for r in rows)
    probs = sum(r.softmax(-1).sum(0) for r in rows)
    n = sum(r.shape[0] for r in rows)
    return E * (counts / n * probs / n).sum()


def _z_in_logits_dtype(router_logits, attention_mask=None):
    keep = attention_mask.reshape(-1).bool() if attention_mask is not None else slice(None)
    rows = torch.cat([logits[keep] for logits in router_logits])
    return rows.logsumexp(-1).pow(2).mean()  # the bug: no upcast, logsumexp and mean in bf16


def _bf16_logits_and(**kw):
    return lambda s: s.replace(cast=_cast_handing_out_bf16_logits, training=training.TrainingHooks(**kw))


def _export_in_compute_dtype(conv):
    """to_hf writes every tensor in the dtype most of the model holds: a bf16-trained model's
    fp32 router weights go to disk rounded (fp32 training exports exactly)."""

    def to_hf(sd):
        out = conv.to_hf(sd)
        dtypes = [v.dtype for v in out.values() if v.is_floating_point()]
        compute = max(set(dtypes), key=dtypes.count)
        return {k: (v.to(compute) if v.is_floating_point() else v) for k, v in out.items()}

    return WrappedConverter(conv, to_hf=to_hf)


def _hooks(**kw):
    return lambda s: s.replace(training=training.TrainingHooks(**kw))


BUGS = {
    "router_detached": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _router_detached))),
    "bias_receives_gradient": ("glm4_moe", lambda s: s.replace(candidate=_patched(s, _bias_receives_gradient))),
    "aux_softmax_of_softmax": ("mixtral", lambda s: s.replace(candidate=_patched(s, _router_logits_after_softmax))),
    "aux_counts_padding": ("mixtral", _hooks(aux_loss=_aux_ignores_mask)),
    "z_loss_wrong": ("kimi_k25", _hooks(z_loss=_z_squared_after_mean)),
    "optimizer_missing_experts": ("glm4_moe", _hooks(optimizer=_optimizer_without_experts)),
    "lr_schedule_off": ("kimi_k25", _hooks(lr_at=_lr_doubled)),
    "shared_expert_frozen": ("glm4_moe", lambda s: s.replace(candidate=_patched(s, _shared_expert_detached))),
    "router_detached_in_bf16": ("kimi_k25", lambda s: s.replace(cast=_cast_detaching_router_in_bf16)),
    "bias_cast_to_bf16": ("kimi_k25", lambda s: s.replace(cast=_cast_taking_the_bias_along)),
    "optimizer_without_master_weights": ("glm4_moe", _hooks(optimizer=_adamw_on_bf16_weights)),
    "export_in_compute_dtype": ("kimi_k25", lambda s: s.replace(converter=_export_in_compute_dtype(s.converter))),
    "aux_loss_in_bf16": ("mixtral", _bf16_logits_and(aux_loss=_aux_in_logits_dtype)),
    "z_loss_in_bf16": ("kimi_k25", _bf16_logits_and(z_loss=_z_in_logits_dtype)),
}


def build(bug: str):
    arch, breaks = BUGS[bug]
    spec = breaks(base_spec(arch))
    return dataclasses.replace(spec, name=f"{arch}_{bug}")
