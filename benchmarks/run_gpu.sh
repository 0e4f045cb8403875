#!/usr/bin/env bash
# One call on a lent GPU: the kernel tests at GPU sizes, then the benchmark (benchmarks/gpu_bench.py).
# Logs and results go to $OUT (the device tool's output folder; benchmarks/results otherwise).
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -n 8 -rs tests/kernels 2>&1 | tee "$OUT/pytest_gpu.log" | tail -30
timeout "${BENCH_TIMEOUT:-270}" python3 benchmarks/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
