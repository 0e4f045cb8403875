"""GPU benchmark: SDPA (flash, cuDNN) vs the fused MTA kernel, one prepared run on a lent GPU.

    python benchmarks/gpu_bench.py [--n 4096 16384 65536 131072] [--chunks 64 128 256]

B = 1, H = 32, d = 128, bf16, causal and not. For each n: median ms of SDPA with the flash and
the cuDNN backends, and of ``torch.ops.mta.attention`` (fused Triton forward; L = 1, no sinks,
no top-k) at each chunk size, plus the fraction of the memory floor it reaches (q, k, v read and
the output written once at the copy rate measured in the same run). First a correctness check of
the kernel against the portable implementation at every size. Writes
benchmarks/results/gpu_<date>.{json,md}. Needs a CUDA GPU (skips cleanly without one).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite  # noqa: E402,F401
from mta_rewrite.ops import mta_attention_chunked  # noqa: E402


def median_ms(fn, repeats=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_rate_bytes_per_ms():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x), 10)
    return 2 * x.numel() / ms  # read + write


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gpu = torch.cuda.get_device_name()
    rate = copy_rate_bytes_per_ms()
    rows = []
    for n in args.n:
        q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        floor_ms = 4 * q.numel() * q.element_size() / rate
        for causal in (True, False):
            row = {"n": n, "mode": "causal" if causal else "full", "memory_floor_ms": floor_ms}
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        row[f"sdpa_{name}_ms"] = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                except RuntimeError as exc:
                    row[f"sdpa_{name}_ms"] = None
                    row[f"sdpa_{name}_error"] = str(exc).splitlines()[0]
            for c in args.chunks:
                kw = dict(chunk_size=c, causal=causal)
                if n <= 16384:  # correctness at the sizes where the portable path fits comfortably
                    ref = mta_attention_chunked(q.float(), k.float(), v.float(), **kw)
                    err = (torch.ops.mta.attention(q, k, v, **kw).float() - ref).abs().max().item()
                    row[f"mta_c{c}_max_err"] = err
                ms = median_ms(lambda: torch.ops.mta.attention(q, k, v, **kw))
                row[f"mta_c{c}_ms"] = ms
                row[f"mta_c{c}_floor_fraction"] = floor_ms / ms
            rows.append(row)
            print(json.dumps(row), flush=True)
        q = k = v = None  # free the GPU memory before the next size
        torch.cuda.empty_cache()
    lines = ["| n | mode | SDPA flash ms | SDPA cuDNN ms | " + " | ".join(f"MTA c={c} ms (× cuDNN, % of floor)" for c in args.chunks) + " |",
             "|---|---|---|---|" + "---|" * len(args.chunks)]
    for r in rows:
        cud = r.get("sdpa_cudnn_ms")
        cells = []
        for c in args.chunks:
            ms = r[f"mta_c{c}_ms"]
            speed = f"{cud / ms:.1f}×" if cud else "—"
            cells.append(f"{ms:.2f} ({speed}, {100 * r[f'mta_c{c}_floor_fraction']:.0f}%)")
        fl = f"{r['sdpa_flash_ms']:.2f}" if r.get("sdpa_flash_ms") else "—"
        cu = f"{cud:.2f}" if cud else "—"
        lines.append(f"| {r['n']} | {r['mode']} | {fl} | {cu} | " + " | ".join(cells) + " |")
    stamp = dt.date.today().isoformat()
    head = f"{stamp}, {gpu}, torch {torch.__version__}, B=1, H={args.heads}, d={args.head_dim}, bf16; copy rate {rate / 1e9:.2f} TB/s"
    table = "\n".join(lines)
    print(f"\n{head}\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_{stamp}.json").write_text(json.dumps({"head": head, "rows": rows}, indent=2) + "\n")
    (args.out / f"gpu_{stamp}.md").write_text(f"{head}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
