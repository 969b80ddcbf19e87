"""Root conftest. The conformance suites need nothing from here (the installed plugin provides
everything, also when the suites run from an installed wheel); this only keeps the project's
own test runs offline like the suites, and picks the Triton interpreter on CPU. pytester is
enabled in pyproject's addopts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels run on CPU under the interpreter, chosen before the first `import triton`
# (tests/kernels runs natively on a GPU with MOE_KERNELS_DEVICE=cuda).
if os.environ.get("MOE_KERNELS_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
