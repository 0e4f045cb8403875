"""Run the fused forward a few times at one size, for a profiler (benchmarks/profile_gpu.sh).

    python benchmarks/profile_gpu.py [--n 65536] [--chunk 256] [--causal] [--fused]

B = 1, H = 32, d = 128, bf16, default tiles. Nothing is timed here: Nsight Compute measures the
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
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to profile")
        return 0
    q, k, v = (torch.randn(1, 32, args.n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cfg = default_launch(args.chunk, 128, q.dtype)
    cfg = LaunchConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, fused=args.fused)
    for _ in range(3):
        mta_forward_triton(q, k, v, None, chunk_size=args.chunk, causal=args.causal, launch=cfg)
    torch.cuda.synchronize()
    print(f"ran n={args.n} c={args.chunk} causal={args.causal} {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
