"""One attention layer of a real model's shape on the CPU: torch.ops.mta.attention at the
configurations the model benchmarks use, against exact SDPA in the same run.

Shapes (fp32, batch 1):
- ``smollm2``: SmolLM2-135M's layer, 9 query / 3 key-value heads, d = 64, causal;
- ``minilm``: all-MiniLM-L6-v2's layer, 12 heads, d = 32, not causal.

Configurations ``c/L/sinks/top_k``: those of the SmolLM2 table in docs/results.md (c=128 L=2 s=4 k=2,
c=64 L=4 s=4 k=8, c=256 L=2 s=4 k=2) and c=128 L=2 s=4 without top-k.

``--ablate-bands`` also times each configuration with the bands' memory bound lifted
(``ops.chunked._BAND_BYTES`` unbounded: one band, the whole key set, without causality; the 8
summary bands with it), in the same rounds, to show what the memory-bounded bands buy.

    python benchmarks/bench_cpu_layer.py [--shapes smollm2 minilm] [--n 2048 4096 8192] [--repeats 3] [--ablate-bands] [--tag T]

ms best of --repeats, the functions called in turn each round; writes
benchmarks/results/cpu_layer_<date>[_<tag>].{json,md}.
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
import mta_rewrite  # noqa: E402,F401  (registers torch.ops.mta.attention)
import mta_rewrite.ops.chunked as chunked  # noqa: E402
from mta_rewrite.config import atomic_write_text  # noqa: E402
from mta_rewrite.timing import best_alternating_ms, cpu_name  # noqa: E402

SHAPES = {  # name: (query heads, key/value heads, head dim, causal)
    "smollm2": (9, 3, 64, True),
    "minilm": (12, 12, 32, False),
}
CONFIGS = [(128, 2, 4, 2), (64, 4, 4, 8), (256, 2, 4, 2), (128, 2, 4, 0)]


def _label(cfg) -> str:
    c, L, s, k = cfg
    return f"c={c} L={L} s={s} k={k}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["smollm2", "minilm"])
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ablate-bands", action="store_true", help="also time the bands' memory bound lifted")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    banded = chunked._BAND_BYTES
    rows = []
    with torch.no_grad():
        for shape in args.shapes:
            Hq, Hkv, d, causal = SHAPES[shape]
            for n in args.n:
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(1, h, n, d, generator=g) for h in (Hq, Hkv, Hkv))
                runs = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=Hq != Hkv)}
                for cfg in CONFIGS:
                    c, L, s, top_k = cfg
                    kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)

                    def op(budget, kw=kw):
                        chunked._BAND_BYTES = budget
                        return torch.ops.mta.attention(q, k, v, **kw)

                    runs[_label(cfg)] = lambda op=op: op(banded)
                    if args.ablate_bands:
                        runs[_label(cfg) + " unbounded"] = lambda op=op: op(1 << 62)
                try:
                    best = best_alternating_ms(runs, args.repeats)
                finally:
                    chunked._BAND_BYTES = banded
                row = {"shape": shape, "n": n, "causal": causal, "heads": [Hq, Hkv], "head_dim": d,
                       **{f"{name}_ms": ms for name, ms in best.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    stamp = dt.date.today().isoformat()
    head = ["| shape | n | SDPA ms |"] + [f" {_label(cfg)} |" for cfg in CONFIGS]
    lines = [f"{stamp}, {machine}. One layer, fp32, batch 1; ms best of {args.repeats} alternating; "
             "in brackets SDPA / MTA (above 1: MTA faster)"
             + ("; 'unbounded': the same configuration with the bands' memory bound lifted (non-causal: one whole key set; "
                "causal: the 8 summary bands)" if args.ablate_bands else "")
             + ".", "", "".join(head), "|---|---|---|" + "---|" * len(CONFIGS)]
    for r in rows:
        cells = []
        for cfg in CONFIGS:
            ms = r[f"{_label(cfg)}_ms"]
            cell = f"{ms:.1f} ({r['sdpa_ms'] / ms:.2f}×)"
            if args.ablate_bands:
                cell += f"; unbounded {r[f'{_label(cfg)} unbounded_ms']:.1f}"
            cells.append(cell)
        lines.append(f"| {r['shape']} | {r['n']} | {r['sdpa_ms']:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print("\n" + text)
    name = f"cpu_layer_{stamp}" + (f"_{args.tag}" if args.tag else "")
    atomic_write_text(args.out / f"{name}.json",
                      json.dumps({"date": stamp, "machine": machine, "configs": CONFIGS, "rows": rows}, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
