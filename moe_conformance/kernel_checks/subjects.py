"""Kernels under test: a team's MoE kernels, declared by stage, checked by the kernel check set.

A ``KernelSubject`` names the functions it provides; every stage is optional and the check set
runs the stages that are there:

- ``route(router_logits [T, E], *, scoring, top_k, correction_bias, n_group, topk_group,
  norm_topk_prob, routed_scaling_factor) -> (weights [T, K] fp32, indices [T, K] int64)``
- ``permute(indices [T, K], num_experts) -> (tokens_per_expert [E], offsets [E+1],
  sorted_slots [T*K], slot_rows [T*K])`` (slot t*K+k; stable by slot within an expert)
- ``combine(y_sorted [T*K, H], permutation, weights [T, K]) -> [T, H]``
- ``experts(x [T, H], indices [T, K], weights [T, K], w_gate [E, I, H], w_up [E, I, H],
  w_down [E, H, I]) -> [T, H]`` (SwiGLU experts, weighted top-k sum; differentiable)
- ``fused_moe(hidden [T, H], w_gate_up [E, 2I, H], w_down [E, H, I], topk_weights [T, K],
  topk_ids [T, K]) -> [T, H]``: the whole expert computation in the common fused shape (gate rows
  then up rows), differentiable like ``experts``

Optionally ``use_in(candidate_model)`` switches a candidate to these kernels (the candidate then
runs on them against the reference; it raises :class:`KernelsCannotRun`, or any
``NotImplementedError``, naming why when the candidate's configuration is one its kernels do
not compute: the check records that, it never passes it), and ``unsupported_routing(routing)`` says which routing
the ``route`` stage does not implement (the check set then leaves that stage out, saying so).

Outputs are poisoned during the checks: every ``torch.empty``-family allocation made from
Python inside a check starts as NaN (integers as a sentinel), so a row a kernel never writes
fails instead of passing as whatever memory held. The project's own kernels are subjects like
a team's; ``BUILTIN`` names them by import path, so nothing here imports them until asked.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

STAGES = ("route", "permute", "combine", "experts", "fused_moe")
INT_POISON = 2**30 + 7  # fits int32, is no valid index or count in any check


class KernelsCannotRun(NotImplementedError):
    """``use_in`` on a candidate configuration the kernels do not compute (the reason in the message)."""


@dataclass(frozen=True)
class KernelSubject:
    name: str
    route: Callable | None = None
    permute: Callable | None = None
    combine: Callable | None = None
    experts: Callable | None = None
    fused_moe: Callable | None = None
    use_in: Callable | None = None
    unsupported_routing: Callable[[object], str | None] = field(default=lambda routing: None)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    devices: tuple[str, ...] = ("cpu", "cuda")
    # (device, dtype) -> why this subject cannot run there (None: it can)
    unavailable: Callable[[str, torch.dtype], str | None] = field(default=lambda device, dtype: None)

    def stages(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if getattr(self, s) is not None)

    def why_not(self, device: str, dtype: torch.dtype = torch.float32) -> str | None:
        kind = torch.device(device).type
        if kind not in self.devices:
            return f"kernels {self.name!r} declare devices {self.devices}, not {kind}"
        if dtype not in self.dtypes:
            return f"kernels {self.name!r} declare dtypes {[str(d).removeprefix('torch.') for d in self.dtypes]}"
        if kind == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return self.unavailable(device, dtype)


BUILTIN = {
    "triton": "moe_conformance.native.kernels:TRITON",
    "torch": "moe_conformance.native.kernels:TORCH",
}


def resolve(subject: str | KernelSubject) -> KernelSubject:
    """A subject, or the name of a built-in one, or ``module:attribute`` of a team's."""
    if isinstance(subject, KernelSubject):
        return subject
    target = BUILTIN.get(subject, subject)
    if ":" not in target:
        raise LookupError(f"unknown kernels {subject!r}: use one of {sorted(BUILTIN)} or 'module:ATTRIBUTE'")
    module, _, attr = target.partition(":")
    found = getattr(importlib.import_module(module), attr)
    if not isinstance(found, KernelSubject):
        raise TypeError(f"{target} is a {type(found).__name__}, not a moe_conformance KernelSubject")
    return found


@torch.no_grad()
def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(INT_POISON if t.dtype not in (torch.uint8, torch.int8, torch.int16) else -1)
    return t


@contextlib.contextmanager
def poisoned_outputs():
    """Every torch.empty / empty_like / empty_strided / Tensor.new_empty made from Python in
    this block comes back poisoned."""
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like", "empty_strided")}
    new_empty = torch.Tensor.new_empty

    def wrap(fn):
        return lambda *a, **k: _poison(fn(*a, **k))

    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        torch.Tensor.new_empty = lambda self, *a, **k: _poison(new_empty(self, *a, **k))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
        torch.Tensor.new_empty = new_empty
