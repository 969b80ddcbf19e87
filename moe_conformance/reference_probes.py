"""Probes for transformers classes that break transformers' own MoE conventions.

The suites read the reference through ``probing.REFERENCE_PROBES``: routers returning
``(router_logits, topk_weights, topk_indices)`` and experts called as ``experts(hidden, indices,
weights)``. A class that does otherwise is declared with ``ArchSpec(reference_probes=...)``:

- ``LLAMA4``: ``Llama4Router`` returns ``(scores [T, E], logits [T, E])``, the scores the sigmoid
  of the chosen logits and 0 elsewhere; ``Llama4TextExperts`` take every expert's copy of the
  input scaled by its score (``[E * T, H]``), so they are called one chosen expert at a time
  (weight 1) and weighted after: the weighted sum the suites compare expert by expert.
"""

from __future__ import annotations

import torch

from .contract import ExpertsProbe, Probes, RouterProbe, RouterReading


def read_scores_logits(output) -> RouterReading:
    scores, logits = output
    top = scores.topk(int((scores[:1] > 0).sum()), dim=-1)
    return RouterReading(indices=top.indices, weights=top.values, logits=logits)


def force_scores(output, forced: RouterReading):
    scores, logits = output
    idx = forced.indices.reshape(scores.shape[0], -1).long()
    return torch.zeros_like(scores).scatter(1, idx, forced.weights.reshape(idx.shape).to(scores.dtype)), logits


def call_routed_experts(experts, x, indices, weights):
    E, T = experts.num_experts, x.shape[0]
    out = torch.zeros_like(x)
    for k in range(indices.shape[-1]):
        scores = torch.zeros(T, E, dtype=x.dtype, device=x.device).scatter(1, indices[:, k:k + 1], 1.0)
        y = experts(x.repeat(E, 1) * scores.t().reshape(-1, 1)).reshape(E, T, -1).sum(0)
        out = out + weights[:, k:k + 1].to(x.dtype) * y
    return out


LLAMA4 = Probes(router=RouterProbe(read=read_scores_logits, force=force_scores),
                experts=ExpertsProbe(call=call_routed_experts, read_choice=None, force_choice=None))
