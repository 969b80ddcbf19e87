#!/usr/bin/env bash
# Set up .venv-torchtitan: torchtitan 0.3.0 (a third-party training framework) as a candidate,
# in an environment of its own, next to this project (editable) pinned by requirements/lock.txt.
# Used by examples/torchtitan/. Idempotent: a working env is left as it is. Fails loudly.
#   torch==2.13.0 first (the local CPU wheel: an unpinned torch would pull a multi-GB CUDA build),
#   then torchtitan==0.3.0 and triton==3.9.0 (torchtitan imports triton without declaring it),
#   then this project with the committed constraints.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${TORCHTITAN_VENV:-.venv-torchtitan}
LOCK=${LOCK-requirements/lock.txt}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

ready() {
    "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, triton, transformers, torchtitan, moe_conformance  # noqa: F401
from torchtitan.models.deepseek_v3 import model as _d  # noqa: F401  (imports triton kernels)
from torchtitan.models.qwen3 import model as _q  # noqa: F401
assert md.version("torchtitan") == "0.3.0", md.version("torchtitan")
print(f"torchtitan ready in {__import__('sys').prefix}: torchtitan {md.version('torchtitan')}, torch {torch.__version__}, "
      f"triton {triton.__version__}, transformers {transformers.__version__}")
PY
}

pip_install() {  # quiet, but never hides a failure
    "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

if [ -x "$VENV/bin/python" ] && ready 2>/dev/null; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install ${LOCK:+-c "$LOCK"} --upgrade pip
pip_install "$TORCH_SPEC"
# The lock, less the one pin torchtitan's own pins cannot meet: torchtitan 0.3.0 wants
# datasets<4.8, and every such datasets caps fsspec (<=2026.2.0) below the lock's fsspec==2026.9.0.
# torchtitan's other dependencies (datasets, tyro, wandb, tensorboard...) are not in the lock.
CONSTRAINTS=
if [ -n "$LOCK" ]; then
    CONSTRAINTS="$VENV/constraints.txt"
    grep -v '^fsspec==' "$LOCK" > "$CONSTRAINTS"
fi
pip_install ${CONSTRAINTS:+-c "$CONSTRAINTS"} "$TORCH_SPEC" torchtitan==0.3.0 triton==3.9.0
pip_install ${CONSTRAINTS:+-c "$CONSTRAINTS"} "$TORCH_SPEC" -e '.[test]'
"$VENV/bin/python" -m pip check
ready || { echo "torchtitan setup failed: $VENV cannot import torchtitan cleanly" >&2; exit 1; }
