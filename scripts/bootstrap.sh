#!/usr/bin/env bash
# Set up a venv (default .venv) with everything the suites and the project's own tests need,
# pinned by a committed lock (default requirements/lock.txt; refresh with scripts/lock.sh), so
# an upstream release cannot change what a fresh machine installs. Idempotent.
#   VENV=.venv-oldest LOCK=requirements/lock-oldest.txt bash scripts/bootstrap.sh   # oldest supported stack
#   LOCK= TORCH_SPEC=torch bash scripts/bootstrap.sh     # unpinned, e.g. on a GPU machine with its own torch
# TORCH_SPEC picks the torch build: the default is the CPU wheel (an unpinned torch would pull
# a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=${LOCK-requirements/lock.txt}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

pip_install() {  # quiet, but never hides a failure
    "$VENV/bin/python" -m pip install -q ${LOCK:+-c "$LOCK"} "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

# every install below goes through the lock (-c); an empty LOCK= is the explicit way out
[ -z "$LOCK" ] || [ -f "$LOCK" ] || { echo "bootstrap: lock file $LOCK not found (scripts/lock.sh writes it)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install --upgrade pip
pip_install "$TORCH_SPEC"
pip_install -e '.[test]'
"$VENV/bin/python" -c "import torch, transformers, moe_conformance; print('moe-conformance ready in $VENV: torch', torch.__version__, '/ transformers', transformers.__version__)"
