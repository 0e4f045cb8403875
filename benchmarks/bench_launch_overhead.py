"""Host-side cost of the Triton launcher (``mta_forward_triton``) without a GPU.

    python benchmarks/bench_launch_overhead.py [--n 1024] [--calls 5000]

At small n the op is bound by the CPU work around its two kernel launches (1K tokens on the H100:
0.097 ms for the op against cuDNN's 0.036). This times that work on CPU tensors with both
kernels replaced by no-ops: argument checks, allocations, tile choice, stride packing; not
Triton's own launch (which needs a GPU driver) nor the custom-op dispatch. In the same run, for
scale: one call of ``triton.next_power_of_2`` (a constexpr-function wrapper in Triton ≥ 3.4) and
of ``torch.empty``. Microseconds per call, best of three rounds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls: int) -> float:
    for _ in range(min(200, calls)):
        fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--calls", type=int, default=5000)
    args = ap.parse_args(argv)
    try:
        import triton
    except ImportError:
        print("error: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    from mta_rewrite.kernels import mta_fwd

    mta_fwd._mta_fwd_kernel = mta_fwd._chunk_mean_kernel = _NoLaunch()
    q, k, v = (torch.randn(1, 32, args.n, 128, dtype=torch.bfloat16) for _ in range(3))
    rows = {
        "mta_forward_triton, kernels stubbed (c=64, causal)":
            per_call_us(lambda: mta_fwd.mta_forward_triton(q, k, v, None, chunk_size=64, causal=True), args.calls),
        "triton.next_power_of_2": per_call_us(lambda: triton.next_power_of_2(args.n), args.calls),
        "torch.empty (32 × 16 fp32)": per_call_us(lambda: torch.empty(1, 32, 16), args.calls),
    }
    print(f"host microseconds per call, torch {torch.__version__}, triton {triton.__version__}:")
    for name, us in rows.items():
        print(f"  {name}: {us:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
