"""Fixed chunks on the CPU, chunk by chunk (``ops/chunked.py``) against query blocks
(``ops/varlen.py`` with fixed chunks): the measurement behind ``ops.varlen.blocks_beat_chunks``,
the rule by which the op picks between them.

The chunk-by-chunk implementation builds one key set per chunk, nc·(L·c + sinks + nc) rows of k
and v: quadratic in the number of chunks, so small chunks at long sequences leave the caches (and
at c = 8, 16K tokens, take gigabytes). Query blocks of 64–128 tokens build one per block.

    python benchmarks/bench_query_blocks.py [--n 2048 4096 16384] [--chunks 8 16 32 64] [--repeats 5] [--tag T]

One SmolLM2-shaped layer (9 query / 3 key-value heads, d = 64, fp32, L = 1, sinks = 4), causal
and not; ms best of --repeats for each, alternating, and the ratio blocks / chunks at each block
size. Writes benchmarks/results/query_blocks_<date>[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mta_rewrite.ops.chunked import mta_attention_chunked  # noqa: E402
from mta_rewrite.ops.varlen import blocks_beat_chunks, mta_attention_varlen  # noqa: E402
from mta_rewrite.timing import best_alternating_ms, cpu_machine, results_name, save_results  # noqa: E402

BLOCKS = (32, 64, 128)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 16384])
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    rows = []
    with torch.no_grad():
        for n in args.n:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, h, n, 64, generator=g) for h in (9, 3, 3))
            for c in args.chunks:
                for causal in (True, False):
                    kw = dict(chunk_size=c, causal=causal, local_chunks=1, sinks=4)
                    runs = {"chunks": lambda: mta_attention_chunked(q, k, v, None, **kw)}
                    for b in BLOCKS:
                        runs[f"blocks{b}"] = lambda b=b: mta_attention_varlen(q, k, v, None, None, block=b, **kw)
                    best = best_alternating_ms(runs, args.repeats)
                    row = {"n": n, "chunk_size": c, "causal": causal, "rule_picks_blocks": blocks_beat_chunks(c, n),
                           **{f"{name}_ms": ms for name, ms in best.items()}}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    machine = cpu_machine()
    stamp = dt.date.today().isoformat()
    lines = [f"{stamp}, {machine}. Fixed chunks, one layer (9/3 heads, d = 64, fp32, L = 1, sinks = 4), ms best of "
             f"{args.repeats} alternating; blocks / chunks at query blocks of {', '.join(map(str, BLOCKS))}; "
             "'rule': what ``ops.varlen.blocks_beat_chunks`` picks.", "",
             "| n | c | causal | chunk by chunk (ms) | " + " | ".join(f"blocks of {b}" for b in BLOCKS) + " | rule |",
             "|---|---|---|---|" + "---|" * len(BLOCKS) + "---|"]
    for r in rows:
        ratios = " | ".join(f"{r[f'blocks{b}_ms'] / r['chunks_ms']:.2f}" for b in BLOCKS)
        lines.append(f"| {r['n']} | {r['chunk_size']} | {'yes' if r['causal'] else 'no'} | {r['chunks_ms']:.1f} | "
                     f"{ratios} | {'blocks' if r['rule_picks_blocks'] else 'chunks'} |")
    text = "\n".join(lines)
    print("\n" + text)
    save_results(args.out, results_name("query_blocks", args.tag), rows, machine, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
