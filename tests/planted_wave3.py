"""The bugs teams ship (BUGS.md wave 2 and the classes no other planted file covers), each planted
in a copy of a built-in arch: ``build(bug)`` returns the spec with exactly one bug, under the
name ``<arch>_<bug>``. tests/test_wave3_bugs.py runs the suites on them and names the check that
must fail; docs/bug_classes.md maps every BUGS.md class to its planted test.
"""

from __future__ import annotations

import dataclasses
import re
import types

import torch
import torch.nn.functional as F

from moe_conformance import merging, training, upcycling
from moe_conformance.contract import Decoding
from moe_conformance.convert import KeyMapConverter, Rename, Tied, Transform
from moe_conformance.native import KVCache
from moe_conformance.native.model import MoETransformer, Router
from planted import _each, _native, _patched, base_spec


class ConfigConverter:
    """The arch's converter with one direction changed; the config passed through."""

    def __init__(self, base, to_candidate=None, to_hf=None):
        self.base, self._to_candidate, self._to_hf = base, to_candidate, to_hf

    def __getattr__(self, name):
        return getattr(self.base, name)

    def to_candidate(self, sd, config=None):
        if self._to_candidate:
            return self._to_candidate(sd, config)
        return self.base.to_candidate(sd, config)

    def to_hf(self, sd, config=None):
        if self._to_hf:
            return self._to_hf(sd, config)
        return self.base.to_hf(sd, config)


def _rules(conv, fix) -> KeyMapConverter:
    return KeyMapConverter([fix(r) for r in conv.rules], modules=conv.modules, disk_prefix=conv.disk_prefix,
                           misreadings=conv.misreadings, concat_sizes=conv.concat_sizes)


