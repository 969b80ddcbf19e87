"""Contract violations, each planted in a copy of a built-in: the candidate computes the right
thing, but breaks one convention of the written contract (or its plugin declares a probe that
does not fit). Each must fail exactly its contract check, naming the convention, and block what
depends on it instead of cascading into numeric failures."""

from __future__ import annotations

import dataclasses
import types

import torch

from moe_conformance import ExpertsProbe, ModulePair, Probes
from moe_conformance.native.model import MoE, Router
from planted import _each, _patched, base_spec


def _router_returns_two(model):
    # the router returns (weights, indices) and the MoE block consumes that: correct logits, but
    # not the (router_logits, topk_weights, topk_indices) the declared (default) probe reads
    def router_forward(self, x, original=None):
        logits, weights, indices = original(x)
        return weights, indices

    def moe_forward(self, x):
        x_TH = x.reshape(-1, x.shape[-1])
        weights, indices = self.router(x_TH)
        out = self.experts(x_TH, indices, weights)
        if hasattr(self, "shared_experts"):
            out = out + self.shared_experts(x_TH)
        return out.view_as(x), None

    _each(model, Router, lambda r: setattr(r, "forward", types.MethodType(
        lambda self, x, original=r.forward: router_forward(self, x, original), r)))
    _each(model, MoE, lambda m: setattr(m, "forward", types.MethodType(moe_forward, m)))


def _stashed_tensor(model):
    # a non-leaf tensor kept on a module (a cached scaled weight): deepcopy refuses it
    _each(model, Router, lambda r: setattr(r, "scaled_gate", r.gate.weight * 1.0))


def _dropout_left_on(model):
    def moe_forward(self, x, original):
        out, logits = original(x)
        return torch.nn.functional.dropout(out, 0.1, training=True), logits

    _each(model, MoE, lambda m: setattr(m, "forward", types.MethodType(
        lambda self, x, original=m.forward: moe_forward(self, x, original), m)))


def _experts_args_swapped(spec):
    # the plugin says its experts take (x, weights, indices): the native experts take (x, indices, weights)
    return dataclasses.replace(spec.probes, experts=ExpertsProbe(call=lambda m, x, idx, w: m(x, w, idx)))


def _pairs_misnamed(spec):
    return dataclasses.replace(spec.probes, pairs=tuple(
        ModulePair(p.ref, p.cand.replace(".moe.router", ".moe.gate"), p.role) for p in spec.probes.pairs))


# violation -> (built-in arch, how the spec is broken, the contract check that must fail, fragments)
VIOLATIONS = {
    "router_returns_two": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _router_returns_two)),
                           "test_contract_routing_probe",
                           ["router output is 2 values, expected 3 (router_logits, topk_weights, topk_indices)"]),
    "experts_args_swapped": ("kimi_k25", lambda s: s.replace(probes=_experts_args_swapped(s)),
                             "test_contract_experts_probe",
                             ["ExpertsProbe.call(layers.1.moe.experts, x [T, H], indices [T, K], weights [T, K]) raised"]),
    "pairs_misnamed": ("kimi_k25", lambda s: s.replace(probes=_pairs_misnamed(s)), "test_contract_module_pairs",
                       ["reference module(s) have no candidate module", "layers.1.moe.gate"]),
    "stashed_tensor": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _stashed_tensor)), "test_contract_state",
                       ["copy.deepcopy(candidate) raised", "keep state in parameters and buffers"]),
    "dropout_left_on": ("kimi_k25", lambda s: s.replace(candidate=_patched(s, _dropout_left_on)),
                        "test_contract_deterministic",
                        ["two eval-mode forwards on the same input differ", "dropout"]),
}


def build(violation: str):
    arch, breaks, _, _ = VIOLATIONS[violation]
    return dataclasses.replace(breaks(base_spec(arch)), name=f"{arch}_{violation}")
