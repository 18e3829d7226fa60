#!/usr/bin/env bash
# The GPU check, run from the repository root on a lent GPU machine (no network, vLLM absent,
# /opt/torch/.venv with torch 2.11 + CUDA 13): installs vLLM 0.26.0 from the offline bundle and
# this checkout, then runs the GPU tests and the speed table, writing everything under $OUT.
#
#   STAGE=tests bash benchmarks/gpu_check.sh      # pytest -m gpu (LLaDA 2.x skipped)
#   STAGE=bench bash benchmarks/gpu_check.sh      # benchmarks/gpu.py --shape 8b
#   MOE_ADDON=1 STAGE=moe bash benchmarks/gpu_check.sh
#       # a later call on the same warm machine: unpacks the fused-MoE kernels over the installed
#       # vLLM, then runs the LLaDA 2.x GPU tests and the speed table's prefill row
#
# Files it needs, in .gpu/ (git-ignored; name it in the call's `carry`, 64 MiB per call):
#   .gpu/vllm026.tar.xz   the vLLM bundle (about 47 MiB; see benchmarks/README.md)
#   .gpu/wheels/*.whl     pytest and its pure-Python dependencies, which the bundle lacks
#   .gpu/moe.tar.xz       the fused-MoE add-on (about 14 MiB), for the MOE_ADDON call only
set -euo pipefail
OUT=${OUT:-/tmp/gpu-check}
STAGE=${STAGE:-tests}
mkdir -p "$OUT"
PY=/opt/torch/.venv/bin/python3
SP=$($PY -c 'import site; print(site.getsitepackages()[0])')
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

if ! $PY -c 'import vllm' 2>/dev/null; then
    mkdir -p /tmp/b
    tar xJf .gpu/vllm026.tar.xz -C /tmp/b
    $PY -m pip install -q --no-index --no-deps --no-compile /tmp/b/wheels/*.whl
    cp -r /tmp/b/vllm /tmp/b/vllm-0.26.0.dist-info "$SP"/
fi
if [ -d .gpu/wheels ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile .gpu/wheels/*.whl
fi
$PY -m pip install -q --no-deps --no-build-isolation -e .
if [ "${MOE_ADDON:-0}" = 1 ]; then
    tar xJf .gpu/moe.tar.xz -C "$SP"
fi
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
$PY -c 'import vllm, vllm._C_stable_libtorch, torch; print("vllm", vllm.__version__,
"torch", torch.__version__, torch.cuda.get_device_name())' | tee "$OUT/versions.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

case "$STAGE" in
tests)
    $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py \
        --junitxml="$OUT/pytest-gpu.xml" -k "not llada2" || echo "pytest exit $?"
    ;;
bench)
    $PY benchmarks/gpu.py --shape 8b --out "$OUT/gpu" \
        --sections cache batching overhead floor prefill || echo "gpu.py exit $?"
    ;;
moe)
    $PY -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py \
        --junitxml="$OUT/pytest-gpu-moe.xml" -k "llada2" || echo "pytest exit $?"
    $PY benchmarks/gpu.py --shape 8b --out "$OUT/gpu-prefill" --sections prefill \
        || echo "gpu.py exit $?"
    ;;
*)
    echo "STAGE must be tests, bench or moe, got $STAGE" >&2
    exit 2
    ;;
esac
