#!/usr/bin/env bash
# The conformance suite on a GPU machine: every arch, every family, --device cuda (fp32), then
# the bf16 production profile, then the bundled kernels natively in bf16, then (SESSIONS=layer) the
# MoE layer speed benchmark. Writes the reports
# and a summary into $OUT (default ./gpu-out).
#
#   OUT=/tmp/gpu-out bash benchmarks/gpu_suite_run.sh [ARCHS] [WORKERS]
#
# The GPU images lent here have torch and triton but an older transformers and no syrupy: put
# wheels in .whl/ first (`pip download --no-deps --only-binary=:all: --python-version 3.12 ...
# transformers==5.24.0 syrupy==7.0.2 regex==...`, see benchmarks/results/gpu_suite_run.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
ARCHS=${1:-all}
WORKERS=${2:-8}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
# an interpreter left on by the image or a parent shell would run every Triton kernel on GPU tensors
# under the interpreter (seen once: all kernel checks failed); the run records and clears it
TRITON_ENV=$(env | grep '^TRITON' | tr '\n' ' ')
unset TRITON_INTERPRET
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >> "$OUT/gpu.txt"
echo "TRITON_* in the environment before the run (cleared): ${TRITON_ENV:-none}" >> "$OUT/gpu.txt"
run() {  # run NAME ARGS...: one pytest session, its reports under $OUT/NAME
    local name=$1; shift
    local start=$(date +%s)
    python3 -m pytest -p moe_conformance.pytest_plugin -p no:cacheprovider -q --device cuda --arch "$ARCHS" \
        --report-dir "$OUT/$name" -n "$WORKERS" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc $rc, $(( $(date +%s) - start )) s: $(tail -1 "$OUT/$name.log")" | tee -a "$OUT/summary.txt"
    # packed per session, so a run cut short by a time limit still brings back what finished
    tar -C "$OUT" -czf "$OUT/$name.tgz" "$name" 2>/dev/null && rm -rf "${OUT:?}/$name"
}
SESSIONS=${SESSIONS:-fp32 bf16 kernels}
for session in $SESSIONS; do
    case $session in
        fp32) run fp32 ;;
        bf16) run bf16 --dtype bf16 ;;
        kernels) run kernels --family kernels --kernels triton,torch ;;
        layer)  # the MoE layer speed benchmark (benchmarks/results/gpu_moe_layer.md)
            mkdir -p "$OUT/layer"
            python3 benchmarks/gpu_moe_layer.py --out "$OUT/layer" --skip-checks > "$OUT/layer.log" 2>&1
            echo "layer: rc $?" | tee -a "$OUT/summary.txt"
            tar -C "$OUT" -czf "$OUT/layer.tgz" layer && rm -rf "${OUT:?}/layer" ;;
    esac
done
