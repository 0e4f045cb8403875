#!/usr/bin/env bash
# One call on a lent GPU: the kernel tests at GPU sizes, then the benchmark (benchmarks/gpu_bench.py).
# Logs and results go to $OUT (the device tool's output folder; benchmarks/results otherwise).
# The time limits (TEST_TIMEOUT, 90 s for the demo, BENCH_TIMEOUT seconds) sum to under the device
# tool's 600 s per call; the benchmark saves its results after every step, so a cut-short run still
# reports.
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout "${TEST_TIMEOUT:-210}" python3 -m pytest -q -p no:cacheprovider -n 8 -rs tests/kernels 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -30
# apart: the CLI needs typer, which a bare GPU image may lack (a collection error must not stop the rest)
# (the demo first: a calibration that compiles many kernels may use up the rest of the 90 s)
timeout 90 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cli.py::test_demo_builtin_runs_on_the_gpu \
    tests/test_cli.py::test_calibrate_on_the_gpu 2>&1 \
    | tee "$OUT/pytest_gpu_demo.log" | tail -5
timeout "${BENCH_TIMEOUT:-280}" python3 benchmarks/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
