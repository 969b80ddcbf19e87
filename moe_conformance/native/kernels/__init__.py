"""MoE kernels: routing, token permutation, grouped expert GEMMs (SwiGLU), top-k combine.

Public API (the native candidate models call these with a user-chosen backend):

    route(router_logits, *, scoring, top_k, correction_bias=None, n_group=1, topk_group=1,
          norm_topk_prob=True, routed_scaling_factor=1.0, backend="torch")
        -> (weights [T, K] fp32, indices [T, K] int64)
    moe_experts(x [T, H], indices [T, K], weights [T, K], w_gate [E, I, H], w_up [E, I, H],
                w_down [E, H, I], *, backend="torch") -> out [T, H] in x.dtype
    permute(indices, num_experts, *, backend="torch") -> Permutation
    combine(y_sorted, perm, weights, *, backend="torch", out_dtype=None) -> [T, H]
    poisoned_outputs()  context manager: kernel outputs start as NaN (checks use it)

Backends: "torch" (vectorised torch, `torch._grouped_mm` where it applies; the default) and
"triton" (kernels in `triton_moe.py`, imported only when asked for). Each is also declared as a
`KernelSubject` (TORCH, TRITON) so the conformance kernel check set (moe_conformance.kernel_checks)
tests them like any team's kernels. Importing this package does not import triton.
"""

from __future__ import annotations

import importlib

import torch

from ._alloc import poisoned_outputs
from .torch_backend import Permutation

__all__ = ["BACKENDS", "Permutation", "poisoned_outputs", "route", "moe_experts", "permute", "combine", "backend_module"]

BACKENDS = ("torch", "triton")


