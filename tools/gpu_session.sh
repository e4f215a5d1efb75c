#!/usr/bin/env bash
# What a session lent a GPU runs (issue 6, 7): build with the box's own python and torch, the GPU tests, then
# the GPU benchmarks. One step per call, each well under the device tool's 10-minute limit:
#
#   bash tools/gpu_session.sh build      # pip install -e . (no deps, no isolation) + sm_90 compile check
#   bash tools/gpu_session.sh test       # Triton kernels, models and CUDA-graph replay on the GPU
#   bash tools/gpu_session.sh decode     # GPT-2 decode: HF eager / HF static cache + compile / ours
#   bash tools/gpu_session.sh kernels    # per-kernel (Triton vs cuBLAS/SDPA) and DCGAN benchmarks
#
# Logs and result files go to $OUT (the device tool brings that folder back) and bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export AIGC_RT_GPU=1 TRITON_INTERPRET=0

case "${1:-}" in
  build)
    $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/gpu_build.log" 2>&1 || { tail -30 "$OUT/gpu_build.log"; exit 1; }
    nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv | tee "$OUT/gpu_device.txt"
    $PY tools/compile_triton_kernels.py | tee "$OUT/gpu_compile.txt"
    ;;
  test)
    $PY -m pytest -q -ra tests/test_triton_kernels.py tests/test_triton_model.py tests/test_triton_conv_transpose.py \
      tests/test_gpu_decode_bench.py 2>&1 | tee "$OUT/gpu_tests.txt"
    ;;
  decode)
    $PY bench/gpu_decode.py --sizes "${SIZES:-124M,355M,774M,1.5B}" --batches "${BATCHES:-1,8}" 2>&1 | tee "$OUT/gpu_decode.txt"
    cp bench/results/gpu_decode-* "$OUT/" 2>/dev/null || true
    ;;
  kernels)
    $PY -m pytest -q bench/bench_triton.py bench/bench_gan.py --benchmark-enable 2>&1 | tee "$OUT/gpu_kernels.txt"
    cp bench/results/*.md "$OUT/" 2>/dev/null || true
    ;;
  *)
    echo "usage: bash tools/gpu_session.sh build|test|decode|kernels" >&2
    exit 2
    ;;
esac
