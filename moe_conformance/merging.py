"""Expert LoRA merges (F20): adapters on routed experts, shared experts and the router, merged
into the weights, checked by the ``lora_merge`` family.

A team's adapter code is declared as ``ArchSpec(merging=MergeHooks(attach=..., merge=...))``;
None checks the project's own definitions below, which work on any candidate:

- ``attach(model, targets, rank, alpha) -> {target: (A, B)}`` makes the candidate run with a
  LoRA on each target, *unmerged*: the base tensors stay as they are and the adapter is applied
  at forward time (here through ``torch.nn.utils.parametrize``: ``W + alpha / rank * B @ A`` on
  the target's slice). ``A`` is ``[rank, in]``, ``B`` ``[out, rank]`` for a target slice
  ``[out, in]``; both are trainable parameters.
- ``merge(model) -> model`` folds every adapter into its base tensor and removes it; the
  merged model's ``state_dict()`` is in the candidate's own naming, exported with ``to_hf``.

A *target* is one 2-D weight the candidate holds: a routed expert's projection (slice ``e`` of
a stacked ``[E, out, in]`` tensor of the module paired as ``experts``), a shared expert's
projection, the router's weight (the module paired as ``router``). The suite picks some routed
experts, not all, so that an untouched expert must stay bit-identical.

Bugs this exists for: a delta silently dropped on merge for fused (stacked) experts while the
2-D weights merge (unsloth-zoo #647, #779); expert LoRA "enabled" but frozen (unsloth #6936).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

RANK = 4
ALPHA = 4.0


@dataclass(frozen=True)
class Target:
    tensor: str  # candidate tensor name (layers.1.moe.experts.w1)
    expert: int | None  # the slice of a stacked [E, out, in] tensor; None: the whole 2-D tensor
    role: str  # "routed" | "shared" | "router"
    shape: tuple[int, int]  # [out, in] of the slice

    def describe(self) -> str:
        where = f"{self.tensor}[{self.expert}]" if self.expert is not None else self.tensor
        what = f"routed expert {self.expert}" if self.role == "routed" else self.role
        return f"{where} ({what})"


class LoRADelta(torch.nn.Module):
    """A parametrization: ``W`` plus ``scale * B @ A`` on the chosen slices of ``W``."""

    def __init__(self, shape: torch.Size, slices: list[int | None], rank: int, alpha: float,
                 device: torch.device | None = None):
        super().__init__()
        self.slices = list(slices)
        self.scale = alpha / rank
        out, inp = shape[-2], shape[-1]
        # fp32 adapters on the weight's device (a CUDA model's LoRA lives on the GPU too)
        self.A = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(rank, inp, device=device)) for _ in self.slices)
        self.B = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(out, rank, device=device)) for _ in self.slices)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        if W.dim() == 2:
            (A,), (B,) = self.A, self.B
            return W + self.scale * (B @ A).to(W.dtype)
        deltas = torch.zeros_like(W)
        for e, A, B in zip(self.slices, self.A, self.B):
            deltas = deltas.index_put((torch.tensor([e], device=W.device),), (self.scale * (B @ A)).to(W.dtype)[None])
        return W + deltas


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module, _, attr = name.rpartition(".")
    return (model.get_submodule(module) if module else model), attr


def attach_lora(model: torch.nn.Module, targets: list[Target], rank: int = RANK,
                alpha: float = ALPHA) -> dict[Target, tuple[torch.Tensor, torch.Tensor]]:
    """The project's definition: one parametrization per target tensor (all its slices)."""
    by_tensor: dict[str, list[Target]] = {}
    for t in targets:
        by_tensor.setdefault(t.tensor, []).append(t)
    out = {}
    for name, group in by_tensor.items():
        owner, attr = _owner(model, name)
        weight = getattr(owner, attr)
        delta = LoRADelta(weight.shape, [t.expert for t in group], rank, alpha, device=weight.device)
        parametrize.register_parametrization(owner, attr, delta, unsafe=True)
        out.update({t: (delta.A[n], delta.B[n]) for n, t in enumerate(group)})
    return out


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """The project's definition: every adapter folded into its base tensor, then removed."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return model


@dataclass(frozen=True)
class MergeHooks:
    """The adapter code under test; ``ArchSpec(merging=MergeHooks(...))``."""

    attach: Callable[..., dict] = attach_lora  # (model, targets, rank, alpha) -> {target: (A, B)}
    merge: Callable[[torch.nn.Module], torch.nn.Module] = merge_lora


REFERENCE_MERGING = MergeHooks()


def hooks_for(spec) -> MergeHooks:
    return getattr(spec, "merging", None) or REFERENCE_MERGING


# --------------------------------------------------------------------------------------------
# Choosing targets, through the declared probes and the converter (no naming assumed)


def lora_targets(case, model: torch.nn.Module) -> list[Target]:
    """Per MoE layer: two routed experts (1 and E // 2 + 1: neither the first nor all) of every
    stacked expert weight, the router's weight; every shared-expert weight."""
    from .probing import routing_layers
    from .training import candidate_disk_names, group_of

    E = case.num_experts
    chosen = sorted({1 % E, (E // 2 + 1) % E})
    named = dict(model.named_parameters())
    targets: list[Target] = []
    for layer in routing_layers(case, "cand", model):
        if layer.experts:
            for n, p in model.get_submodule(layer.experts).named_parameters():
                if p.dim() == 3 and p.shape[0] == E:
                    targets += [Target(f"{layer.experts}.{n}", e, "routed", tuple(p.shape[1:])) for e in chosen]
        if layer.router:
            for n, p in model.get_submodule(layer.router).named_parameters():
                if p.dim() == 2 and p.requires_grad:
                    targets.append(Target(f"{layer.router}.{n}", None, "router", tuple(p.shape)))
    state = dict(model.state_dict())
    state.update(named)
    extras = case.extra_disk_keys
    for name, disk in candidate_disk_names(case, state).items():
        p = named.get(name)
        if (p is not None and p.dim() == 2 and disk and all(group_of(d) == "shared" for d in disk)
                and not set(disk) <= extras):
            targets.append(Target(name, None, "shared", tuple(p.shape)))
    return targets


def target_disk_keys(case, model: torch.nn.Module, targets: list[Target]) -> dict[Target, list[str]]:
    """The on-disk keys each target's values land in (traced: a marker in the target's slice,
    everything else zero, through ``to_hf``)."""
    state = {k: torch.zeros_like(v, dtype=torch.float32 if not v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}
    for n, t in enumerate(targets):
        view = state[t.tensor] if t.expert is None else state[t.tensor][t.expert]
        view.fill_(float(n + 1))
    out: dict[Target, list[str]] = {t: [] for t in targets}
    for key, tensor in case.to_hf(state).items():
        for marker in torch.unique(tensor.float()).tolist():
            if marker >= 1 and float(marker).is_integer() and int(marker) <= len(targets):
                out[targets[int(marker) - 1]].append(key)
    return out


def fill_adapters(adapters: dict, seed: int) -> None:
    """Deterministic, non-zero adapter values (as after training): every adapter moves its
    target well above float noise, and both A and B get a gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for (A, B) in adapters.values():
            A.copy_(torch.randn(A.shape, generator=gen) * A.shape[-1] ** -0.5)
            B.copy_(torch.randn(B.shape, generator=gen) * 0.3 * B.shape[-1] ** -0.5)
