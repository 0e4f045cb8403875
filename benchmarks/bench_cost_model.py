"""The cost model against the clock: does calibration's modelled cost of a configuration say what
the op's time over exact attention's is on this machine?

    python benchmarks/bench_cost_model.py [--n 256 512 1024 2048 4096 8192] [--repeats 3] [--fit] [--tag T]
                                          [--boundaries | --softcap]

For each shape and length, times ``scaled_dot_product_attention`` and ``torch.ops.mta.attention``
at a grid of configurations (c, L, sinks, top_k; the functions called in turn each round, best of
--repeats) and compares the measured ratio MTA / exact with ``calibration.cost.relative_cost``.
Reports, per shape and length, how many configurations beat exact attention measured and
modelled, and the spread of modelled / measured. ``--fit`` also fits the constants of
``calibration.cost.TimeModel`` to these timings by least squares on the relative error (each
constant ≥ 0), reports that model too, and writes it as time_model_<date>[_<tag>].json, which
``calibrate(cost_model=load_time_model(path))`` and the CLI's ``calibrate --cost-model PATH`` take.

Shapes (fp32): MiniLM's layer (12 heads, d = 32), with and without key padding; SmolLM2's (9 / 3
heads, d = 64, causal); TinyCausalLM's (8 heads, d = 32, causal); batch 2 with 4:1 GQA (8 / 2,
d = 64, causal); 4 heads of d = 128.

``--boundaries`` times the op with boundary chunks instead (synthetic lines of 1–79 tokens,
``line_ids``), as it runs them on the CPU in query blocks, costed from their layout
(``ops.varlen.key_columns``), and with --fit fits the query-block constants of ``TimeModel``, the
other constants ``CPU``'s.

``--softcap`` times soft-capped sites instead (``SOFTCAP_SHAPES``: Gemma-2-2B's layer, 8 / 4 heads of
d = 256, causal, cap 50; 8 heads of d = 64, non-causal, cap 30), each configuration capped and not,
exact attention as a rewritten program runs it at such a site (the op with one chunk, capped) and
not (SDPA), and fits the two soft-cap constants of ``TimeModel`` (ms per million capped logits,
exact and MTA) to the differences capped − not capped, the other constants ``CPU``'s; it reports
the model with and without them against the capped timings.

Writes benchmarks/results/cost_model_<date>[_<tag>].{json,md} (and with --fit the model's JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite  # noqa: E402,F401  (registers torch.ops.mta.attention)
from mta_rewrite.calibration.cost import CPU, TimeModel, exact_flops, mta_work, relative_cost  # noqa: E402
from mta_rewrite.config import MTAConfig, atomic_write_text  # noqa: E402
from mta_rewrite.timing import best_alternating_ms, cpu_name  # noqa: E402

SHAPES = {  # name: (batch, query heads, key/value heads, head dim, causal, key padding)
    "minilm": (1, 12, 12, 32, False, False),
    "minilm_padded": (1, 12, 12, 32, False, True),
    "smollm2": (1, 9, 3, 64, True, False),
    "tiny": (1, 8, 8, 32, True, False),
    "gqa4_b2": (2, 8, 2, 64, True, False),
    "d128": (1, 4, 4, 128, False, False),
}
CONFIGS = [MTAConfig(c, L, s, k) for c in (16, 64, 256) for L in (1, 2) for s in (0, 4) for k in (0, 1, 4)]
# soft-capped sites: name → (batch, query heads, key/value heads, head dim, causal, cap)
SOFTCAP_SHAPES = {"gemma2_capped": (1, 8, 4, 256, True, 50.0), "capped_d64": (1, 8, 8, 64, False, 30.0)}


def _inputs(shape: str, n: int):
    """Random q, k, v (fp32, seed 0) of a shape at length n, and its mask: None, or with key padding
    the last eighth of every sequence padded."""
    B, Hq, Hkv, d, causal, padded = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, d, generator=g) for h in (Hq, Hkv, Hkv))
    mask = None
    if padded:
        mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
        mask[..., n - n // 8:] = False
    return q, k, v, mask


def _rows(args, boundaries: bool = False) -> list[dict]:
    """Each shape, length and configuration timed against exact attention; ``boundaries``: with
    boundary chunks (``line_ids``), as the op runs them on the CPU for no mask or key padding, in
    query blocks (``ops.varlen``), each row with the columns ``ops.varlen.key_columns`` counts
    (with top-k from the op's selection on these q and k)."""
    from mta_rewrite.ops.varlen import key_columns

    rows = []
    with torch.no_grad():
        for shape in args.shapes:
            B, Hq, Hkv, d, causal, padded = SHAPES[shape]
            for n in args.n:
                q, k, v, mask = _inputs(shape, n)
                seg = line_ids(n).expand(B, n) if boundaries else None
                runs = {"exact": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                                       enable_gqa=Hq != Hkv)}
                configs = [cfg for cfg in CONFIGS if cfg.chunk_size < n]
                for cfg in configs:
                    runs[str(cfg)] = lambda cfg=cfg: torch.ops.mta.attention(q, k, v, mask, None, seg, causal=causal,
                                                                            **cfg.op_kwargs())
                best = best_alternating_ms(runs, args.repeats)
                for cfg in configs:
                    row = {"shape": shape, "batch": B, "heads": Hq, "kv_heads": Hkv, "head_dim": d, "causal": causal,
                           "padded": padded, "n": n, "config": cfg.to_dict(), "exact_ms": best["exact"],
                           "mta_ms": best[str(cfg)]}
                    if boundaries:
                        row["block_columns"] = list(key_columns(
                            seg, chunk_size=cfg.chunk_size, causal=causal, local_chunks=cfg.local_chunks,
                            sinks=cfg.sinks, top_k=cfg.top_k, q=q, k=k, attn_mask=mask))
                    rows.append(row)
                print(f"{shape} n={n}: exact {best['exact']:.2f} ms, {len(configs)} configurations"
                      + (" (boundaries)" if boundaries else ""), flush=True)
    return rows


