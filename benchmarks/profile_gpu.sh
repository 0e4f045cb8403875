#!/usr/bin/env bash
# One call on a lent GPU: Nsight Compute on the fused forward (64K tokens, causal, c = 256, default
# tiles) and on its summary pre-pass, and the instruction mix of the compiled kernel (whether
# Triton used Hopper's wgmma: HGMMA in the SASS). Results go to $OUT. Arguments go to
# benchmarks/profile_gpu.py (kernel variant and tiles; causal always), e.g. --tma --tiles 128 32 8 3.
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SECTIONS="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
for k in _mta_fwd_kernel _chunk_mean_kernel; do
  timeout 120 ncu --clock-control none --kernel-name "$k" --launch-skip 2 --launch-count 1 $SECTIONS \
    python3 benchmarks/profile_gpu.py --causal "$@" 2>&1 | tee "$OUT/ncu$k.txt" | grep -E "Duration|Throughput|Pipe|Registers|Achieved Occupancy|Theoretical Occupancy|Shared Memory Config|Block Limit|Stall|One or More|Warp Cycles|Executed Ipc|Issue Slots|L2 Hit|L1/TEX Hit|Mem Busy|Max Bandwidth"
done
for f in $(find ~/.triton/cache -name "_mta_fwd_kernel.cubin" 2>/dev/null); do
  echo "$f: $(cuobjdump -sass "$f" | grep -cE 'HGMMA') HGMMA, $(cuobjdump -sass "$f" | grep -cE '\bHMMA') HMMA, $(cuobjdump -sass "$f" | grep -cE 'LDGSTS|UTMALDG') async copies, $(cuobjdump -sass "$f" | grep -cE 'LDL|STL') local-memory ops"
done | tee "$OUT/sass_summary.txt"
