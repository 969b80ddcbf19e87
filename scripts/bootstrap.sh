#!/usr/bin/env bash
# Set up .venv with everything the suites and the project's own tests need. Idempotent.
# TORCH_SPEC picks the torch build: the default is the CPU wheel (an unpinned torch would pull
# a multi-GB CUDA build); on a GPU machine set e.g. TORCH_SPEC="torch" with your index URL.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

pip_install() {  # quiet, but never hides a failure
    .venv/bin/python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install --upgrade pip
pip_install "$TORCH_SPEC"
pip_install -e '.[test]'
.venv/bin/python -c "import torch, transformers, moe_conformance; print('moe-conformance ready: torch', torch.__version__, '/ transformers', transformers.__version__)"
