"""Vectorised plain-torch backend: the default experts implementation of the native models.

Routing mirrors transformers' routers line for line (fp32 math). The experts path sorts the
(token, k) slots by expert, runs `torch._grouped_mm` over the sorted rows when the dtype,
device and strides allow it (else one matmul per non-empty expert), and combines the k
outputs of each token in fp32. Gradients come from plain autograd.

The small helpers (`_group_scores`, `_gather_weights`, `_combine`) are separate functions on
purpose: the project's tests monkeypatch them to plant routing and precision bugs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Permutation(NamedTuple):
    """Where each (token, k) slot goes when the slots are sorted by expert (stable).

    tokens_per_expert [E] int64, offsets [E+1] int64 (expert e owns sorted rows
    offsets[e]:offsets[e+1]), sorted_slots [T*K] int64 (the slot t*K+k stored on each sorted
    row), slot_rows [T*K] int64 (the sorted row of each slot; inverse of sorted_slots).
    """

    tokens_per_expert: torch.Tensor
    offsets: torch.Tensor
    sorted_slots: torch.Tensor
    slot_rows: torch.Tensor


# ----------------------------------------------------------------------------- routing


def _scores(logits_f32: torch.Tensor, scoring: str) -> torch.Tensor:
    if scoring == "softmax":
        return torch.softmax(logits_f32, dim=-1)
    if scoring == "sigmoid":
        return torch.sigmoid(logits_f32)
    raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")


def _group_scores(choice_TGS: torch.Tensor) -> torch.Tensor:
    # DeepSeek-V3: a group's score is the sum of its two best (biased) expert scores.
    return choice_TGS.topk(2, dim=-1).values.sum(dim=-1)


def _gather_weights(scores_TE, choice_TE, indices_TK):
    # The correction bias only picks experts; the weights are the unbiased scores.
    return scores_TE.gather(1, indices_TK)


def route_torch(
    router_logits, *, scoring, top_k, correction_bias, n_group, topk_group,
    norm_topk_prob, routed_scaling_factor,
):
    T, E = router_logits.shape
    scores = _scores(router_logits.float(), scoring)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1:
        group_scores = _group_scores(choice.view(T, n_group, E // n_group))
        kept = torch.topk(group_scores, k=topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        expert_mask = group_mask.repeat_interleave(E // n_group, dim=1)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    indices = torch.topk(choice, k=top_k, dim=-1).indices
    weights = _gather_weights(scores, choice, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, indices


def weights_for_indices(router_logits, indices_TK, *, scoring, norm_topk_prob, routed_scaling_factor):
    """Differentiable routing weights for already chosen experts (selection has no gradient).

    Lets a non-differentiable selection kernel (backend="triton") still pass the gradient
    of the weights back to the router logits, with the same math as `route_torch`.
    """
    scores = _scores(router_logits.float(), scoring)
    weights = scores.gather(1, indices_TK)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor


# ------------------------------------------------------------------------- permutation


def permute_torch(indices_TK: torch.Tensor, num_experts: int) -> Permutation:
    flat = indices_TK.reshape(-1)
    sorted_slots = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    slot_rows = torch.empty_like(sorted_slots)
    slot_rows[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
    return Permutation(counts, offsets, sorted_slots, slot_rows)


def _combine(y_sorted_SH, slot_rows, weights_TK):
    # fp32 accumulation of the k weighted expert outputs of each token.
    T, K = weights_TK.shape
    y = y_sorted_SH[slot_rows].view(T, K, y_sorted_SH.shape[-1]).float()
    return (y * weights_TK.float().unsqueeze(-1)).sum(dim=1)


def combine_torch(y_sorted_SH, perm: Permutation, weights_TK, out_dtype=None):
    out = _combine(y_sorted_SH, perm.slot_rows, weights_TK)
    return out.to(out_dtype or y_sorted_SH.dtype)


# ----------------------------------------------------------------------------- experts


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch._grouped_mm needs 16-byte aligned strides; on CUDA it is bf16-only (sm90+)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if a.device.type == "cuda":
        if a.dtype != torch.bfloat16 or torch.cuda.get_device_capability(a.device)[0] < 9:
            return False
    elif a.device.type != "cpu":
        return False
    item = a.element_size()
    return all(d * item % 16 == 0 for d in (a.shape[1], b.shape[1], b.shape[2]))


def _grouped_linear(a_SK, w_ENK, offsets):
    """rows of a owned by expert e times w[e].T (nn.Linear layout) for every expert."""
    w_EKN = w_ENK.transpose(1, 2)
    if _grouped_mm_ok(a_SK, w_EKN):
        return torch._grouped_mm(a_SK, w_EKN, offs=offsets[1:].to(torch.int32))
    bounds = offsets.tolist()  # host sync: only on the fallback path
    parts = [
        a_SK[bounds[e]:bounds[e + 1]] @ w_ENK[e].T
        for e in range(w_ENK.shape[0])
        if bounds[e + 1] > bounds[e]
    ]
    if not parts:
        return a_SK.new_zeros(0, w_ENK.shape[1])
    return torch.cat(parts, dim=0)


def moe_experts_torch(x_TH, indices_TK, weights_TK, w_gate_EIH, w_up_EIH, w_down_EHI):
    T, K = indices_TK.shape
    perm = permute_torch(indices_TK, w_gate_EIH.shape[0])
    x_sorted = x_TH[perm.sorted_slots // K]
    gate = _grouped_linear(x_sorted, w_gate_EIH, perm.offsets)
    up = _grouped_linear(x_sorted, w_up_EIH, perm.offsets)
    y_sorted = _grouped_linear(F.silu(gate) * up, w_down_EHI, perm.offsets)
    return _combine(y_sorted, perm.slot_rows, weights_TK).to(x_TH.dtype)
