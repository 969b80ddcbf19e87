"""A team's MoE kernels in plain torch, registered from outside the project as a KernelSubject,
with one switchable fault per bad-input class the kernel check set must name: writing outside
its rows, leaving rows unwritten, accumulating the combine in bf16, dropping the router-weight
gradient, mishandling an expert with zero tokens, ignoring the correction bias."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_conformance.kernel_checks.subjects import KernelSubject

FAULTS = ("writes_outside_rows", "unwritten_rows", "bf16_combine", "drops_weight_grad", "zero_token_expert",
          "ignores_bias")


def subject(fault: str | None = None) -> KernelSubject:
    def route(logits, *, scoring, top_k, correction_bias=None, n_group=1, topk_group=1, norm_topk_prob=True,
              routed_scaling_factor=1.0):
        x = logits.float()
        scores = x.sigmoid() if scoring == "sigmoid" else x.softmax(-1)
        choice = scores if correction_bias is None or fault == "ignores_bias" else scores + correction_bias
        if n_group > 1:
            groups = choice.view(x.shape[0], n_group, -1).topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter(1, groups.topk(topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(x.shape[1] // n_group, 1), float("-inf"))
        indices = choice.topk(top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * routed_scaling_factor, indices

    def permute(indices, num_experts):
        flat = indices.reshape(-1)
        counts = torch.bincount(flat, minlength=num_experts)
        offsets = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
        sorted_slots = flat.argsort(stable=True)
        slot_rows = torch.empty_like(sorted_slots)
        slot_rows[sorted_slots] = torch.arange(flat.numel(), device=flat.device)
        return counts, offsets, sorted_slots, slot_rows

    def combine(y_sorted, permutation, weights):
        T, K = weights.shape
        rows = y_sorted[permutation[3]].view(T, K, -1)
        acc = torch.bfloat16 if fault == "bf16_combine" else torch.float32
        return (rows.to(acc) * weights[..., None].to(acc)).sum(1).to(y_sorted.dtype)

    def experts(x, indices, weights, w_gate, w_up, w_down):
        if fault == "drops_weight_grad":
            weights = weights.detach()
        out = torch.zeros_like(x)
        if fault == "unwritten_rows":  # rows of the last expert's tokens start from whatever memory held
            out = torch.empty_like(x)
            out[~(indices == w_gate.shape[0] - 1).any(-1)] = 0
        for e in range(w_gate.shape[0]):
            token, slot = torch.where(indices == e)
            if token.numel() == 0:
                if fault != "zero_token_expert":
                    continue
                token, slot = torch.zeros(1, dtype=torch.long, device=x.device), torch.zeros(1, dtype=torch.long, device=x.device)
            h = F.silu(x[token] @ w_gate[e].T) * (x[token] @ w_up[e].T)
            y = (h @ w_down[e].T) * weights[token, slot, None].to(x.dtype)
            out = out.index_add(0, token, y)
        if fault == "writes_outside_rows":
            with torch.no_grad():
                x[-1].add_(1.0)  # one row past what it owns: into the caller's activations
        return out

    name = f"team_{fault}" if fault else "team"
    return KernelSubject(name=name, route=route, permute=permute, combine=combine, experts=experts,
                         dtypes=(torch.float32,), devices=("cpu",))
