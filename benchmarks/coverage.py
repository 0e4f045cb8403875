"""Coverage table: model × mode → attention found / rewritten / max error with one chunk.

    python benchmarks/coverage.py            # prints the table, writes benchmarks/results/coverage.md
    python benchmarks/coverage.py --docs     # also replaces the table between the markers of docs/api.md
    python benchmarks/coverage.py --survey   # more transformers architectures (zoo.survey_cases),
                                             # writes benchmarks/results/coverage_survey.md
    ... --onnx                               # and a column: the model with MTA (c=8, L=1, sinks=2,
                                             # top_k=1) exported to ONNX, run by onnxruntime at another
                                             # length, against the rewritten PyTorch model

"found" counts attention sites against the model's true number of attention layers; "rewritten"
counts mta.attention nodes in the rewritten graph; "max |err|" compares the rewritten model with
``MTAConfig(chunk_size=10**6)`` (one chunk: exact) against the original, fp32, at the example
length and at another length (dynamic shapes), on real (non-padded) positions. For comparison,
the table also counts what PyTorch Inductor's attention pattern matcher (``fuse_attention``,
136 fixed patterns) is not run here: see the issue for its counts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import platform
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite import zoo  # noqa: E402
from mta_rewrite.calibration.metrics import first_tensor  # noqa: E402

BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"


def max_error(model, rewritten, case):
    worst = 0.0
    with torch.no_grad():
        for n in case.lengths:
            args, kwargs = case.inputs(n)
            a, b = first_tensor(model(*args, **kwargs)), first_tensor(rewritten(*args, **kwargs))
            if "attention_mask" in kwargs:
                keep = kwargs["attention_mask"].bool()
                a, b = a[keep], b[keep]
            worst = max(worst, (a - b).abs().max().item())
    return worst


ONNX_CONFIG = mr.MTAConfig(8, 1, 2, 1)


def onnx_error(model, case) -> str:
    """The model rewritten with ONNX_CONFIG, exported, run by onnxruntime at the other length,
    against the rewritten PyTorch model (real positions); or the exporter's one-line failure. A
    mixture of experts whose grouped products torch.onnx cannot translate is tried again with
    transformers' batched experts (what ``capture --experts batched_mm`` loads), and says so."""
    import tempfile

    import numpy as np

    from mta_rewrite.onnx import export_onnx, onnx_session
    from mta_rewrite.onnx.export import GROUPED_EXPERTS_OPS, exporter_failure

    args, kwargs = case.inputs(case.lengths[0])
    note = ""
    for attempt in range(2):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                export_onnx(model, args, f"{tmp}/m.onnx", kwargs, config=ONNX_CONFIG)
                session = onnx_session(f"{tmp}/m.onnx")
                a, kw = case.inputs(case.lengths[-1] + (5 if case.lengths[-1] != case.lengths[0] else 0))
                got = session.run(None, {i.name: v.numpy() for i, v in zip(session.get_inputs(), [*a, *kw.values()])})[0]
            break
        except Exception as exc:  # noqa: BLE001  (the exporter's own failures: reported, not raised)
            reason = exporter_failure(exc) if isinstance(exc, torch.onnx.OnnxExporterError) else \
                str(exc.__cause__ or exc).strip().splitlines()[0]
            configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_experts_implementation")]
            if attempt or not configs or not any(op in reason for op in GROUPED_EXPERTS_OPS):
                return f"export failed: {reason[:120]}"
            for config in configs:  # (transformers reads it at every call)
                config._experts_implementation = "batched_mm"
            note = " (batched_mm experts)"
    with torch.no_grad():
        want = first_tensor(mr.rewrite(model, args, kwargs, config=ONNX_CONFIG)(*a, **kw)).numpy()
    if "attention_mask" in kw:
        keep = kw["attention_mask"].bool().numpy()
        got, want = got[keep], want[keep]
    return f"{np.abs(got - want).max():.1e}{note}"


def row(case, onnx=False):
    model = case.build()
    args, kwargs = case.inputs(case.lengths[0])
    sites = mr.find_attention(model, args, kwargs)
    attention = [s for s in sites if s.is_attention]
    rewritten = mr.rewrite(model, args, kwargs, config=mr.MTAConfig(chunk_size=10**6))
    err = max_error(model, rewritten, case) if case.family != "negative" or case.name != "dropout_training" else float("nan")
    left = "; ".join(sorted({s.reason for s in sites if not s.rewritable}))
    return {
        "model": case.name, "family": case.family, "true": case.attention, "found": len(attention),
        "rewritten": mr.count_mta_nodes(rewritten), "expected_rewritten": case.rewritable, "max_err": err, "left_exact": left,
        "onnx": (onnx_error(model, case) if case.rewritable else "—") if onnx else None,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", action="store_true", help="update the table in docs/api.md")
    ap.add_argument("--survey", action="store_true", help="the survey's architectures instead of the test zoo")
    ap.add_argument("--onnx", action="store_true", help="add the onnxruntime column (see above)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    rows = [row(c, args.onnx) for c in (zoo.survey_cases() if args.survey else zoo.all_cases())]
    onnx_head = (f" onnxruntime vs PyTorch, {ONNX_CONFIG.short} |", "---|") if args.onnx else ("", "")
    lines = ["| model (mode) | kind | attention layers | found | rewritten | max abs err, 1 chunk |" + onnx_head[0]
             + " left exact, and why |", "|---|---|---|---|---|---|" + onnx_head[1] + "---|"]
    for r in rows:
        err = "—" if r["max_err"] != r["max_err"] else f"{r['max_err']:.1e}"
        onnx_cell = f" {r['onnx']} |" if args.onnx else ""
        lines.append(f"| {r['model']} | {r['family']} | {r['true']} | {r['found']} | {r['rewritten']} | {err} |{onnx_cell} "
                     f"{r['left_exact'] or ''} |")
    import transformers

    stamp = f"{dt.date.today().isoformat()}, torch {torch.__version__}, transformers {transformers.__version__}, {platform.machine()}"
    command = ("--survey" if args.survey else "--docs") + (" --onnx" if args.onnx else "")
    table = f"Generated by `python benchmarks/coverage.py {command}` ({stamp}).\n\n" + "\n".join(lines)
    print(table)
    out = Path(__file__).parent / "results" / ("coverage_survey.md" if args.survey else "coverage.md")
    out.parent.mkdir(exist_ok=True)
    out.write_text(table + "\n")
    if args.docs and not args.survey:
        page = Path(__file__).resolve().parents[1] / "docs" / "api.md"
        text = page.read_text()
        head, rest = text.split(BEGIN)
        _, tail = rest.split(END)
        page.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    bad = [r["model"] for r in rows if r["found"] != r["true"] or r["rewritten"] != r["expected_rewritten"] or r["max_err"] > 1e-5
           or (r["onnx"] or "—")[0].isdigit() and float(r["onnx"].split()[0]) > 1e-4]
    if bad:
        print(f"coverage regressions: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
