"""One layer's decoding step with MTA against SDPA over the cache (CPU), SmolLM2's attention shape.

    python benchmarks/bench_decode_step.py [--n 2048 8192 32768] [--repeats 30] [--tag T]

q [1, 9, 1, 64] (9 query heads), k, v [1, 3, n, 64] (3 key/value heads), float32, random values.
Variants, timed in turn in one process (``timing.best_alternating_ms``: the best of --repeats
rounds), each a step at position n − 1 with its sums from the step before (what ``use_mta(...,
decode=True)`` keeps on the cache between steps): fixed chunks ``c=128 L=2 s=4`` with top_k 0 and
2 (``ops.decode.decode_step``), and with top_k 0 a soft-cap of 50 (Gemma-2's) or learned sink
logits (GPT-OSS's: one more token before the sequence, the cache read one position back); head
groups, 6 heads ``c=128`` + 3 heads ``c=64``, and 8 heads
``c=128`` + 1 exact (``grouped_decode_step``); boundary chunks, segments of ~33 tokens (token ids
drawn from 100, three of them separators) cut to at most 128, top_k 0 and 2
(``boundary_decode_step``), and the per-step work they share across layers (segment ids and chunk
bounds of the whole sequence); SDPA over the cache (``enable_gqa``). Writes
benchmarks/results/decode_step_<date>[_<tag>].{json,md}.
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
from mta_rewrite.config import MTAConfig  # noqa: E402
from mta_rewrite.ops.decode import boundary_decode_step, decode_step, grouped_decode_step  # noqa: E402
from mta_rewrite.ops.segments import chunk_bounds  # noqa: E402
from mta_rewrite.passes.lower import segment_ids_from_separators  # noqa: E402
from mta_rewrite.timing import best_alternating_ms, cpu_machine, results_name, save_results  # noqa: E402

SEPARATORS = (1, 2, 3)


def variants(n: int) -> dict:
    """name → a call doing one step (its sums from the step before prepared here)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 64, generator=g)
    k, v = (torch.randn(1, 3, n, 64, generator=g) for _ in range(2))
    tokens = torch.randint(0, 100, (1, n), generator=g)
    bounds = chunk_bounds(segment_ids_from_separators(tokens, SEPARATORS), 1, 128, 4)
    calls = {}
    for top_k in (0, 2):
        config = MTAConfig(128, 2, 4, top_k)
        _, sums = decode_step(q, k, v, None, n - 1, config)
        calls[f"fixed c=128 L=2 s=4 k={top_k}"] = lambda config=config, sums=sums: decode_step(
            q, k, v, None, n, config, None, sums)
    plain, sink = MTAConfig(128, 2, 4, 0), torch.randn(9, generator=g)
    # (with sink logits position n is n + 1, the first of a chunk, whose step sums the chunk that left
    # the window, as one step in c does: its step is at n − 1, as the others' a step that sums nothing)
    for name, extra, at in (("soft-cap 50", dict(softcap=50.0), n), ("sink logits", dict(sink_logit=sink), n - 1)):
        _, sums = decode_step(q, k, v, None, at - 1, plain, **extra)
        calls[f"fixed c=128 L=2 s=4 k=0, {name}"] = lambda sums=sums, extra=extra, at=at: decode_step(
            q, k, v, None, at, plain, None, sums, **extra)
    for name, groups in (("head groups 6 × c=128 + 3 × c=64", ((MTAConfig(128, 2, 4, 0), tuple(range(6))),
                                                                 (MTAConfig(64, 2, 4, 0), (6, 7, 8)))),
                         ("head groups 8 × c=128 + 1 exact", ((MTAConfig(128, 2, 4, 0), tuple(range(8))),
                                                               (None, (8,))))):
        _, sums = grouped_decode_step(q, k, v, None, n - 1, groups)
        calls[name] = lambda groups=groups, sums=sums: grouped_decode_step(q, k, v, None, n, groups, None, sums)
    for top_k in (0, 2):
        config = MTAConfig(128, 2, 4, top_k)
        _, sums = boundary_decode_step(q, k, v, None, n - 1, config, bounds)
        calls[f"boundary ≤128 L=2 s=4 k={top_k}"] = lambda config=config, sums=sums: boundary_decode_step(
            q, k, v, None, n, config, bounds, None, sums)
    calls["boundary: segments and bounds (once per step)"] = lambda: chunk_bounds(
        segment_ids_from_separators(tokens, SEPARATORS), 1, 128, 4)
    calls["SDPA over the cache"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    return calls, int(bounds.shape[1] - 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if min(args.n) < 1024 or args.repeats < 1:
        print("error: --n takes lengths of at least 1024, --repeats at least 1", file=sys.stderr)
        return 2
    rows = []
    with torch.no_grad():
        for n in args.n:
            calls, chunks = variants(n)
            ms = best_alternating_ms(calls, repeats=args.repeats)
            sdpa = ms["SDPA over the cache"]
            for name, value in ms.items():
                rows.append({"n": n, "variant": name, "ms": value, "vs_sdpa": sdpa / value, "boundary_chunks": chunks})
                print(json.dumps(rows[-1]), flush=True)
    date = dt.date.today().isoformat()
    machine = cpu_machine()
    lines = [f"# One layer's decoding step vs SDPA ({date}, {machine})", "",
             "`python benchmarks/bench_decode_step.py`: q [1, 9, 1, 64], k, v [1, 3, n, 64], float32, best of "
             f"{args.repeats} alternating rounds; \"vs SDPA\" > 1: faster than SDPA over the cache.", "",
             "| n | variant | ms | vs SDPA |", "|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['variant']} | {r['ms']:.3f} | {r['vs_sdpa']:.2f}× |" for r in rows]
    name, out = results_name("decode_step", args.tag), Path(__file__).resolve().parent / "results"
    save_results(out, name, rows, machine, "\n".join(lines))
    print(f"wrote {out / name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
