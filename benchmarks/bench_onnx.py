"""onnxruntime (CPU) time of an MTA model vs the exact model at a long sequence.

    python benchmarks/bench_onnx.py [--n 4096] [--repeats 3]

The built-in TinyCausalLM (4 layers, d = 256, 4 heads, random weights) exported twice with
dynamic shapes: exact (stock SDPA lowering) and rewritten with MTA (c = 64, and c = 64 with
L = 2, sinks = 4, top_k = 2). Both run in onnxruntime's CPU provider on byte tokens of real
text; PyTorch times of the same models are given beside them. Writes benchmarks/results/onnx_<date>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite import zoo  # noqa: E402
from mta_rewrite.onnx import export_onnx, onnx_session  # noqa: E402
from mta_rewrite.timing import best_ms  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    model = zoo.TinyCausalLM().eval()
    text = zoo.real_text()
    example = (zoo.byte_tokens(text, 256),)
    tokens = zoo.byte_tokens(text * (1 + args.n // len(text)), args.n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("exact", None), ("MTA c=64", mr.MTAConfig(64)), ("MTA c=64 L=2 sinks=4 top_k=2", mr.MTAConfig(64, 2, 4, 2))]
        ref = None
        for label, config in variants:
            path = Path(tmp) / "m.onnx"
            export_onnx(model, example, path, config=config)
            session = onnx_session(path)
            name = session.get_inputs()[0].name
            feed = {name: tokens.numpy()}
            ort_ms = best_ms(lambda: session.run(None, feed), args.repeats)
            out = session.run(None, feed)[0]
            torch_model = model if config is None else mr.rewrite(model, example, config=config)
            with torch.no_grad():
                torch_ms = best_ms(lambda: torch_model(tokens), args.repeats)
                torch_out = torch_model(tokens).numpy()
            ref = out if ref is None else ref
            rows.append((label, ort_ms, torch_ms, float(np.abs(out - torch_out).max()), float(np.abs(out - ref).max())))
            print(rows[-1], flush=True)
    exact_ort, exact_torch = rows[0][1], rows[0][2]
    lines = ["| model | onnxruntime CPU ms | vs exact | PyTorch ms | vs exact | max abs diff ORT vs PyTorch |", "|---|---|---|---|---|---|"]
    for label, o, t, diff, _ in rows:
        lines.append(f"| {label} | {o:.0f} | {exact_ort / o:.2f}× | {t:.0f} | {exact_torch / t:.2f}× | {diff:.1e} |")
    stamp = dt.date.today().isoformat()
    head = f"{stamp}, TinyCausalLM (4 layers, d=256, 4 heads), n={args.n}, onnxruntime {ort.__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    table = "\n".join(lines)
    print(f"\n{head}\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"onnx_{stamp}.md").write_text(f"{head}\n\n{table}\n")


if __name__ == "__main__":
    main()
