#!/usr/bin/env bash
# One call on a lent GPU machine (no TVM there), run from the repository root by the device tool.
# Prepare here first (TVM + nvcc), then carry the folders:
#   python benchmarks/kernel_speed.py --device cuda --prepare .devbundle     # kernels: every candidate + tiny-llama
#   python benchmarks/e2e_cuda.py --prepare .e2ebundle --arch sm_90          # end to end: default kernels
# Usage: bash scripts/device_cuda.sh [tests] [kernels] [e2e]   (default: all three, in that order)
#   tests:   the GPU tests (kernels vs the reference op, the artifact, generate through the op + CUDA graph)
#   kernels: benchmarks/kernel_speed.py --device cuda (every candidate timed, winners vs cuBLAS fp16)
#   e2e:     benchmarks/e2e_cuda.py (SmolLM2-shaped and LLaMA-7B-shaped decode vs torch fp16)
# Results and logs land in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
export SQC_CUDA_BUNDLE=$PWD/.devbundle SQC_CUDA_ARTIFACT=$PWD/.devbundle/tiny-llama SQC_CACHE_DIR=/tmp/sqc-cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
stages=${*:-tests kernels e2e}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
for stage in $stages; do
  case $stage in
    tests)
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/codegen/test_cuda_kernels.py \
          tests/runtime/test_cuda_op.py tests/runtime/test_decode_device.py \
          -k "reference_op or artifact_runs or chunk_layout or import_sqc or tune_gpu or cuda_op or device" \
          2>&1 | tee "$OUT/pytest_gpu.log" | tail -25 ;;
    kernels)
      timeout 300 python3 benchmarks/kernel_speed.py --device cuda --bundle .devbundle \
          --out "$OUT/kernels_cuda.json" --plan-out "$OUT/kernels_cuda_plan.json" 2>&1 | tee "$OUT/bench.log" | tail -45 ;;
    e2e)
      timeout 420 python3 benchmarks/e2e_cuda.py --bundle .e2ebundle --out "$OUT/e2e_cuda.json" 2>&1 \
          | tee "$OUT/e2e.log" | tail -30 ;;
    *) echo "unknown stage $stage (tests, kernels, e2e)"; exit 2 ;;
  esac
done
