#!/usr/bin/env bash
# One call on a lent GPU machine (no TVM there): check and time the kernels that
# `python benchmarks/kernel_speed.py --device cuda --prepare .devbundle` built here.
# Usage (device tool): bash scripts/device_cuda.sh   with .devbundle carried; results land in $OUT.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/benchmarks
export SQC_CUDA_BUNDLE=$PWD/.devbundle SQC_CUDA_ARTIFACT=$PWD/.devbundle/tiny-llama SQC_CACHE_DIR=/tmp/sqc-cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader
python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/codegen/test_cuda_kernels.py \
    -k "reference_op or artifact_runs or chunk_layout or import_sqc or tune_gpu" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
timeout 300 python3 benchmarks/kernel_speed.py --device cuda --bundle .devbundle \
    --out "$OUT/kernels_cuda.json" --plan-out "$OUT/kernels_cuda_plan.json" 2>&1 | tee "$OUT/bench.log" | tail -45
