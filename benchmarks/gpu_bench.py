"""GPU benchmark: SDPA (flash, cuDNN) vs the fused MTA kernel, one prepared run on a lent GPU.

    python benchmarks/gpu_bench.py [--n 4096 16384 65536 131072] [--chunks 64 128 256] [--out DIR]

B = 1, H = 32, d = 128, bf16, causal and not. Steps, in one process:

1. the copy rate (device-to-device, bytes read + written), which sets the memory floor: q, k, v
   read and the output written once;
2. a sweep of the kernel's tile sizes (BLOCK_M, BLOCK_N, warps, stages) at 64K causal for each
   chunk size, against the default choice (``default_launch``);
3. for each n and mode: median ms of SDPA with the flash and cuDNN backends and of
   ``torch.ops.mta.attention`` (L = 1, no sinks, no top-k) at each chunk size with the default
   tiles and with the sweep's best, the fraction of the memory floor reached, and (n ≤ 16K) the
   relative error against the portable implementation in fp32;
4. extras at 64K causal, c = 128: the summary pre-pass alone, L = 2 + sinks + top-k, GQA (8 kv heads).

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median). Writes
gpu_<date>.{json,md} to --out (default benchmarks/results/). Needs a CUDA GPU (skips cleanly
without one).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite  # noqa: E402,F401
from mta_rewrite.ops import mta_attention_chunked  # noqa: E402

SWEEP = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 4, 3), (128, 64, 4, 3),
         (64, 64, 4, 3), (64, 128, 4, 2), (64, 64, 4, 4), (64, 32, 4, 3)]


def median_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_rate_bytes_per_ms():
    x = torch.randn(1 << 28, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / median_ms(lambda: y.copy_(x))


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sweep-n", type=int, default=65536)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mta_rewrite.kernels.mta_fwd import LaunchConfig, _chunk_means, default_launch, mta_forward_triton

    t_start = time.time()
    gpu = torch.cuda.get_device_name()
    rate = copy_rate_bytes_per_ms()
    H, d = args.heads, args.head_dim
    head = (f"{dt.date.today().isoformat()}, {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
            f"B=1, H={H}, d={d}, bf16; copy rate {rate / 1e9:.2f} TB/s")
    print(head, flush=True)

    def qkv(n, hkv=H, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return [torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (H, hkv, hkv)]

    # 2. tile sweep
    sweep = {}
    q, k, v = qkv(args.sweep_n)
    for c in args.chunks:
        default = default_launch(c, d, torch.bfloat16)
        cands = {default} | {LaunchConfig(*s) for s in SWEEP if s[0] <= max(16, triton.next_power_of_2(c))}
        res = []
        for cfg in sorted(cands, key=lambda x: (x.block_m, x.block_n, x.num_warps, x.num_stages)):
            try:
                ms = median_ms(lambda: mta_forward_triton(q, k, v, None, chunk_size=c, causal=True, launch=cfg))
            except Exception as exc:  # noqa: BLE001 - a tile choice the compiler rejects (shared memory)
                print(f"sweep c={c} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
                continue
            res.append({"config": list(cfg.__dict__.values()), "ms": ms, "default": cfg == default})
            print(f"sweep n={args.sweep_n} causal c={c} {cfg}: {ms:.3f} ms{' (default)' if cfg == default else ''}", flush=True)
        best = min(res, key=lambda r: r["ms"])
        sweep[c] = {"results": res, "best": best}
    q = k = v = None

    # 3. main table
    floor = {}
    rows = []
    for n in args.n:
        q, k, v = qkv(n)
        floor_ms = 4 * q.numel() * q.element_size() / rate
        floor[n] = floor_ms
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
                out = torch.ops.mta.attention(q, k, v, **kw)
                assert torch.isfinite(out).all(), f"non-finite output at n={n} c={c} causal={causal}"
                if n <= 16384:
                    row[f"mta_c{c}_rel_err"] = rel_err(out, mta_attention_chunked(q.float(), k.float(), v.float(), **kw))
                out = None
                row[f"mta_c{c}_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, **kw))
                best = LaunchConfig(*sweep[c]["best"]["config"]) if c in sweep else None
                if best is not None and best != default_launch(c, d, q.dtype):
                    row[f"mta_c{c}_best_tiles_ms"] = median_ms(
                        lambda: mta_forward_triton(q, k, v, None, launch=best, **kw))
            rows.append(row)
            print(json.dumps(row), flush=True)
        q = k = v = None
        torch.cuda.empty_cache()

    # 4. extras at 64K causal, c = 128
    extras = {}
    if 65536 in args.n and 128 in args.chunks:
        n, c = 65536, 128
        q, k, v = qkv(n)
        nc = n // c
        counts = torch.empty(1, nc, device="cuda")
        extras["summary_prepass_ms"] = median_ms(lambda: _chunk_means(k, v, None, c, nc, 0, 1.0, counts))
        kw = dict(chunk_size=c, causal=True, local_chunks=2, sinks=4, top_k=2)
        extras["L2_sinks4_topk2_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, **kw))
        q, k, v = qkv(n, hkv=8)
        extras["gqa_8kv_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, chunk_size=c, causal=True))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            try:
                extras["gqa_8kv_sdpa_cudnn_ms"] = median_ms(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            except RuntimeError as exc:
                extras["gqa_8kv_sdpa_cudnn_error"] = str(exc).splitlines()[0]
        q = k = v = None
        print(json.dumps(extras), flush=True)

    def cell(ms, ref):
        return f"{ms:.3f}" + (f" ({ref / ms:.1f}×)" if ref else "")

    lines = ["| n | mode | SDPA flash ms | SDPA cuDNN ms | memory floor ms | "
             + " | ".join(f"MTA c={c} ms (× cuDNN)" for c in args.chunks) + " | best MTA: % of floor |",
             "|---|---|---|---|---|" + "---|" * len(args.chunks) + "---|"]
    for r in rows:
        cud = r.get("sdpa_cudnn_ms")
        cells = [cell(r[f"mta_c{c}_ms"], cud) for c in args.chunks]
        best_ms = min(r[f"mta_c{c}_ms"] for c in args.chunks)
        fl = f"{r['sdpa_flash_ms']:.3f}" if r.get("sdpa_flash_ms") else "—"
        cu = f"{cud:.3f}" if cud else "—"
        lines.append(f"| {r['n']} | {r['mode']} | {fl} | {cu} | {r['memory_floor_ms']:.3f} | " + " | ".join(cells)
                     + f" | {100 * r['memory_floor_ms'] / best_ms:.0f}% |")
    table = "\n".join(lines)
    sweep_lines = [f"c={c}: default {[r for r in s['results'] if r['default']][0]['ms']:.3f} ms, best {s['best']['ms']:.3f} ms "
                   f"(BLOCK_M, BLOCK_N, warps, stages = {tuple(s['best']['config'])})" for c, s in sweep.items()]
    text = (f"{head}\n\n{table}\n\nTile sweep at n={args.sweep_n}, causal:\n" + "\n".join(sweep_lines)
            + f"\n\nExtras (64K causal, c=128): {json.dumps(extras)}\n")
    print("\n" + text)
    print(f"bench wall time {time.time() - t_start:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat()
    payload = {"head": head, "rows": rows, "sweep": {str(c): s for c, s in sweep.items()}, "extras": extras}
    (args.out / f"gpu_{stamp}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / f"gpu_{stamp}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
