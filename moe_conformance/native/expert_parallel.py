"""Expert parallelism for the native candidate, as a training framework would write it.

``shard(model, rank, world_size, group)`` turns a full :class:`MoETransformer` into one rank's
shard, in place: every MoE block's experts become an :class:`ExpertParallelExperts` holding
the rank's contiguous range of experts (:func:`expert_range`); everything else is replicated.
Each rank runs its own tokens:

1. the router picks experts as before (any expert of the whole model);
2. the (token, slot) pairs are sorted by expert, so by owning rank; the per-rank counts are
   exchanged first (``all_to_all_single`` of one count per rank), then the expert ids and the
   hidden rows travel with ``all_to_all_single`` (autograd-aware: the backward is the reverse
   exchange);
3. the owner computes its experts on what it received and sends the rows back;
4. the source rank combines them with the routing weights (which already carry the routed
   scaling and renormalization).

Dropless by default: ``capacity_factor`` (tokens an expert takes from one rank, as a multiple of
the even share T*K/E) drops what does not fit, as capacity-limited EP implementations do.

Training pieces (declared in :data:`EXPERT_PARALLEL`): :func:`reduce_gradients` sums the
replicated parameters' gradients over the group in one flat buffer per dtype (expert shards are
complete already: their rows came from every rank); :func:`aux_loss` is the rank's share of the
Switch load-balancing loss with the slot counts and row counts all-reduced; :func:`bias_update`
all-reduces the tokens per expert before the aux-loss-free bias step, in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_conformance.contract import ExpertParallel

from .model import Experts, MoE

__all__ = ["EXPERT_PARALLEL", "ExpertParallelExperts", "aux_loss", "bias_update", "expert_range", "locate",
           "reduce_gradients", "shard"]

_PROJECTIONS = ("w1", "w3", "w2", "b1", "b3", "b2")


def expert_range(num_experts: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous experts [start, stop) that ``rank`` owns (balanced when E % W != 0)."""
    return rank * num_experts // world_size, (rank + 1) * num_experts // world_size


