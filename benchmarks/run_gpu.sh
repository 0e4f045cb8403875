#!/usr/bin/env bash
# One call on a lent GPU, in order of importance, within TOTAL seconds (the device tool allows 600
# per call, and a session's GPU time rarely leaves room for a second call):
#   1. the benchmark (benchmarks/gpu_bench.py) with --budget BENCH_BUDGET: the main table first, and
#      whatever it has no time left for is skipped and listed in its report;
#   2. the GPU tests at real sizes (tests/kernels, test names with "gpu");
#   3. the CLI's GPU tests (the demo and calibrate on the GPU);
#   4. the rest of tests/kernels, compiled for the GPU instead of run in the interpreter.
# Each stage gets the time left (no stage starts with less than 20 s). pytest runs with -v into its
# log, so that a stage cut short by its limit still says which tests passed or failed.
# Logs and results go to $OUT (the device tool's output folder; benchmarks/results otherwise).
set -o pipefail
OUT=${OUT:-benchmarks/results}
TOTAL=${TOTAL:-580}
BENCH_BUDGET=${BENCH_BUDGET:-280}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

left() { echo $(( TOTAL - SECONDS )); }
# stage LIMIT LOG COMMAND...: run COMMAND with at most LIMIT seconds (and no more than are left)
stage() {
    local limit=$1 log=$2 t
    shift 2
    t=$(left)
    (( limit < t )) && t=$limit
    if (( t < 20 )); then
        echo "== skipped (${t} s left): $*" | tee "$OUT/$log"
        return
    fi
    echo "== ${t} s: $*"
    timeout "$t" "$@" > "$OUT/$log" 2>&1
    echo "== exit $? after $(( SECONDS - start )) s (log $log)"
}
summary() {  # what a -v log says, even when its run was cut short
    echo "   passed $(grep -c ' PASSED' "$OUT/$1"), failed $(grep -c ' FAILED' "$OUT/$1"), errors $(grep -c ' ERROR' "$OUT/$1"), skipped $(grep -c ' SKIPPED' "$OUT/$1")"
    grep -E ' (FAILED|ERROR) ' "$OUT/$1" | head -20
    tail -3 "$OUT/$1"; echo
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

start=$SECONDS
stage $(( BENCH_BUDGET + 20 )) bench_gpu.log python3 benchmarks/gpu_bench.py --budget "$BENCH_BUDGET" --out "$OUT" "$@"
tail -45 "$OUT/bench_gpu.log"

start=$SECONDS
stage 200 pytest_gpu.log python3 -m pytest -v -p no:cacheprovider -n 8 -rs -k gpu tests/kernels
summary pytest_gpu.log

# apart: the CLI needs typer, which a bare GPU image may lack (a collection error must not stop the rest)
start=$SECONDS
stage 90 pytest_gpu_demo.log python3 -m pytest -v -p no:cacheprovider -rs tests/test_cli.py::test_demo_builtin_runs_on_the_gpu \
    tests/test_cli.py::test_calibrate_on_the_gpu tests/test_use_mta.py::test_use_mta_on_the_gpu \
    tests/ops/test_decode.py::test_a_step_on_cuda_is_the_reference_row \
    tests/ops/test_decode.py::test_a_boundary_step_on_cuda_is_the_reference_row
summary pytest_gpu_demo.log

start=$SECONDS
stage 600 pytest_gpu_rest.log python3 -m pytest -v -p no:cacheprovider -n 8 -rs -k "not gpu" tests/kernels
summary pytest_gpu_rest.log
echo "run_gpu.sh: ${SECONDS} s"
