"""Deliberately broken arch specs: each plants one bug class from BUGS.md into a built-in arch.

``build(bug)`` returns the ArchSpec of a built-in arch with its candidate or converter broken in
exactly one way, under the name ``<arch>_<bug>``. The project's own tests run the suites on these
through ``--arch-plugin`` and assert that the right check fails with a message naming the fault.
"""

from __future__ import annotations

import dataclasses
import types

import torch

from moe_conformance.convert import KeyMapConverter, StackExperts
from moe_conformance.convert import Transform
from moe_conformance.native import MoETransformer, native_candidate
from moe_conformance.native.model import MoE, GQAttention, MLAttention, RMSNorm, Router
from moe_conformance.registry import discover


def base_spec(arch: str):
    known, _ = discover()
    return known[arch].load()


def _native(spec, overrides):
    """The built-in candidate with config overrides (a bug in the team's config reading)."""
    options = dict(spec.candidate.options)

    def build(config):
        extra = overrides(spec.model_config(config))
        return native_candidate(**{**options, **extra})(config)

    return build


def _patched(spec, patch):
    """The built-in candidate, then ``patch(model)`` applied to the instance."""

    def build(config):
        model = spec.candidate(config)
        patch(model)
        return model

    return build


def _each(model, cls, fn):
    for module in model.modules():
        if isinstance(module, cls):
            fn(module)


# ---- router bugs (forward replaced on each Router instance)


