"""Root conftest. The conformance suites need nothing from here (the installed plugin provides
everything, also when the suites run from an installed wheel); this only keeps the project's
own test runs offline like the suites, and picks the Triton interpreter on CPU. pytester is
enabled in pyproject's addopts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton kernels run on CPU under the interpreter, chosen before the first `import triton`
# (tests/conftest.py imports transformers, which imports triton). Not on a GPU run: tests/kernels
# with MOE_KERNELS_DEVICE=cuda, or the suites with `--device cuda`, where the plugin has already
# set TRITON_INTERPRET=0 (pytest_load_initial_conftests runs before this file is imported).
if os.environ.get("MOE_KERNELS_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
