"""Run the fused forward a few times at one size, for a profiler (benchmarks/profile_gpu.sh).

    python benchmarks/profile_gpu.py [--n 65536] [--chunk 256] [--causal] [--fused [--chunk-major]]
                                     [--one-loop] [--tma] [--tiles M N WARPS STAGES] [--max-registers R]

B = 1, H = 32, d = 128, bf16, default tiles unless --tiles. The flags select the kernel variants of
``LaunchConfig`` (profile_gpu.sh passes its arguments on: ``bash benchmarks/profile_gpu.sh --tma
--tiles 128 32 8 3 --max-registers 128``). Nothing is timed here: Nsight Compute measures the
third launch of each kernel (the first two compile and warm up).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mta_rewrite.kernels.mta_fwd import LaunchConfig, default_launch, mta_forward_triton  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--chunk-major", action="store_true")
    ap.add_argument("--one-loop", action="store_true")
    ap.add_argument("--tma", action="store_true")
    ap.add_argument("--tiles", type=int, nargs=4, metavar=("M", "N", "WARPS", "STAGES"))
    ap.add_argument("--max-registers", type=int)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to profile")
        return 0
    q, k, v = (torch.randn(1, 32, args.n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    base = default_launch(args.chunk, 128, q.dtype)
    tiles = args.tiles or (base.block_m, base.block_n, base.num_warps, base.num_stages)
    cfg = LaunchConfig(*tiles, fused=args.fused, chunk_major=args.chunk_major, one_loop=args.one_loop, tma=args.tma,
                       max_registers=args.max_registers)
    for _ in range(3):
        mta_forward_triton(q, k, v, None, chunk_size=args.chunk, causal=args.causal, launch=cfg)
    torch.cuda.synchronize()
    print(f"ran n={args.n} c={args.chunk} causal={args.causal} {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