def _layer(key: str) -> int | None:
    m = re.search(r"\blayers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


# ---- routing (BUGS #6, #7, #8, #36, #37, #46)


def _router(mask_value: float = float("-inf"), math_dtype: torch.dtype = torch.float32):
    """The native router's forward, with the masked value of dropped groups and the dtype of
    its math as parameters (the bugs: 0 instead of -inf, bf16 instead of fp32)."""

    def forward(self, x_TH):
        cfg = self.cfg
        logits = F.linear(x_TH.to(math_dtype), self.gate.weight.to(math_dtype))
        scores = logits.sigmoid() if cfg.router_scoring == "sigmoid" else logits.softmax(-1)
        choice = scores + self.expert_bias.to(math_dtype) if cfg.correction_bias else scores
        if cfg.n_group > 1:
            grouped = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
            keep = torch.zeros(grouped.shape[:2], dtype=torch.bool)
            keep.scatter_(1, grouped.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(cfg.num_experts // cfg.n_group, 1), mask_value)
        indices = choice.topk(cfg.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits.float(), (weights * cfg.routed_scaling_factor).float(), indices

    return lambda model: _each(model, Router, lambda r: setattr(r, "forward", types.MethodType(forward, r)))


# ---- layout (BUGS #14, #40, #41): a reader that infers gpt-oss's fused layout from shapes


def _guess_gate_up(t):  # [E, H, 2I] on disk; "the fused dim is the longer one", else in-memory [E, 2I, H]
    t = t if t.shape[1] == t.shape[2] else t.transpose(-1, -2) if t.shape[2] > t.shape[1] else t
    return t[:, 0::2].contiguous(), t[:, 1::2].contiguous()


def _guess_gate_up_join(gate, up):
    fused = torch.stack((gate, up), dim=2).flatten(1, 2)  # [E, 2I, H]
    return (fused if fused.shape[1] == fused.shape[2] else fused.transpose(-1, -2)).contiguous()


def _guess_down(t):  # [E, I, H] on disk: "transposed if the first dim is the shorter", else [E, H, I]
    return ((t.transpose(-1, -2) if t.shape[1] < t.shape[2] else t).contiguous(),)


def _guess_down_join(w2):  # [E, H, I] -> disk, by the same guess
    return (w2.transpose(-1, -2) if w2.shape[2] < w2.shape[1] else w2).contiguous()


def _layout_from_shapes(conv):
    def fix(rule):
        if isinstance(rule, Transform) and rule.hf.endswith("experts.gate_up_proj"):
            return Transform(rule.hf, rule.cands, _guess_gate_up, _guess_gate_up_join)
        if isinstance(rule, Transform) and rule.hf.endswith("experts.down_proj"):
            return Transform(rule.hf, rule.cands, _guess_down, _guess_down_join)
        return rule

    return _rules(conv, fix)


# ---- keys and buffers (BUGS #16, #19, #20, #34, #42)


def _shared_exported_as_zeros(conv):
    return ConfigConverter(conv, to_hf=lambda sd, cfg: {k: (torch.zeros_like(v) if "shared_experts.down_proj" in k else v)
                                                        for k, v in conv.to_hf(sd, cfg).items()})


def _bias_zeroed_after_load(model):
    # a re-initialization after loading (prime-rl #3333): the persistent routing bias reset
    def zero(module, keys):
        _each(module, Router, lambda r: r.expert_bias.zero_() if hasattr(r, "expert_bias") else None)

    model.register_load_state_dict_post_hook(zero)


def _bias_missing_on_import(conv):
    return ConfigConverter(conv, to_candidate=lambda sd, cfg: {k: v for k, v in conv.to_candidate(sd, cfg).items()
                                                                if not k.endswith("expert_bias")})


def _experts_collapsed_on_export(conv):
    # every expert written under expert 0's key: a consumer keeps one (Megatron-Bridge #5714)
    return ConfigConverter(conv, to_hf=lambda sd, cfg: {re.sub(r"\.experts\.\d+\.", ".experts.0.", k): v
                                                        for k, v in conv.to_hf(sd, cfg).items()})


# ---- MTP layers (BUGS #43)


def _mtp_skipped_on_import(conv):
    def to_candidate(sd, cfg):  # whole MTP layers skipped (AReaL #1403)
        n = cfg.num_hidden_layers
        return conv.to_candidate({k: v for k, v in sd.items() if (_layer(k) or 0) < n}, cfg)

    return ConfigConverter(conv, to_candidate=to_candidate)


def _mtp_one_layer_exported(conv):
    def to_hf(sd, cfg):  # the exporter assumes one MTP layer (Megatron-Bridge #5495)
        n = cfg.num_hidden_layers
        return {k: v for k, v in conv.to_hf(sd, cfg).items() if (_layer(k) or 0) <= n}

    return ConfigConverter(conv, to_hf=to_hf)


def _mtp_experts_grouped(conv):
    def to_hf(sd, cfg):  # MTP experts written grouped (fused) where the file keeps them per expert
        out, n = conv.to_hf(sd, cfg), cfg.num_hidden_layers
        fused: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for k in list(out):
            m = re.match(r"^(.*\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", k)
            if m and (_layer(k) or 0) >= n:
                fused.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = out.pop(k)
        for head, experts in fused.items():
            order = sorted(experts)
            out[head + "gate_up_proj"] = torch.stack([torch.cat((experts[e]["gate_proj"], experts[e]["up_proj"])) for e in order])
            out[head + "down_proj"] = torch.stack([experts[e]["down_proj"] for e in order])
        return out

    return ConfigConverter(conv, to_hf=to_hf)


# ---- tied embeddings (BUGS #20, #44)


def _tied_head_exported_twice(conv):
    def to_hf(sd, cfg):
        out = conv.to_hf(sd, cfg)
        out[conv.disk_prefix + "lm_head.weight"] = sd["tok_embeddings.weight"].clone()
        return out

    return ConfigConverter(conv, to_hf=to_hf)


def _tie_unaware(conv):
    return _rules(conv, lambda r: Rename(r.hf, r.cand) if isinstance(r, Tied) else r)


# ---- attention (BUGS #24, #26)


def _packed_documents_leak(model):
    def forward(input_ids, attention_mask=None, position_ids=None, cache=None):
        if attention_mask is None and cache is None:  # the bug: packed rows treated as one sequence
            attention_mask = torch.ones_like(input_ids)
        return MoETransformer.forward(model, input_ids, attention_mask, position_ids, cache)

    model.forward = forward


# ---- training code (BUGS #38, #39)


def _bias_update_counted_in_bf16(bias, load, rate):
    load = load.to(torch.bfloat16)  # the bug: token counts near 40k round by 256
    bias.add_(rate * torch.sign(load.mean() - load).to(bias.dtype))


def _aux_counted_twice(router_logits, top_k, attention_mask=None):
    return 2 * training.aux_loss(router_logits, top_k, attention_mask)  # added to a loss that already holds it


def _aux_detached(router_logits, top_k, attention_mask=None):
    return training.aux_loss(router_logits, top_k, attention_mask).detach()  # the autograd result discarded


# ---- KV cache (BUGS #48)


class Bf16Cache(KVCache):
    """Keeps the keys and values it appends in bf16 (a cache dtype left over from inference):
    decoding through it no longer computes what a full forward does."""

    def update(self, layer, k, v):
        return super().update(layer, k.to(torch.bfloat16).to(k.dtype), v.to(torch.bfloat16).to(v.dtype))


# ---- expert LoRA merges (BUGS #45)


def _merge_drops_fused(model):
    # the merge handles 2-D weights; the stacked (fused) experts' deltas are dropped
    for module in list(model.modules()):
        if torch.nn.utils.parametrize.is_parametrized(module):
            for attr in list(module.parametrizations):
                keep = getattr(module.parametrizations, attr).original.dim() == 2
                torch.nn.utils.parametrize.remove_parametrizations(module, attr, leave_parametrized=keep)
    return model


def _attach_experts_frozen(model, targets, rank, alpha):
    adapters = merging.attach_lora(model, targets, rank, alpha)
    for target, (A, B) in adapters.items():
        if target.role == "routed":
            A.requires_grad_(False)
            B.requires_grad_(False)
    return adapters


# ---- upcycling (F19)


def _upcycle_one_expert_transposed(dense, moe_config, template):
    out, config = upcycling.upcycle(dense, moe_config, template)
    key = next(k for k in sorted(out) if re.search(r"\.experts\.2\.down_proj\.weight$", k))
    out[key] = out[key].t().reshape(out[key].shape).contiguous()  # the bug: copied transposed into [H, I]
    return out, config


def _upcycle_scaling_left_on(dense, moe_config, template):
    out, config = upcycling.upcycle(dense, moe_config, template)
    config.routed_scaling_factor = moe_config.routed_scaling_factor  # the bug: the MoE's scaling kept
    return out, config


def _merging(**kw):
    return lambda s: s.replace(merging=merging.MergeHooks(**kw))


def _upcycle(fn):
    return lambda s: s.replace(upcycling=dataclasses.replace(s.upcycling, upcycle=fn))


def _hooks(**kw):
    return lambda s: s.replace(training=training.TrainingHooks(**kw))


def _converter(fn):
    return lambda s: s.replace(converter=fn(s.converter))


def _candidate(patch):
    return lambda s: s.replace(candidate=_patched(s, patch))


def _reads(fn):
    return lambda s: s.replace(candidate=_native(s, fn))


def _untraps(s):
    return s.replace(variants=tuple(dataclasses.replace(v, traps=frozenset()) for v in s.variants))


def _trap_that_does_not_hold(s):
    v = s.variant("square_experts")
    return s.replace(variants=(s.variant("faithful"), dataclasses.replace(v, config=s.variant("faithful").config)))


# bug -> (built-in arch, how the spec is broken)
BUGS = {
    # routing
    "scoring_softmax_for_sigmoid": ("glm4_moe", _reads(lambda hf: {"router_scoring": "softmax", "correction_bias": True})),
    "softmax_before_topk": ("gpt_oss", _reads(lambda hf: {"router_scoring": "softmax"})),
    "group_mask_zero": ("glm4_moe_lite", _candidate(_router(mask_value=0.0))),
    "router_math_bf16": ("kimi_k25", _candidate(_router(math_dtype=torch.bfloat16))),
    "scaling_applied_twice": ("kimi_k25", _reads(lambda hf: {"routed_scaling_factor": hf.routed_scaling_factor ** 2})),
    "top1_renormalized": ("qwen2_moe", _reads(lambda hf: {"norm_topk_prob": True})),
    # layout
    "layout_from_shapes": ("gpt_oss", _converter(_layout_from_shapes)),
    "square_gate_up_undeclared": ("gpt_oss", _untraps),
    "trap_declared_not_holding": ("gpt_oss", _trap_that_does_not_hold),
    # keys and buffers
    "shared_exported_as_zeros": ("glm4_moe", _converter(_shared_exported_as_zeros)),
    "bias_zeroed_after_load": ("kimi_k25", _candidate(_bias_zeroed_after_load)),
    "bias_missing_on_import": ("glm4_moe", _converter(_bias_missing_on_import)),
    "dense_layers_ignored": ("deepseek_v3", _reads(lambda hf: {"dense_layers": frozenset()})),
    "experts_collapsed_on_export": ("glm4_moe", _converter(_experts_collapsed_on_export)),
    # MTP layers
    "mtp_skipped": ("deepseek_v3", lambda s: s.replace(candidate=_native(s, lambda hf: {"mtp": False}),
                                                        converter=_mtp_skipped_on_import(s.converter))),
    "mtp_one_layer": ("deepseek_v3", _converter(_mtp_one_layer_exported)),
    "mtp_experts_grouped": ("glm4_moe", _converter(_mtp_experts_grouped)),
    # tied embeddings
    "head_tied_when_untied": ("kimi_k25", _reads(lambda hf: {"tie_embeddings": True})),
    "tied_head_exported_twice": ("ernie4_5_moe", _converter(_tied_head_exported_twice)),
    "tie_flag_ignored": ("ernie4_5_moe", lambda s: s.replace(candidate=_native(s, lambda hf: {"tie_embeddings": False}),
                                                             converter=_tie_unaware(s.converter))),
    # attention
    "window_off_by_one": ("mixtral", _reads(lambda hf: {"windows": ((hf.sliding_window + 1,) * hf.num_hidden_layers
                                                                    if hf.sliding_window else ())})),
    "packed_documents_leak": ("qwen3_moe", _candidate(_packed_documents_leak)),
    # training code
    "bias_update_bf16": ("kimi_k25", _hooks(bias_update=_bias_update_counted_in_bf16)),
    "aux_counted_twice": ("mixtral", _hooks(aux_loss=_aux_counted_twice)),
    "aux_detached": ("mixtral", _hooks(aux_loss=_aux_detached)),
    # decoding
    "kv_cache_bf16": ("kimi_k25", lambda s: s.replace(decoding=Decoding(new_cache=lambda model: Bf16Cache()))),
    # expert LoRA merges
    "lora_fused_dropped": ("glm4_moe", _merging(merge=_merge_drops_fused)),
    "lora_frozen": ("glm4_moe", _merging(attach=_attach_experts_frozen)),
    # upcycling
    "upcycle_expert_transposed": ("qwen3_moe", _upcycle(_upcycle_one_expert_transposed)),
    "upcycle_scaling_left_on": ("glm4_moe", _upcycle(_upcycle_scaling_left_on)),
}


def build(bug: str):
    arch, breaks = BUGS[bug]
    return dataclasses.replace(breaks(base_spec(arch)), name=f"{arch}_{bug}")
