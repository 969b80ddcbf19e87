"""The remaining planted bugs: one for every check that no other planted file makes fail (the
index in tests/test_every_check_can_fail.py lists which bug proves which check).

``build(bug)`` returns a built-in arch's spec with exactly one bug planted, under the name
``<arch>_<bug>``: in the candidate (an expert cut from the graph, a router whose backward is
wrong while its forward is right, router jitter left on in training, NaN gradients), in the
converter (an export that serves a cached tensor, a scaled head on export), in the team's
training code (a bias update of the wrong sign, an optimizer that never steps), in the reference
the plugin declares (one more module kept in fp32, with a cast that ignores it), or in an inert
config (a router that ignores its input).
"""

from __future__ import annotations

import dataclasses
import types

import torch

from moe_conformance import training
from moe_conformance.native.model import Experts, MoE, Router
from planted import WrappedConverter, _each, _faithful_with, _patched, base_spec


# ---- candidate bugs


def _expert_zero_detached(model):
    # expert 0's output reaches the layer, but cut from the graph: it computes and never trains
    def forward(self, x_TH, indices_TK, weights_TK, original):
        out = original(x_TH, indices_TK, weights_TK)
        mask = (indices_TK == 0).any(-1, keepdim=True).to(out.dtype)
        return out * (1 - mask) + out.detach() * mask

    _each(model, Experts, lambda m: setattr(m, "forward", types.MethodType(
        lambda self, x, i, w, original=m.forward: forward(self, x, i, w, original), m)))


class _HalfGradient(torch.autograd.Function):
    """Identity forward, half the gradient back: the loss is right, the router's gradient is not
    (what an un-summed or double-averaged gradient under parallelism looks like)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 0.5


def _router_gradient_halved(model):
    # the routing weights the router hands on carry half their gradient back
    def halve(mod, args, out):
        logits, weights, indices = out
        return logits, _HalfGradient.apply(weights), indices

    _each(model, Router, lambda r: r.register_forward_hook(halve))


def _router_jitter_in_training(model):
    # multiplicative noise on the router input in training mode (off in eval): logits match,
    # training does not follow the reference
    def pre(module, args):
        (x,) = args
        if module.training:
            return (x * (1 + 0.05 * torch.randn_like(x)),)
        return None

    _each(model, Router, lambda r: r.register_forward_pre_hook(pre))


def _nan_gradients(model):
    model.output.register_full_backward_hook(lambda mod, grad_in, grad_out: (torch.full_like(grad_in[0], float("nan")),))


# ---- converter bugs


def _stale_export(conv):
    """to_hf serves the tensor it read for the embeddings instead of the candidate's current one
    (an export cache never invalidated): the file roundtrip is exact, trained weights are lost."""
    cache = {}

    def to_candidate(sd):
        for k, v in sd.items():
            if k.endswith("embed_tokens.weight"):
                cache[k] = v.clone()
        return conv.to_candidate(sd)

    def to_hf(sd):
        out = conv.to_hf(sd)
        return {k: (cache[k].clone() if k in cache else v) for k, v in out.items()}

    wrapped = WrappedConverter(conv, to_hf=to_hf)
    wrapped.to_candidate = to_candidate
    return wrapped


def _scaled_head_export(conv):
    # the exported lm_head is scaled (a tied/untied confusion on export): engines that load the
    # export disagree with the trainer
    return WrappedConverter(conv, to_hf=lambda sd: {k: (v * 1.05 if k.endswith("lm_head.weight") else v)
                                                    for k, v in conv.to_hf(sd).items()})


# ---- training-code bugs


def _bias_update_reversed(bias, load, rate):
    bias.add_(rate * torch.sign(load.to(bias) - load.to(bias).mean()))  # the bug: toward the overloaded experts


class _NoStep(torch.optim.AdamW):
    def step(self, closure=None):  # the bug: the optimizer never applies its update
        return None


def _optimizer_never_steps(model, cfg):
    return _NoStep([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, foreach=False)


# ---- the reference the plugin declares


def _reference_keeps_norm_fp32(spec):
    """A reference class that keeps one more module in fp32 (kv_a_layernorm) in low precision."""
    base = spec.reference

    def build(config):
        model = base(config)
        cls = type(model)
        sub = type(f"{cls.__name__}KeepsNormFp32", (cls,), {
            "_keep_in_fp32_modules_strict": [*(getattr(cls, "_keep_in_fp32_modules_strict", None) or []), "kv_a_layernorm"]})
        model.__class__ = sub
        return model

    build.describes = "DeepseekV3ForCausalLM keeping kv_a_layernorm in fp32"
    return build


def _cast_ignoring_fp32(model, dtype, keep_fp32=frozenset()):
    return model.to(dtype)  # the bug: the candidate's bf16 path rounds what the reference keeps in fp32


BUGS = {
    "expert_detached": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _expert_zero_detached))),
    "router_grad_halved": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _router_gradient_halved))),
    "router_jitter_training": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _router_jitter_in_training))),
    "nan_gradients": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _nan_gradients))),
    "stale_export": ("kimi_k25", lambda s: s.replace(converter=_stale_export(s.converter))),
    "scaled_head_export": ("glm4_moe", lambda s: s.replace(converter=_scaled_head_export(s.converter))),
    "bias_update_reversed": ("kimi_k25", lambda s: s.replace(training=training.TrainingHooks(bias_update=_bias_update_reversed))),
    "optimizer_never_steps": ("kimi_k25", lambda s: s.replace(training=training.TrainingHooks(optimizer=_optimizer_never_steps))),
    "reference_fp32_norm_cast_ignores_it": ("kimi_k25", lambda s: s.replace(reference=_reference_keeps_norm_fp32(s),
                                                                            cast=_cast_ignoring_fp32)),
    # the control: the same reference, the default cast follows its precision rule
    "reference_fp32_norm": ("kimi_k25", lambda s: s.replace(reference=_reference_keeps_norm_fp32(s))),
    "router_ignores_input": ("kimi_k25", lambda s: _faithful_with(s, gains={"mlp.gate.weight": 0.0})),
    "save_naming_unexcused": ("kimi_k25", lambda s: s.replace(expected_failures=())),
}


def build(bug: str):
    arch, breaks = BUGS[bug]
    return dataclasses.replace(breaks(base_spec(arch)), name=f"{arch}_{bug}")