def line_ids(n: int, seed: int = 0, mean: int = 40) -> torch.Tensor:
    """[1, n] segment ids of synthetic "lines": lengths drawn uniformly from 1 … 2·mean − 1 (mean
    ``mean`` tokens; real text's line ends: Python's sources average ~50 tokens a chunk at c = 128)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 2 * mean, (n,), generator=g)
    return torch.repeat_interleave(torch.arange(n), lengths)[:n].view(1, n)


def _softcap_rows(args) -> list[dict]:
    """Each soft-capped shape, length and configuration timed capped and not (one alternating
    round set): exact attention as a rewritten program runs it (capped: the op with one chunk;
    not: SDPA) and the op."""
    from mta_rewrite.passes.lower import EXACT_CHUNK

    rows = []
    with torch.no_grad():
        for shape, (B, Hq, Hkv, d, causal, cap) in SOFTCAP_SHAPES.items():
            for n in args.n:
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(B, h, n, d, generator=g) for h in (Hq, Hkv, Hkv))
                runs = {"exact": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                       enable_gqa=Hq != Hkv),
                        "exact capped": lambda: torch.ops.mta.attention(q, k, v, None, chunk_size=EXACT_CHUNK,
                                                                        causal=causal, softcap=cap)}
                configs = [cfg for cfg in CONFIGS if cfg.chunk_size < n]
                for cfg in configs:
                    for capped in (0.0, cap):
                        runs[f"{cfg} {capped}"] = lambda cfg=cfg, capped=capped: torch.ops.mta.attention(
                            q, k, v, None, causal=causal, softcap=capped, **cfg.op_kwargs())
                best = best_alternating_ms(runs, args.repeats)
                for cfg in configs:
                    rows.append({"shape": shape, "batch": B, "heads": Hq, "kv_heads": Hkv, "head_dim": d,
                                 "causal": causal, "padded": False, "n": n, "config": cfg.to_dict(), "softcap": True,
                                 "exact_ms": best["exact capped"], "mta_ms": best[f"{cfg} {cap}"],
                                 "uncapped_exact_ms": best["exact"], "uncapped_mta_ms": best[f"{cfg} 0.0"]})
                print(f"{shape} n={n}: exact {best['exact']:.1f} ms, capped {best['exact capped']:.1f} ms", flush=True)
    return rows


def fit_softcap(rows: list[dict], base: TimeModel) -> TimeModel:
    """``base`` with the soft-cap constants fitted to the rows' capped − uncapped times (least
    squares in the capped time's relative error): ms per million logits, exact and MTA."""
    def per_mlogit(extra, logits, total):
        x, y, w = np.array(logits) / 1e6, np.array(extra), 1 / np.array(total) ** 2
        return max(float((w * x * y).sum() / (w * x * x).sum()), 0.0)

    exact = {(r["shape"], r["n"]): r for r in rows}.values()
    e = per_mlogit([r["exact_ms"] - r["uncapped_exact_ms"] for r in exact],
                   [r["batch"] * r["heads"] * exact_flops(r["n"], r["head_dim"], r["causal"]) / (4 * r["head_dim"])
                    for r in exact], [r["exact_ms"] for r in exact])
    m = per_mlogit([r["mta_ms"] - r["uncapped_mta_ms"] for r in rows],
                   [mta_work(_config(r), r["n"], r["head_dim"], r["causal"], **_shape(r))[0] / (4 * r["head_dim"])
                    for r in rows], [r["mta_ms"] for r in rows])
    return dataclasses.replace(base, machine=base.machine + "; soft-cap constants fitted here",
                               exact_softcap_ms_per_mlogit=round(e, 4), mta_softcap_ms_per_mlogit=round(m, 4))