def _router_forward(selection_bias: bool = True, bias_in_weights: bool = False):
    def forward(self, x_TH):
        cfg = self.cfg
        logits = torch.nn.functional.linear(x_TH.float(), self.gate.weight.float())
        scores = logits.sigmoid()
        choice = scores + self.expert_bias if selection_bias else scores
        if cfg.n_group > 1:
            grouped = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
            keep = torch.zeros(grouped.shape[:2], dtype=torch.bool)
            keep.scatter_(1, grouped.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(cfg.num_experts // cfg.n_group, 1), float("-inf"))
        indices = choice.topk(cfg.top_k, dim=-1).indices
        weights = (scores + self.expert_bias if bias_in_weights else scores).gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights * cfg.routed_scaling_factor, indices

    return forward


def _set_router_forward(**kw):
    return lambda model: _each(model, Router, lambda r: setattr(r, "forward", types.MethodType(_router_forward(**kw), r)))


def _bias_in_bf16(model):
    # The bias buffer stored in bf16 (e.g. cast with the rest of the model): loading rounds it.
    _each(model, Router, lambda r: r._buffers.__setitem__("expert_bias", r.expert_bias.to(torch.bfloat16)))


def _yarn_mscale_missing(model):
    for module in model.modules():
        if isinstance(module, (GQAttention, MLAttention)):
            cfg = module.cfg
            qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim
            module.softmax_scale = qk**-0.5


def _position_ids_positional(model):
    def forward(input_ids, attention_mask=None, position_ids=None):
        return MoETransformer.forward(model, input_ids, position_ids)  # the bug: positional

    model.forward = forward


def _returns_nan(model):
    model.output.register_forward_hook(lambda m, args, out: out.index_fill(1, torch.tensor([3]), float("nan")))


def _raises(model):
    def forward(*args, **kwargs):
        raise RuntimeError("planted: grouped GEMM launch failed")

    model.forward = forward


def _sinks_dropped(model):
    def forward(self, *args):
        sinks = self._parameters.pop("sinks")  # the bug: attention runs without its sinks
        try:
            return GQAttention.forward(self, *args)
        finally:
            self._parameters["sinks"] = sinks

    _each(model, GQAttention, lambda m: setattr(m, "forward", types.MethodType(forward, m)))


def _shared_gate_without_sigmoid(model):
    def forward(self, x):
        x_TH = x.reshape(-1, x.shape[-1])
        logits, weights, indices = self.router(x_TH)
        out = self.experts(x_TH, indices, weights) + self.shared_gate(x_TH) * self.shared_experts(x_TH)
        return out.view_as(x), logits

    _each(model, MoE, lambda m: setattr(m, "forward", types.MethodType(forward, m)))


class _NormNotApplied(RMSNorm):
    def forward(self, x):
        return x


def _qk_norm_skipped(model):
    for module in list(model.modules()):
        if isinstance(module, GQAttention) and hasattr(module, "q_norm"):
            module.q_norm = _NormNotApplied(module.q_norm.weight.shape[0], module.q_norm.eps)
            module.k_norm = _NormNotApplied(module.k_norm.weight.shape[0], module.k_norm.eps)


# ---- converter bugs


class WrappedConverter:
    """A converter that delegates everything to ``base`` except what a bug overrides."""

    def __init__(self, base, to_candidate=None, to_hf=None):
        self.base = base
        self._to_candidate, self._to_hf = to_candidate, to_hf

    def __getattr__(self, name):
        return getattr(self.base, name)

    def to_candidate(self, sd):
        out = self.base.to_candidate(sd)
        return self._to_candidate(out) if self._to_candidate else out

    def to_hf(self, sd):
        sd = dict(sd)
        if self._to_hf:
            return self._to_hf(sd)
        return self.base.to_hf(sd)


def _roll_experts(shift):
    return lambda sd: {k: (v.roll(shift, dims=0) if ".moe.experts." in k else v) for k, v in sd.items()}


def _gate_up_swapped(conv: KeyMapConverter) -> KeyMapConverter:
    swap = {".w1": ".w3", ".w3": ".w1"}

    def fix(rule):
        if isinstance(rule, StackExperts) and rule.cand[-3:] in swap:
            return StackExperts(rule.hf, rule.cand[:-3] + swap[rule.cand[-3:]])
        return rule

    return KeyMapConverter([fix(r) for r in conv.rules], modules=conv.modules, disk_prefix=conv.disk_prefix,
                           misreadings=conv.misreadings)


def _interleave_misread(conv: KeyMapConverter) -> KeyMapConverter:
    """gpt-oss's fused gate_up_proj (and its bias) read as [gate | up] halves, both directions."""
    def halves(t):
        half = t.shape[1] // 2
        return t[:, :half].contiguous(), t[:, half:].contiguous()

    def fix(rule):
        if isinstance(rule, Transform) and rule.hf.endswith("experts.gate_up_proj"):
            return Transform(rule.hf, rule.cands, lambda t: halves(t.transpose(-1, -2)),
                             lambda g, u: torch.cat((g, u), dim=1).transpose(-1, -2).contiguous())
        if isinstance(rule, Transform) and rule.hf.endswith("experts.gate_up_proj_bias"):
            return Transform(rule.hf, rule.cands, halves, lambda g, u: torch.cat((g, u), dim=1))
        return rule

    return KeyMapConverter([fix(r) for r in conv.rules], modules=conv.modules, disk_prefix=conv.disk_prefix,
                           misreadings=conv.misreadings)


def _permuted(conv):
    return WrappedConverter(conv, to_candidate=_roll_experts(1),
                            to_hf=lambda sd: conv.to_hf(_roll_experts(-1)(sd)))


def _drops_bias(conv):
    return WrappedConverter(conv, to_hf=lambda sd: {k: v for k, v in conv.to_hf(sd).items()
                                                     if not k.endswith("e_score_correction_bias")})


def _extra_key(conv):
    def to_hf(sd):
        out = conv.to_hf(sd)
        out[conv.disk_prefix + "model.layers.1.mlp.gate.bias"] = torch.zeros(3)
        return out

    return WrappedConverter(conv, to_hf=to_hf)


# ---- inert tiny configs (what the tiny_config suite exists to refuse)


def _faithful_with(spec, exercises=None, gains=None, **config_changes):
    """The arch's faithful variant with config fields changed, other claims or init gains."""
    base = spec.variant("faithful")

    def config():
        cfg = base.config()
        for name, value in config_changes.items():
            setattr(cfg, name, value)
        return cfg

    variant = dataclasses.replace(base, config=config, exercises=frozenset(exercises or base.exercises))
    return spec.replace(variants=(variant,), init_gains={**spec.init_gains, **(gains or {})})


# bug name -> (built-in arch, how the spec is broken)
BUGS = {
    "gate_up_swapped": ("glm4_moe", lambda s: s.replace(converter=_gate_up_swapped(s.converter))),
    "experts_permuted": ("glm4_moe", lambda s: s.replace(converter=_permuted(s.converter))),
    "key_dropped": ("kimi_k25", lambda s: s.replace(converter=_drops_bias(s.converter))),
    "extra_key": ("kimi_k25", lambda s: s.replace(converter=_extra_key(s.converter))),
    "bias_ignored": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _set_router_forward(selection_bias=False)))),
    "bias_bf16": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _bias_in_bf16))),
    "bias_in_weights": ("glm4_moe", lambda s: s.replace(candidate=_patched(s, _set_router_forward(bias_in_weights=True)))),
    "norm_topk_flipped": ("kimi_k25", lambda s: s.replace(candidate=_native(s, lambda hf: {"norm_topk_prob": not hf.norm_topk_prob}))),
    "scaling_dropped": ("kimi_k25", lambda s: s.replace(candidate=_native(s, lambda hf: {"routed_scaling_factor": 1.0}))),
    "group_limit_bypassed": ("glm4_moe", lambda s: s.replace(candidate=_native(s, lambda hf: {"n_group": 1, "topk_group": 1}))),
    "rope_interleave_flipped": ("kimi_k25", lambda s: s.replace(candidate=_native(s, lambda hf: {"rope_interleave": not hf.rope_interleave}))),
    "partial_rotary_ignored": ("glm4_moe", lambda s: s.replace(candidate=_native(s, lambda hf: {"rotary_dim": hf.head_dim}))),
    "yarn_mscale_missing": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _yarn_mscale_missing))),
    "wrong_norm_eps": ("glm4_moe", lambda s: s.replace(candidate=_native(s, lambda hf: {"norm_eps": 1e-6}))),
    "position_ids_positional": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _position_ids_positional))),
    "returns_nan": ("glm4_moe", lambda s: s.replace(candidate=_patched(s, _returns_nan))),
    "raises": ("glm4_moe", lambda s: s.replace(candidate=_patched(s, _raises))),
    # architecture-specific features (issue: architecture coverage)
    "sinks_dropped": ("gpt_oss", lambda s: s.replace(candidate=_patched(s, _sinks_dropped))),
    "sliding_window_ignored": ("gpt_oss", lambda s: s.replace(candidate=_native(s, lambda hf: {"windows": ()}))),
    "clamp_removed": ("gpt_oss", lambda s: s.replace(candidate=_native(s, lambda hf: {"swiglu_limit": 1e9}))),
    "interleave_misread": ("gpt_oss", lambda s: s.replace(converter=_interleave_misread(s.converter))),
    "shared_gate_sigmoid_dropped": ("qwen2_moe", lambda s: s.replace(candidate=_patched(s, _shared_gate_without_sigmoid))),
    "qk_norm_skipped": ("qwen3_moe", lambda s: s.replace(candidate=_patched(s, _qk_norm_skipped))),
    "softmax_norm_topk_flipped": ("qwen3_moe", lambda s: s.replace(candidate=_native(s, lambda hf: {"norm_topk_prob": not hf.norm_topk_prob}))),
    # inert tiny configs
    "sizes_clash": ("glm4_moe", lambda s: _faithful_with(s, intermediate_size=64)),
    "topk_all_experts": ("glm4_moe", lambda s: _faithful_with(s, num_experts_per_tok=12)),
    "flat_logits": ("glm4_moe", lambda s: _faithful_with(s, gains={"lm_head.weight": 0.01})),
    "router_constant": ("glm4_moe", lambda s: _faithful_with(s, gains={"mlp.gate.weight": 0.0,
                                                                       "e_score_correction_bias": 0.0})),
    "claimed_feature_inert": ("glm4_moe", lambda s: _faithful_with(s, exercises=s.variant("faithful").exercises
                                                                   | {"group_limit"})),
    "yarn_mscale_all_dim_ignored": ("deepseek_v3", lambda s: s.replace(candidate=_native(
        s, lambda hf: {"yarn": dataclasses.replace(_yarn(hf), mscale_all_dim=None)}))),
}


def _yarn(hf):
    from moe_conformance.native import from_hf

    return from_hf(hf, attention="mla", router_scoring="sigmoid").yarn


def build(bug: str):
    arch, breaks = BUGS[bug]
    spec = breaks(base_spec(arch))
    return dataclasses.replace(spec, name=f"{arch}_{bug}")
