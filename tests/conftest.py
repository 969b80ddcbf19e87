"""In-process pytester runs restore sys.modules afterwards, dropping what the run imported;
re-importing a C extension (torch, triton) in the next run crashes the interpreter. Import the
heavy stack once here, before any run, so pytester's snapshot keeps it."""

import importlib.util
import os
from pathlib import Path

import safetensors.torch  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401
from transformers import DeepseekV3ForCausalLM, Glm4MoeForCausalLM  # noqa: F401

if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

# The vLLM worker env that scripts/setup_vllm.sh builds in the checkout: the vLLM checks of the
# project's own tests use it when it is there (pytester runs leave the checkout's folder).
_VLLM = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
if _VLLM.exists():
    os.environ.setdefault("MOE_CONFORMANCE_VLLM_PYTHON", str(_VLLM))
