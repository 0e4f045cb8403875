"""onnxruntime (CPU) time of one MTA site against the PyTorch op on the same inputs.

    python benchmarks/bench_onnx_site.py [--n 4096] [--repeats 5] [--src PATH] [--tag TAG]

One call of ``torch.ops.mta.attention`` (``c = 64, L = 2, sinks = 4``, top_k 0 and 2, the causal
triangle as a transformers decoder hands it: a [1, 1, n, n] bool mask, recognised at run time)
exported alone (static shapes) and run by onnxruntime's CPU provider, at grouped-query shapes:
SmolLM2's (9 query / 3 key-value heads, d = 64) and a Llama-3-8B-like 32 / 8 heads (d = 64). Best
of ``--repeats`` runs each after one warm-up; the op's own time in PyTorch on the same inputs in the
same run; their outputs compared. ``--src``: import mta_rewrite from another checkout (a
``git worktree`` of an earlier commit) to time a before/after in one sitting.
Writes benchmarks/results/onnx_site_<date>[_TAG].md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import warnings
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the checkout whose mta_rewrite is timed")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.src))
    import numpy as np
    import onnxruntime as ort
    import torch

    import mta_rewrite
    from mta_rewrite.config import atomic_write_text
    from mta_rewrite.onnx import export_onnx, onnx_session
    from mta_rewrite.timing import best_ms, cpu_name

    warnings.filterwarnings("ignore")
    threads = torch.get_num_threads()
    n = args.n
    rows = []
    for heads, kv_heads, d in [(9, 3, 64), (32, 8, 64)]:
        for top_k in (0, 2):
            config = dict(chunk_size=64, causal=False, local_chunks=2, sinks=4, top_k=top_k)

            class Site(torch.nn.Module):
                def forward(self, q, k, v, mask):
                    return torch.ops.mta.attention(q, k, v, mask, None, **config)

            g = torch.Generator().manual_seed(0)
            q = torch.randn(1, heads, n, d, generator=g)
            k, v = (torch.randn(1, kv_heads, n, d, generator=g) for _ in range(2))
            mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
            with tempfile.TemporaryDirectory() as tmp:
                export_onnx(Site(), (q, k, v, mask), f"{tmp}/site.onnx", dynamic=False)
                session = onnx_session(f"{tmp}/site.onnx")
            feed = {x.name: t.numpy() for x, t in zip(session.get_inputs(), (q, k, v, mask))}
            got = session.run(None, feed)[0]
            ort_ms = best_ms(lambda: session.run(None, feed), args.repeats, torch.device("cpu"))
            with torch.no_grad():
                want = Site()(q, k, v, mask)
                torch_ms = best_ms(lambda: Site()(q, k, v, mask), args.repeats, torch.device("cpu"))
            err = float(np.abs(got - want.numpy()).max())
            rows.append(f"| {heads} / {kv_heads} | {d} | {top_k} | {ort_ms:.1f} | {torch_ms:.1f} | {err:.1e} |")
            print(rows[-1], flush=True)
    stamp = (f"{dt.date.today().isoformat()}, n={n}, {cpu_name()}, {threads} threads, onnxruntime {ort.__version__}, "
             f"torch {torch.__version__}; mta_rewrite from {Path(mta_rewrite.__file__).parents[1]}")
    table = "\n".join([stamp, "", "| heads (q / kv) | d | top_k | onnxruntime ms | PyTorch op ms | max abs diff |",
                       "|---|---|---|---|---|---|", *rows])
    print(table)
    name = f"onnx_site_{dt.date.today().isoformat()}{'_' + args.tag if args.tag else ''}.md"
    atomic_write_text(args.out / name, table + "\n")


if __name__ == "__main__":
    main()
