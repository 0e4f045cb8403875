"""onnxruntime (CPU) time of one MTA site against the PyTorch op on the same inputs.

    python benchmarks/bench_onnx_site.py [--n 4096] [--repeats 7] [--before PATH] [--src PATH] [--tag TAG]

One call of ``torch.ops.mta.attention`` (``c = 64, L = 2, sinks = 4``, top_k 0 and 2) exported
alone and run by onnxruntime's CPU provider, at grouped-query shapes: SmolLM2's (9 query / 3
key-value heads, d = 64) and a Llama-3-8B-like 32 / 8 heads (d = 64). Three forms of causality: the
triangle as a transformers decoder hands it (a [1, 1, n, n] bool mask, recognised at run time),
the op's causal flag with no mask, and a sliding window of 1024 keys as a bool mask (Mistral's
layers: a mask that varies per query and is not recognised, read in chunk blocks). Exported with
dynamic shapes, as models are (a static export lets onnxruntime fold the shape arithmetic away,
which a model's export does not).

``--before PATH``: the same sites exported by another checkout (a ``git worktree`` of an earlier
commit) too, each export in its own process (the two checkouts' ``mta_rewrite`` cannot share
one); both sessions and the PyTorch op are then timed in turn, round by round, best of
``--repeats`` rounds each (``timing.best_alternating_ms``): on a shared box the same session varied
45–53 ms run to run in separate runs, which hid a 10% change. onnxruntime's threads do not spin
between runs here (``session.intra_op.allow_spinning`` 0), or one session's spinning threads take
the cores of whatever runs next. ``--src``: the checkout whose ``mta_rewrite`` is timed as the
current one (default: this one). Outputs are compared with the PyTorch op's.
Writes benchmarks/results/onnx_site_<date>[_TAG].md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

SHAPES = [(9, 3, 64), (32, 8, 64)]  # query heads, key/value heads, head size
TOP_K = (0, 2)
FORMS = ("bool mask", "causal flag", "band mask")


def site_config(top_k: int, form: str) -> dict:
    return dict(chunk_size=64, causal=form == "causal flag", local_chunks=2, sinks=4, top_k=top_k, scale=0.125)


def site_inputs(n: int, heads: int, kv_heads: int, d: int, form: str):
    import torch

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, n, d, generator=g)
    k, v = (torch.randn(1, kv_heads, n, d, generator=g) for _ in range(2))
    if form == "causal flag":
        return q, k, v
    i = torch.arange(n)
    causal = i[None] <= i[:, None]
    if form == "band mask":  # a sliding window of 1024 keys (Mistral's layers): not recognised, read per query
        return q, k, v, (causal & (i[:, None] - i[None] < 1024))[None, None]
    return q, k, v, causal[None, None]


def site_name(heads: int, kv_heads: int, top_k: int, form: str) -> str:
    return f"h{heads}_{kv_heads}_k{top_k}_{form.replace(' ', '_')}.onnx"


def site_module(top_k: int, form: str):
    import torch

    config = site_config(top_k, form)

    class Site(torch.nn.Module):
        def forward(self, q, k, v, mask=None):
            return torch.ops.mta.attention(q, k, v, mask, None, **config)

    return Site()


def export_sites(n: int, src: Path, out: Path) -> None:
    """Every site, exported by the ``mta_rewrite`` of ``src`` into ``out``."""
    import mta_rewrite
    from mta_rewrite.onnx import export_onnx

    if Path(mta_rewrite.__file__).resolve().parents[1] != src.resolve():
        raise SystemExit(f"mta_rewrite was imported from {Path(mta_rewrite.__file__).parents[1]}, not {src}")

    for heads, kv_heads, d in SHAPES:
        for top_k in TOP_K:
            for form in FORMS:
                export_onnx(site_module(top_k, form), site_inputs(n, heads, kv_heads, d, form),
                            out / site_name(heads, kv_heads, top_k, form), dynamic=True)


def _commit(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "(not a git checkout)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the checkout whose mta_rewrite is timed")
    ap.add_argument("--before", type=Path, default=None, help="a checkout to time against (e.g. a git worktree)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--export-to", type=Path, default=None, help=argparse.SUPPRESS)  # one checkout's export step
    args = ap.parse_args(argv)
    sys.path.insert(0, str(args.src))
    warnings.filterwarnings("ignore")
    if args.export_to is not None:
        export_sites(args.n, args.src, args.export_to)
        return
    import numpy as np
    import onnxruntime as ort
    import torch

    import mta_rewrite
    from mta_rewrite.config import atomic_write_text
    from mta_rewrite.onnx import onnx_session
    from mta_rewrite.timing import best_alternating_ms, cpu_name

    checkouts = {"onnxruntime": args.src} if args.before is None else {"before": args.before, "onnxruntime": args.src}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, src in checkouts.items():
            (Path(tmp) / label).mkdir()
            done = subprocess.run([sys.executable, __file__, "--src", str(src), "--n", str(args.n),
                                   "--export-to", str(Path(tmp) / label)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"exporting the sites with {src} failed:\n{done.stderr[-3000:]}")
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for heads, kv_heads, d in SHAPES:
            for top_k in TOP_K:
                for form in FORMS:
                    inputs = site_inputs(args.n, heads, kv_heads, d, form)
                    site = site_module(top_k, form)
                    runs, errs = {}, []
                    with torch.no_grad():
                        want = site(*inputs).numpy()
                    for label in checkouts:
                        session = onnx_session(Path(tmp) / label / site_name(heads, kv_heads, top_k, form),
                                               options=options)
                        feed = {x.name: t.numpy() for x, t in zip(session.get_inputs(), inputs)}
                        errs.append(float(np.abs(session.run(None, feed)[0] - want).max()))
                        runs[label] = lambda s=session, f=feed: s.run(None, f)

                    def op():
                        with torch.no_grad():
                            site(*inputs)

                    runs["PyTorch op"] = op
                    ms = best_alternating_ms(runs, args.repeats)
                    before = f"{ms['before']:.1f} | " if args.before else ""
                    ratio = f" {ms['onnxruntime'] / ms['before']:.2f} |" if args.before else ""
                    rows.append(f"| {heads} / {kv_heads} | {form} | {top_k} | {before}{ms['onnxruntime']:.1f} |{ratio} "
                                f"{ms['PyTorch op']:.1f} | {ms['onnxruntime'] / ms['PyTorch op']:.2f} | "
                                f"{max(errs):.1e} |")
                    print(rows[-1], flush=True)
    stamp = (f"{dt.date.today().isoformat()}, n={args.n}, d=64, c=64 L=2 sinks=4, dynamic shapes, {cpu_name()}, "
             f"{torch.get_num_threads()} threads, onnxruntime {ort.__version__}, torch {torch.__version__}; best of "
             f"{args.repeats} rounds, timed in turn; mta_rewrite from {Path(mta_rewrite.__file__).parents[1]}"
             + (f", before: {args.before} at {_commit(args.before)}" if args.before else ""))
    head = "| heads (q / kv) | causality | top_k | " + ("before ms | " if args.before else "") + "onnxruntime ms | " + (
        "vs before | " if args.before else "") + "PyTorch op ms | onnxruntime / PyTorch | max abs diff |"
    table = "\n".join([stamp, "", head, "|" + "---|" * head.count(" | ") + "---|", *rows])
    print(table)
    atomic_write_text(args.out / f"onnx_site_{dt.date.today().isoformat()}{'_' + args.tag if args.tag else ''}.md",
                      table + "\n")


if __name__ == "__main__":
    main()