def backend_module(backend: str):
    """The module implementing `backend`; imports triton lazily with a clear error."""
    if backend == "torch":
        from . import torch_backend

        return torch_backend
    if backend == "triton":
        try:
            return importlib.import_module(".triton_moe", __name__)
        except ImportError as exc:
            raise ImportError(
                f"moe_conformance.native.kernels backend='triton' is unavailable: {exc}. "
                "Install the 'triton' package, or use backend='torch'."
            ) from exc
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def _validate_routing(E, scoring, top_k, correction_bias, n_group, topk_group):
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if correction_bias is not None and correction_bias.shape != (E,):
        raise ValueError(f"correction_bias must have shape ({E},), got {tuple(correction_bias.shape)}")
    if n_group < 1 or E % n_group:
        raise ValueError(f"num_experts={E} is not divisible by n_group={n_group}")
    if n_group > 1:
        if E // n_group < 2:
            raise ValueError("group-limited routing scores a group by its top-2 experts: "
                             f"need >= 2 experts per group, got {E // n_group}")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group={topk_group} must be in [1, n_group={n_group}]")
    available = topk_group * (E // n_group) if n_group > 1 else E
    if not 1 <= top_k <= available:
        raise ValueError(f"top_k={top_k} must be in [1, {available}] (experts left after group masking)")


def route(
    router_logits: torch.Tensor,
    *,
    scoring: str,
    top_k: int,
    correction_bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose top_k experts per token; router math in fp32 whatever the logits' dtype.

    scoring="softmax": Mixtral/Qwen3-MoE (softmax over all experts, then top-k).
    scoring="sigmoid": DeepSeek-V3 (correction_bias picks experts but never enters weights;
    n_group > 1 keeps the topk_group groups with the best top-2 sums).
    Weights are optionally renormalised over the k chosen, then times routed_scaling_factor.
    Weights are differentiable w.r.t. router_logits on every backend (the triton backend
    selects in a kernel and recomputes the chosen weights with torch ops when logits need grad).
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got shape {tuple(router_logits.shape)}")
    _validate_routing(router_logits.shape[1], scoring, top_k, correction_bias, n_group, topk_group)
    weights, indices = getattr(backend_module(backend), f"route_{backend}")(
        router_logits, scoring=scoring, top_k=top_k, correction_bias=correction_bias,
        n_group=n_group, topk_group=topk_group, norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=routed_scaling_factor,
    )
    if backend != "torch" and router_logits.requires_grad and torch.is_grad_enabled():
        # kernels choose the experts; the gradient of the weights flows through torch ops
        from .torch_backend import weights_for_indices

        weights = weights_for_indices(router_logits, indices, scoring=scoring,
                                      norm_topk_prob=norm_topk_prob,
                                      routed_scaling_factor=routed_scaling_factor)
    return weights, indices


def permute(indices: torch.Tensor, num_experts: int, *, backend: str = "torch") -> Permutation:
    """Stable sort of the (token, k) slots by expert: counts, offsets and both index maps."""
    return getattr(backend_module(backend), f"permute_{backend}")(indices, num_experts)


def combine(y_sorted, perm: Permutation, weights, *, backend: str = "torch", out_dtype=None):
    """Inverse of `permute` plus the weighted top-k sum, accumulated in fp32."""
    return getattr(backend_module(backend), f"combine_{backend}")(y_sorted, perm, weights, out_dtype)


def moe_experts(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """sum_k weights[t,k] * w_down[e] @ (silu(w_gate[e] @ x_t) * (w_up[e] @ x_t)), e = indices[t,k].

    Differentiable w.r.t. x, weights, w_gate, w_up and w_down on every backend; the top-k
    sum is accumulated in fp32 and the result returned in x.dtype.
    """
    T, H = x.shape
    E, I, H_w = w_gate.shape
    if H_w != H or w_up.shape != (E, I, H) or w_down.shape != (E, H, I):
        raise ValueError(
            f"expert weights must be w_gate/w_up [E, I, H] and w_down [E, H, I] with H={H}; got "
            f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}")
    if indices.shape != weights.shape or indices.shape[0] != T:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must be [T={T}, K]")
    module = backend_module(backend)
    return getattr(module, f"moe_experts_{backend}")(x, indices, weights, w_gate, w_up, w_down)


# ---- the native kernels as subjects of the conformance kernel check set


def _triton_interpreting() -> bool:
    """True when triton's own jit functions (tl.max...) were built for the interpreter, which
    happens only if TRITON_INTERPRET=1 was set before triton was first imported."""
    import triton.language as tl

    return type(tl.max).__name__ == "InterpretedFunction"


def _triton_unavailable(device: str, dtype: torch.dtype) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the 'triton' package is not installed"
    if torch.device(device).type == "cpu":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1" or not _triton_interpreting():
            return ("triton on CPU needs TRITON_INTERPRET=1 set before the first `import triton` in the process "
                    "(set it in the environment)")
        if dtype == torch.bfloat16:
            return "bf16 gives garbage under the Triton interpreter; bf16 runs on a GPU"
    elif _triton_interpreting():
        # seen on a GPU image: the interpreter fails on GPU tensors (TypeError in interpreter.py)
        return ("TRITON_INTERPRET=1 is set in this process's environment: on a GPU the Triton kernels would run "
                "under the interpreter, not compiled (unset it for a GPU run)")
    return None


def _use_in(backend: str):
    def switch(model) -> None:
        from ..model import Experts

        from ...kernel_checks.subjects import KernelsCannotRun

        found = [m for m in model.modules() if isinstance(m, Experts)]
        if not found:
            raise KernelsCannotRun(f"the native {backend} kernels switch only the native candidate's Experts modules, "
                                   f"and this candidate has none: declare a KernelSubject whose use_in switches yours")
        why = found[0].kernel_unsupported()
        if why:
            raise KernelsCannotRun(f"the native {backend} kernels do not compute {why}")
        for m in found:
            m.backend = backend
    return switch


def _routing_unsupported(routing) -> str | None:
    if routing.scoring not in ("sigmoid", "softmax"):
        return f"the native route kernels implement sigmoid and softmax scoring, not {routing.scoring}"
    if routing.n_group > 1 and routing.group_score != "top2_sum":
        return f"the native route kernels rank groups by their top-2 sum, not by {routing.group_score}"
    return None


def _subject(backend: str, **kw):
    from functools import partial

    from moe_conformance.kernel_checks.subjects import KernelSubject

    return KernelSubject(
        name=backend, route=partial(route, backend=backend), permute=partial(permute, backend=backend),
        combine=partial(combine, backend=backend), experts=partial(moe_experts, backend=backend),
        use_in=_use_in(backend), unsupported_routing=_routing_unsupported, **kw)


TORCH = _subject("torch")
TRITON = _subject("triton", unavailable=_triton_unavailable)
