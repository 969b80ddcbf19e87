"""Deliberately broken expert parallelism: each plants one bug into kimi_k25's native EP
declaration (moe_conformance.native.expert_parallel), under the name ``kimi_k25_<bug>``.

``build(bug)`` returns the spec; the project's tests run the expert_parallel suite on it through
``--arch-plugin`` and assert that the right check fails naming the rank and the tensor. The
launcher-level tasks at the end (``sleepy_task``...) exercise moe_conformance.distributed alone.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch
import torch.distributed as dist

from moe_conformance.native import expert_parallel as nep
from moe_conformance.native.model import MoE, Router
from planted import base_spec

NATIVE = nep.EXPERT_PARALLEL


def _wrong_offset_shard(model, rank, world_size, group):
    """Every rank loads experts 0..n-1 (DeepSpeed #6589), while tokens still go to the right rank."""
    full = {name: module.experts for name, module in model.named_modules() if isinstance(module, MoE)}
    shard = nep.shard(model, rank, world_size, group)
    for name, module in shard.named_modules():
        if isinstance(module, MoE):
            n = module.experts.hi - module.experts.lo
            for proj in ("w1", "w3", "w2", "b1", "b3", "b2"):
                if hasattr(module.experts, proj):
                    getattr(module.experts, proj).data.copy_(getattr(full[name], proj).detach()[:n])
    return shard


def _capacity_shard(model, rank, world_size, group):
    """A capacity-limited dispatch (capacity factor 1): what does not fit is dropped silently."""
    return nep.shard(model, rank, world_size, group, capacity_factor=1.0)


def _reduce_outside_moe(model, group):
    """The all-reduce skips every parameter of the MoE blocks, treating them all as expert
    parallel: the routers' and shared experts' gradients stay per rank."""
    local = {id(p) for name, p in model.named_parameters() if ".moe." in name}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in local]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _unscaled_routing_shard(model, rank, world_size, group):
    """The EP path routes with its own copy of the config that lost routed_scaling_factor."""
    shard = nep.shard(model, rank, world_size, group)
    for module in shard.modules():
        if isinstance(module, Router):
            module.cfg = module.cfg.with_(routed_scaling_factor=1.0)
    return shard


@torch.no_grad()
def _bias_update_local(bias, local_load, rate, group):
    """The bias step from the rank's own tokens: no all-reduce of the load first."""
    load = local_load.to(bias.device, torch.float32)
    bias.add_(rate * torch.sign(load.mean() - load).to(bias.dtype))


def _aux_local(router_logits, top_k, attention_mask, group):
    """Each rank's aux loss from its own statistics, split evenly: the shares add up to the mean
    of the local aux losses, not to the batch's."""
    from moe_conformance.training import aux_loss

    return aux_loss(router_logits, top_k, attention_mask) / dist.get_world_size(group)


class _Hang(nep.ExpertParallelExperts):
    def forward(self, *args):
        if self.rank == 1:
            time.sleep(3600)  # the planted hang: rank 1 never reaches the token exchange
        return super().forward(*args)


def _hanging_shard(model, rank, world_size, group):
    shard = nep.shard(model, rank, world_size, group)
    for module in shard.modules():
        if isinstance(module, nep.ExpertParallelExperts):
            module.__class__ = _Hang
    return shard


def _crashing_shard(model, rank, world_size, group):
    if rank == 1:
        os._exit(3)  # the planted crash: rank 1 dies while sharding
    return nep.shard(model, rank, world_size, group)


def _ep(**changes):
    return lambda s: s.replace(expert_parallel=dataclasses.replace(NATIVE, **changes))


BUGS = {
    "wrong_expert_offset": _ep(shard=_wrong_offset_shard),
    "tokens_dropped_at_capacity": _ep(shard=_capacity_shard),
    "replicated_grads_not_reduced": _ep(reduce_gradients=_reduce_outside_moe),
    "routed_scaling_skipped": _ep(shard=_unscaled_routing_shard),
    "load_not_reduced": _ep(bias_update=_bias_update_local),
    "aux_statistics_local": _ep(aux_loss=_aux_local),
    "rank_hangs": _ep(shard=_hanging_shard, timeout=8.0),
    "rank_crashes": _ep(shard=_crashing_shard),
    "not_declared": lambda s: s.replace(expert_parallel=None),
}


# not bugs: the unbroken declaration, and the same without locate (the contract's default rule:
# same names, shorter first dimension = contiguous rows in rank order); both must pass everything
CONTROLS = {
    "control": lambda s: s,
    "default_locate": _ep(locate=None),
}


def build(bug: str):
    breaks = BUGS.get(bug) or CONTROLS[bug]
    return dataclasses.replace(breaks(base_spec("kimi_k25")), name=f"kimi_k25_{bug}")


# ---- launcher-level tasks (moe_conformance.distributed.launch)


def echo_task(ctx, prepared):
    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t)
    return {"rank": ctx.rank, "sum": float(t), "prepared": prepared, "env_rank": os.environ["RANK"],
            "nvls": os.environ.get("NCCL_NVLS_ENABLE")}


def env_task(ctx, prepared):
    return os.environ.get(ctx.payload["name"])


def prepare_value(payload):
    return payload["value"] * 2


def sleepy_task(ctx, prepared):
    """Rank ``payload['who']`` blocks; the others wait for it in an all-reduce."""
    ctx.stage("before the all-reduce")
    if ctx.rank == ctx.payload["who"]:
        time.sleep(3600)
    dist.all_reduce(torch.ones(1))
    return {}


def exiting_task(ctx, prepared):
    ctx.stage("about to exit")
    if ctx.rank == ctx.payload["who"]:
        os._exit(7)
    dist.all_reduce(torch.ones(1))
    return {}


def raising_task(ctx, prepared):
    if ctx.rank == ctx.payload["who"]:
        raise RuntimeError("planted: the expert exchange failed")
    dist.all_reduce(torch.ones(1))
    return {}
