"""CPU benchmark of torch.ops.mta.attention against SDPA and against the stock-SDPA composition.

Providers (each timed in this process, peak memory measured in a fresh subprocess):
- ``sdpa``: exact ``scaled_dot_product_attention`` (the baseline every ratio is taken against);
- ``composition``: the same MTA math (L = 1, no sinks, no top-k) assembled from stock SDPA on
  reshaped chunks with the chunk summaries expanded per chunk and an additive mask: the
  prototype the op has to beat;
- ``mta``: ``torch.ops.mta.attention``.

    python benchmarks/bench_cpu_op.py                 # n ∈ {1024, 4096, 16384}, H = 8, d = 64
    python benchmarks/bench_cpu_op.py --n 4096 --repeats 5
    python benchmarks/bench_cpu_op.py --layout transposed   # q, k, v as models pass them

``--layout transposed``: every provider gets q, k, v as [B, n, H, d] buffers viewed as [B, H, n, d]
(what transformers' and diffusers' attention hands SDPA); the default is contiguous [B, H, n, d].

Prints a table and writes benchmarks/results/cpu_op_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite  # noqa: E402,F401
from mta_rewrite.timing import best_ms, cpu_name, reset_peak_rss, status_kib  # noqa: E402

NEG = -1.0e30


def composition(q, k, v, c, causal):
    """MTA (L=1) from stock SDPA: per chunk, keys = [own chunk; every chunk summary]."""
    B, H, n, d = q.shape
    nc = n // c
    qc, kc, vc = (x.view(B, H, nc, c, d) for x in (q, k, v))
    kbar, vbar = kc.mean(3), vc.mean(3)
    keys = torch.cat([kc, kbar.unsqueeze(2).expand(B, H, nc, nc, d)], dim=3)
    vals = torch.cat([vc, vbar.unsqueeze(2).expand(B, H, nc, nc, d)], dim=3)
    i = torch.arange(nc).view(nc, 1)
    summary_ok = (i > torch.arange(nc)) if causal else (i != torch.arange(nc))
    own = torch.ones(c, c, dtype=torch.bool).tril() if causal else torch.ones(c, c, dtype=torch.bool)
    allowed = torch.cat([own.expand(nc, c, c), summary_ok.view(nc, 1, nc).expand(nc, c, nc)], dim=2)
    bias = torch.cat([torch.zeros(c), torch.full((nc,), math.log(c))])
    mask = torch.where(allowed, bias, NEG)
    return F.scaled_dot_product_attention(qc, keys, vals, attn_mask=mask).reshape(B, H, n, d)


def provider_fn(name, q, k, v, c, causal):
    if name == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if name == "composition":
        return lambda: composition(q, k, v, c, causal)
    return lambda: torch.ops.mta.attention(q, k, v, chunk_size=c, causal=causal)


def inputs(n, heads, d, layout="contiguous"):
    g = torch.Generator().manual_seed(0)
    if layout == "transposed":
        return [torch.randn(1, n, heads, d, generator=g).transpose(1, 2) for _ in range(3)]
    return [torch.randn(1, heads, n, d, generator=g) for _ in range(3)]


def measure_peak_mib(name, n, heads, d, c, causal, layout="contiguous"):
    """Peak resident-memory growth of one call (Linux): reset the high-water mark, call, read it."""
    warm = inputs(4 * c, heads, d)  # first-call costs (lazy imports, thread pools) are not the op's
    provider_fn(name, *warm, c, causal)()
    q, k, v = inputs(n, heads, d, layout)
    fn = provider_fn(name, q, k, v, c, causal)
    reset_peak_rss()
    before = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - before) / 1024


def peak_memory_mib(name, n, heads, d, c, causal, layout="contiguous"):
    """measure_peak_mib in a fresh process, so that memory freed by earlier calls cannot hide it."""
    code = ("import sys; sys.path.insert(0, %r); import bench_cpu_op as b; print(b.measure_peak_mib(%r, %d, %d, %d, %d, "
            "%r, %r))" % (str(Path(__file__).parent), name, n, heads, d, c, causal, layout))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layout", choices=["contiguous", "transposed"], default="contiguous",
                    help="q, k, v as contiguous [B, H, n, d] or as models pass them: [B, n, H, d] transposed")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--label", default="", help="suffix for the result files (e.g. the allocator setting)")
    args = ap.parse_args(argv)

    cpu = cpu_name()
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    machine = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}" + (f", {malloc}" if malloc else "")
    rows = []
    for n in args.n:
        c = 1 << round(math.log2(math.sqrt(n)))
        q, k, v = inputs(n, args.heads, args.head_dim, args.layout)
        for causal in (False, True):
            row = {"n": n, "chunk_size": c, "mode": "causal" if causal else "full"}
            for name in ("sdpa", "composition", "mta"):
                reps = 1 if name == "sdpa" and n >= 8192 else args.repeats
                row[f"{name}_ms"] = best_ms(provider_fn(name, q, k, v, c, causal), reps)
                if not args.no_memory:
                    row[f"{name}_peak_mib"] = peak_memory_mib(name, n, args.heads, args.head_dim, c, causal, args.layout)
            # the composition computes the same function: a cheap cross-check of the benchmark
            diff = (provider_fn("composition", q, k, v, c, causal)() - provider_fn("mta", q, k, v, c, causal)()).abs().max()
            row["mta_vs_composition_max_abs_diff"] = float(diff)
            row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["mta_ms"]
            row["composition_speedup_vs_sdpa"] = row["sdpa_ms"] / row["composition_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    head = "| n | c | mode | SDPA ms | composition ms | MTA ms | MTA / SDPA | composition / SDPA | peak RSS growth MiB SDPA / comp. / MTA |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        mem = " / ".join(f"{r.get(f'{p}_peak_mib', float('nan')):.0f}" for p in ("sdpa", "composition", "mta"))
        lines.append(
            f"| {r['n']} | {r['chunk_size']} | {r['mode']} | {r['sdpa_ms']:.1f} | {r['composition_ms']:.1f} | "
            f"{r['mta_ms']:.1f} | {r['speedup_vs_sdpa']:.1f}× | {r['composition_speedup_vs_sdpa']:.1f}× | {mem} |"
        )
    table = "\n".join(lines)
    shape = f"B=1, H={args.heads}, d={args.head_dim}, fp32, {args.layout} q, k, v"
    print(f"\n{shape}; {machine}\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat() + (f"_{args.label}" if args.label else "")
    meta = {"date": stamp, "machine": machine, "heads": args.heads, "head_dim": args.head_dim, "layout": args.layout,
            "rows": rows}
    (args.out / f"cpu_op_{stamp}.json").write_text(json.dumps(meta, indent=2) + "\n")
    (args.out / f"cpu_op_{stamp}.md").write_text(f"{stamp}, {machine}, {shape}\n\n{table}\n")


if __name__ == "__main__":
    main()