def fit_blocks(rows: list[dict], base: TimeModel) -> TimeModel:
    """``base`` with the constants of the op in query blocks fitted to these rows (boundary chunks:
    least squares in the relative error of the op's time, each constant ≥ 0; exact attention's
    and the fixed-chunk op's constants are ``base``'s)."""
    a = _fit_op(rows)
    return dataclasses.replace(base, machine=base.machine + "; query-block constants fitted here",
                               block_ms_per_gflop=round(float(a[0]), 3), block_ms_per_gb=round(float(a[1]), 1),
                               block_ms_per_mselect=round(float(a[2]), 3), block_call_ms=round(float(a[3]), 3))


def _config(row) -> MTAConfig:
    return MTAConfig.from_dict(row["config"])


def _shape(row) -> dict:
    shape = dict(heads=row["heads"], kv_heads=row["kv_heads"], batch=row["batch"])
    if row.get("block_columns") is not None:
        shape["block_columns"] = tuple(row["block_columns"])
    return shape


def _nnls(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient ≥ 0: refit without the features whose coefficient came
    out negative until none does (the few features here make that enough)."""
    keep = list(range(X.shape[1]))
    while True:
        coef = np.linalg.lstsq(X[:, keep], y, rcond=None)[0]
        if (coef >= 0).all():
            out = np.zeros(X.shape[1])
            out[keep] = coef
            return out
        keep = [f for f, c in zip(keep, coef) if c >= 0]


def _fit_op(rows: list[dict]) -> np.ndarray:
    """The op's constants (ms per GFLOP, per GB of key sets, per M selection elements, per call)
    nearest these rows' times in relative error, each ≥ 0."""
    X = np.array([[f / s for f, s in zip(mta_work(_config(r), r["n"], r["head_dim"], r["causal"], **_shape(r)),
                                         (1e9, 1e9, 1e6))] + [1.0] for r in rows])
    y = np.array([r["mta_ms"] for r in rows])
    return _nnls(X / y[:, None], np.ones(len(y)))


def fit(rows: list[dict], machine: str) -> TimeModel:
    """The TimeModel whose times are nearest these rows' in relative error."""
    a = _fit_op(rows)
    ex = np.array([[r["batch"] * r["heads"] * exact_flops(r["n"], r["head_dim"], r["causal"]) / 1e9, 1.0]
                   for r in rows])
    ye = np.array([r["exact_ms"] for r in rows])
    e = _nnls(ex / ye[:, None], np.ones(len(ye)))
    return TimeModel(machine=machine, exact_ms_per_gflop=round(float(e[0]), 3), exact_call_ms=round(float(e[1]), 3),
                     mta_ms_per_gflop=round(float(a[0]), 3), mta_ms_per_gb=round(float(a[1]), 1),
                     mta_ms_per_mselect=round(float(a[2]), 3), mta_call_ms=round(float(a[3]), 3))


def agreement(rows: list[dict], model: TimeModel) -> tuple[list[str], dict]:
    """Markdown rows per (shape, n), and the overall figures, of ``model`` against the timings."""
    lines, ratios, agree = [], [], 0
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["shape"], r["n"]), []).append(r)
    for (shape, n), rs in groups.items():
        measured = [r["mta_ms"] / r["exact_ms"] for r in rs]
        modelled = [relative_cost(_config(r), n, r["head_dim"], r["causal"], model=model,
                                  softcap=r.get("softcap", False),
                                  **_shape(r)) for r in rs]
        ratio = [m / x for m, x in zip(modelled, measured)]
        ratios += ratio
        agree += sum((m < 1) == (x < 1) for m, x in zip(modelled, measured))
        lines.append(f"| {shape} | {n} | {rs[0]['exact_ms']:.2f} | {sum(x < 1 for x in measured)} / {len(rs)} | "
                     f"{sum(m < 1 for m in modelled)} | {min(ratio):.2f}–{max(ratio):.2f} |")
    p10, p50, p90 = np.percentile(ratios, [10, 50, 90])
    return lines, {"modelled_over_measured_p10_p50_p90": [round(float(x), 3) for x in (p10, p50, p90)],
                   "same_side_of_exact": round(agree / len(rows), 3), "timings": len(rows)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--n", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fit", action="store_true", help="fit a TimeModel to these timings and report it too")
    ap.add_argument("--softcap", action="store_true", help="soft-capped sites: fit the soft-cap constants (above)")
    ap.add_argument("--boundaries", action="store_true",
                    help="boundary chunks in query blocks: fit the query-block constants (above)")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if args.softcap and args.boundaries:
        print("error: --softcap and --boundaries fit different constants: run them one at a time", file=sys.stderr)
        return 2
    rows = _softcap_rows(args) if args.softcap else _rows(args, boundaries=args.boundaries)
    models = {"calibration.cost.CPU": CPU}
    if args.boundaries:
        models["CPU without query-block constants"] = dataclasses.replace(CPU, block_ms_per_gflop=0.0)
        if args.fit:
            models["fitted here"] = fit_blocks(rows, CPU)
            print(models["fitted here"])
    elif args.softcap:
        models["CPU without soft-cap terms"] = dataclasses.replace(CPU, exact_softcap_ms_per_mlogit=0.0,
                                                                   mta_softcap_ms_per_mlogit=0.0)
        if args.fit:
            models["fitted here"] = fit_softcap(rows, CPU)
            print(models["fitted here"])
    elif args.fit:
        models["fitted here"] = fit(rows, machine)
        print(models["fitted here"])
    stamp = dt.date.today().isoformat()
    what = ("Soft-capped sites: exact attention (the op with one chunk, capped) and the op (capped)" if args.softcap
            else "Exact attention (SDPA) and the op with boundary chunks (synthetic lines of 1–79 tokens, in query "
            "blocks)" if args.boundaries else "Exact attention (SDPA) and the op")
    text = [f"{stamp}, {machine}. {what} timed on the same inputs (fp32, ms, best of "
            f"{args.repeats} alternating) at {len(CONFIGS)} configurations (c ∈ 16, 64, 256 below n; L ∈ 1, 2; "
            "sinks ∈ 0, 4; top_k ∈ 0, 1, 4); 'wins': configurations whose MTA / exact ratio is below 1, "
            "measured and modelled; modelled / measured ratio: its range over the configurations."]
    summary = {}
    for name, model in models.items():
        lines, figures = agreement(rows, model)
        summary[name] = {"model": dataclasses.asdict(model), **figures}
        p10, p50, p90 = figures["modelled_over_measured_p10_p50_p90"]
        text += ["", f"**{name}** ({model}): modelled / measured ratio p10 {p10:.2f}, median {p50:.2f}, "
                 f"p90 {p90:.2f}; on the same side of exact attention for {figures['same_side_of_exact']:.0%} "
                 f"of {figures['timings']} timings.", "",
                 "| shape | n | exact ms | wins measured | wins modelled | modelled / measured |",
                 "|---|---|---|---|---|---|", *lines]
    out = "\n".join(text)
    print("\n" + out)
    name = f"cost_model_{stamp}" + (f"_{args.tag}" if args.tag else "")
    atomic_write_text(args.out / f"{name}.json", json.dumps({"date": stamp, "machine": machine, "summary": summary,
                                                             "rows": rows}, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", out + "\n")
    if args.fit:
        path = args.out / (f"time_model_{stamp}" + (f"_{args.tag}.json" if args.tag else ".json"))
        atomic_write_text(path, json.dumps(dataclasses.asdict(models["fitted here"]), indent=2) + "\n")
        print(f"fitted model: {path} (calibrate --cost-model {path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
