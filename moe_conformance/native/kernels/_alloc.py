"""Output allocation with an optional poison fill.

Kernels allocate every output and gradient through `empty()`. Normally that is plain
`torch.empty`; inside `poisoned_outputs()` the buffer is filled first (NaN for floats, a
large sentinel for integers) so any element a kernel forgets to write shows up in the checks
instead of silently holding whatever the allocator handed back (often zeros on a fresh CPU
allocation, which hides exactly the bugs we look for).
"""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()
INT_POISON = 2**30 + 7  # fits int32, is no valid index or count in any test


def poisoning() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def poisoned_outputs():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def empty(shape, *, dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if poisoning():
        t.fill_(float("nan") if dtype.is_floating_point else INT_POISON)
    return t
