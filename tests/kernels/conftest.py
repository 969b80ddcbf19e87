"""The kernel tests run the Triton kernels under the interpreter on CPU machines.

TRITON_INTERPRET=1 only takes effect if it is set before the first `import triton` of the
process, so it is set here at conftest import (and CI should also export it, because an
earlier conftest may import triton first; the triton tests then skip with that reason).
MOE_KERNELS_DEVICE=cuda runs the same tests natively on a GPU (bf16 included).
"""

import os

import pytest

DEVICE = os.environ.get("MOE_KERNELS_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.manual_seed(0)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def require():
    """require(backend, dtype): skip (with the reason) where that backend cannot run here."""
    from moe_conformance.kernel_checks.checks import backend_available

    def _require(backend, dtype=torch.float32):
        ok, why = backend_available(backend, DEVICE, dtype)
        if not ok:
            pytest.skip(why)

    return _require