class _Exchange(torch.autograd.Function):
    """``all_to_all_single`` with autograd: rows ``send[r]`` go to rank r, ``recv[r]`` come from it;
    the gradient goes back the same way."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return back, None, None, None


class ExpertParallelExperts(Experts):
    """The experts of one rank (``w1``/``w3``/``w2`` [E_local, ...], same names as the full
    module's) and the token exchange with the other ranks' experts."""

    def __init__(self, full: Experts, rank: int, world_size: int, group, capacity_factor: float | None = None):
        nn.Module.__init__(self)
        self.cfg = full.cfg
        self.backend = "torch"
        self.num_experts = full.w1.shape[0]
        self.rank, self.world_size, self.group = rank, world_size, group
        self.lo, self.hi = expert_range(self.num_experts, rank, world_size)
        self.capacity_factor = capacity_factor
        for name in _PROJECTIONS:
            if hasattr(full, name):
                setattr(self, name, nn.Parameter(getattr(full, name).detach()[self.lo:self.hi].clone()))
        starts = [expert_range(self.num_experts, r, world_size)[0] for r in range(world_size)]
        self.register_buffer("starts", torch.tensor(starts, dtype=torch.long, device=full.w1.device), persistent=False)

    def _expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        biased = hasattr(self, "b1")
        b1, b3, b2 = (self.b1[e], self.b3[e], self.b2[e]) if biased else (None, None, None)
        return F.linear(self.activation(F.linear(h, self.w1[e], b1), F.linear(h, self.w3[e], b3)), self.w2[e], b2)

    def forward(self, x_TH: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        T, K = indices_TK.shape
        flat = indices_TK.reshape(-1).long()
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs by expert, so by owning rank
        expert = flat[order]
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * T * K / self.num_experts)
            per_expert = torch.bincount(expert, minlength=self.num_experts)
            first = torch.cumsum(per_expert, 0) - per_expert
            keep = torch.arange(expert.numel(), device=expert.device) - first[expert] < capacity
            order, expert = order[keep], expert[keep]
        token = order // K
        owner = torch.searchsorted(self.starts[1:], expert, right=True)
        send_counts = torch.bincount(owner, minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)  # counts first
        send, recv = send_counts.tolist(), recv_counts.tolist()
        local = (expert - self.starts[owner]).contiguous()
        recv_local = local.new_empty(sum(recv))
        dist.all_to_all_single(recv_local, local, output_split_sizes=recv, input_split_sizes=send, group=self.group)
        recv_x = _Exchange.apply(x_TH.index_select(0, token), send, recv, self.group)
        # tied to recv_x even when nothing arrived, so every rank runs the reverse exchanges in
        # backward (a rank skipping one would leave the others waiting in it)
        y = recv_x.new_zeros(recv_x.shape) + recv_x[:0].sum()
        for e in recv_local.unique().tolist():
            rows = (recv_local == e).nonzero().squeeze(1)
            y = y.index_copy(0, rows, self._expert(e, recv_x.index_select(0, rows)).to(y.dtype))
        back = _Exchange.apply(y, recv, send, self.group)
        weights = weights_TK.reshape(-1)[order]
        return torch.zeros_like(x_TH).index_add(0, token, (back * weights[:, None]).to(x_TH.dtype))


def shard(model: nn.Module, rank: int, world_size: int, group, *, capacity_factor: float | None = None) -> nn.Module:
    """Rank ``rank``'s shard of the full model (in place): each MoE block's experts replaced by
    the rank's contiguous range, exchanging tokens over ``group``."""
    for module in list(model.modules()):
        if isinstance(module, MoE):
            module.experts = ExpertParallelExperts(module.experts, rank, world_size, group, capacity_factor)
    return model


def locate(model: nn.Module, name: str) -> tuple[str, slice | None]:
    """Where the shard's tensor ``name`` sits in the full model: expert rows, or the whole tensor."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if isinstance(module, ExpertParallelExperts) and attr in module._parameters:
        return name, slice(module.lo, module.hi)
    return name, None


def _expert_shards(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}


def reduce_gradients(model: nn.Module, group) -> None:
    """Sum the replicated parameters' gradients over the group (one flat buffer per dtype)."""
    local = _expert_shards(model)
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in local]
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for dtype in sorted(by_dtype, key=str):  # the same order on every rank
        ps = by_dtype[dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in ps:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


def aux_loss(router_logits, top_k: int, attention_mask, group) -> torch.Tensor:
    """The rank's share of the Switch/Mixtral load-balancing loss of the group's whole batch:
    ``E * sum_e f_e * P_e`` with the top-k slot counts and row counts all-reduced (no gradient)
    and the rank's own probabilities over the group's rows (the gradient of its share)."""
    E = router_logits[0].shape[-1]
    device = router_logits[0].device
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    tokens = torch.zeros(E, device=device)
    probs = torch.zeros(E, device=device)
    rows = torch.zeros((), device=device)
    for logits in router_logits:
        p = logits.float().softmax(-1)
        w = torch.ones(p.shape[0], device=device) if mask is None else mask
        chosen = p.topk(top_k, dim=-1).indices
        tokens = tokens + torch.zeros(E, device=device).scatter_add_(0, chosen.reshape(-1), w.repeat_interleave(top_k))
        probs = probs + (p * w[:, None]).sum(0)
        rows = rows + w.sum()
    stats = torch.cat((tokens, rows.reshape(1))).detach()
    dist.all_reduce(stats, group=group)
    tokens_all, rows_all = stats[:E], stats[E]
    return E * (tokens_all / rows_all * probs / rows_all).sum()


@torch.no_grad()
def bias_update(bias: torch.Tensor, local_load: torch.Tensor, rate: float, group) -> None:
    """DeepSeek-V3 aux-loss-free balancing on the group's load: the tokens per expert summed over
    the ranks (fp32) before ``bias += rate * sign(mean - load)``."""
    load = local_load.to(device=bias.device, dtype=torch.float32).clone()
    dist.all_reduce(load, group=group)
    bias.add_(rate * torch.sign(load.mean() - load).to(bias.dtype))


EXPERT_PARALLEL = ExpertParallel(shard=shard, locate=locate, reduce_gradients=reduce_gradients, aux_loss=aux_loss,
                                 bias_update=bias_update)
