"""Run a kernel subject's experts inside a transformers model: an experts implementation
registered in transformers' ``ALL_EXPERTS_FUNCTIONS``, so ``config._experts_implementation = NAME``
makes every experts module of a reference model dispatch to the kernels under test.

transformers keeps most archs' experts fused in memory: ``gate_up_proj`` [E, 2I, H] (gate rows,
then up rows) and ``down_proj`` [E, H, I]. Layouts the kernels do not compute (transposed,
interleaved or biased experts, e.g. gpt-oss; activations other than SiLU) raise, naming why.
"""

from __future__ import annotations

from functools import partial

import torch

from .subjects import KernelSubject, resolve

NAME = "moe_conformance_{backend}"


class UnsupportedExperts(NotImplementedError):
    pass


def supports(experts: torch.nn.Module) -> str | None:
    """None if the kernels can compute this transformers experts module, else why not."""
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        return f"{type(experts).__name__} stores experts transposed or interleaved"
    if getattr(experts, "has_bias", False):
        return f"{type(experts).__name__} has expert biases"
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if act != "silu":
        return f"{type(experts).__name__} uses {act}, the kernels compute SwiGLU (silu)"
    return None


def _forward(self, hidden_states, top_k_index, top_k_weights, *, subject: KernelSubject):
    why = supports(self)
    if why:
        raise UnsupportedExperts(why)
    weights = top_k_weights.to(hidden_states.dtype)
    if subject.fused_moe is not None and subject.experts is None:
        return subject.fused_moe(hidden_states, self.gate_up_proj, self.down_proj, weights, top_k_index)
    intermediate = self.gate_up_proj.shape[1] // 2
    w_gate, w_up = self.gate_up_proj[:, :intermediate], self.gate_up_proj[:, intermediate:]
    return subject.experts(hidden_states, top_k_index, weights, w_gate, w_up, self.down_proj)


def register(kernels: str | KernelSubject = "triton") -> str:
    """Register a subject's experts as a transformers experts implementation; returns the name
    to put in ``config._experts_implementation``."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    subject = resolve(kernels)
    name = NAME.format(backend=subject.name)
    ALL_EXPERTS_FUNCTIONS.register(name, partial(_forward, subject=subject))
    return name
