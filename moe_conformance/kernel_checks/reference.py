"""Slow, obviously-right references for the MoE kernels.

Everything here is written for reading, not speed: Python loops over tokens or experts, no
fused tricks, math in the input dtype promoted to at least fp32 (pass fp64 tensors to get an
fp64 reference). The checks in `checks.py` compare every backend against these functions.

Routing is the project's one routing oracle (moe_conformance.routing, transformers' semantics)
in fp64. Ties are broken towards the lower expert index (a stable sort), which is also what the
Triton kernel does; torch.topk makes no promise, so checks skip near-tied tokens.
"""

from __future__ import annotations

import torch

from ..routing import Routing

__all__ = [
    "route_reference",
    "permute_reference",
    "combine_reference",
    "experts_reference",
]


def route_reference(
    router_logits: torch.Tensor,
    *,
    scoring: str,
    top_k: int,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    group_score: str = "top2_sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing oracle (moe_conformance.routing) in fp64 on the CPU: (weights fp64, indices int64)."""
    routing = Routing(scoring=scoring, n_group=n_group, topk_group=topk_group, group_score=group_score,
                      norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor)
    bias = None if correction_bias is None else correction_bias.detach().to("cpu", torch.float64)
    return routing.route(router_logits.detach().to("cpu", torch.float64), top_k, bias)


def permute_reference(indices: torch.Tensor, num_experts: int):
    """Counting sort of the (token, k) slots by expert, stable in slot order.

    Returns (tokens_per_expert [E], offsets [E+1], sorted_slots [T*K], slot_rows [T*K]) as
    int64 CPU tensors: slot s = t*K + k lands on row slot_rows[s] of the expert-sorted
    layout, and sorted_slots[row] is the slot stored there (the inverse map).
    """
    flat = indices.detach().to("cpu").reshape(-1).tolist()
    counts = [0] * num_experts
    for e in flat:
        counts[e] += 1
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    sorted_slots = [s for e in range(num_experts) for s, fe in enumerate(flat) if fe == e]
    slot_rows = [0] * len(flat)
    for row, s in enumerate(sorted_slots):
        slot_rows[s] = row
    as_t = lambda v: torch.tensor(v, dtype=torch.int64)
    return as_t(counts), as_t(offsets), as_t(sorted_slots), as_t(slot_rows)


def combine_reference(y_sorted: torch.Tensor, slot_rows: torch.Tensor, weights: torch.Tensor):
    """out[t] = sum_k weights[t, k] * y_sorted[slot_rows[t*K + k]], summed in fp64."""
    T, K = weights.shape
    out = torch.zeros(T, y_sorted.shape[1], dtype=torch.float64)
    y = y_sorted.detach().to("cpu", torch.float64)
    w = weights.detach().to("cpu", torch.float64)
    rows = slot_rows.to("cpu")
    for t in range(T):
        for k in range(K):
            out[t] += w[t, k] * y[rows[t * K + k]]
    return out


def experts_reference(x_TH, indices_TK, weights_TK, w_gate_EIH, w_up_EIH, w_down_EHI):
    """Loop over experts: out[t] = sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t)).

    Differentiable (plain autograd). Computes in the promoted dtype of the inputs but at
    least fp32, accumulates the combine in that dtype, and returns it in x's dtype. Pass fp64
    tensors for an fp64 reference. Experts that receive no token are skipped, so their
    gradients are exactly zero.
    """
    acc_dtype = torch.promote_types(x_TH.dtype, torch.float32)
    out = torch.zeros(x_TH.shape, dtype=acc_dtype, device=x_TH.device)
    for e in range(w_gate_EIH.shape[0]):
        token_idx, k_idx = torch.nonzero(indices_TK == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        x_e = x_TH[token_idx].to(acc_dtype)
        gate = x_e @ w_gate_EIH[e].to(acc_dtype).T
        up = x_e @ w_up_EIH[e].to(acc_dtype).T
        y_e = (torch.nn.functional.silu(gate) * up) @ w_down_EHI[e].to(acc_dtype).T
        w = weights_TK[token_idx, k_idx].to(acc_dtype)
        out = out.index_add(0, token_idx, y_e * w[:, None])
    return out.to(x_TH.dtype)
