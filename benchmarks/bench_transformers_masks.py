"""transformers models rewritten with MTA: their attention masks as given vs recognised as key padding.

transformers builds a materialised [B, 1, n, n] mask for its attention layers (decoders: the
causal triangle ∧ padding, even when nothing is padded; encoders: key padding repeated per
query). Taken as given, such a mask varies per query, and MTA takes its general (slower) path.
``ops/masks.simplify_mask`` recognises it by value, once per forward pass, and hands the op key
padding (and causal=True) instead. This times the same rewritten model both ways, in one process:

    python benchmarks/bench_transformers_masks.py [--n 1024 4096] [--repeats 3]

Models (random weights, built from config objects: no download): a Llama decoder (GQA) at batch 1
without padding, and a BERT encoder at batch 2 with one sequence left-padded by a quarter. Also
the original model on SDPA for scale. MTA: c = 64, L = 2, 4 sinks, top-k 2. Writes
benchmarks/results/transformers_masks_<date>.{json,md}.
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
from mta_rewrite.config import atomic_write_text  # noqa: E402
from mta_rewrite.timing import best_ms, cpu_name  # noqa: E402


def build(name: str, n: int):
    import transformers

    torch.manual_seed(0)
    if name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                                       num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=n)
        model_cls, B, pad = transformers.LlamaModel, 1, 0
    else:
        cfg = transformers.BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=2, num_attention_heads=6,
                                      intermediate_size=1536, max_position_embeddings=n)
        model_cls, B, pad = transformers.BertModel, 2, n // 4
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    model = model_cls(cfg).eval()
    ids = torch.randint(0, 1000, (B, n), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(B, n, dtype=torch.long)
    keep[0, :pad] = 0
    return model, {"input_ids": ids, "attention_mask": keep}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--models", nargs="+", default=["llama", "bert"], choices=["llama", "bert"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("error: transformers is not installed (pip install transformers)", file=sys.stderr)
        return 2
    import importlib

    op_module = importlib.import_module("mta_rewrite.ops.attention")  # the module (the package exports the op)

    simplify = op_module.simplify_mask  # the CPU op's own call (ops/attention.py)
    config = mr.MTAConfig(chunk_size=64, local_chunks=2, sinks=4, top_k=2)
    cpu = cpu_name()
    machine = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}"
    rows = []
    for name in args.models:
        for n in args.n:
            model, kwargs = build(name, n)
            fast = mr.rewrite(model, (), kwargs, config=config)
            row = {"model": name, "n": n, "batch": kwargs["input_ids"].shape[0]}
            with torch.no_grad():
                row["original_sdpa_ms"] = best_ms(lambda: model(**kwargs), args.repeats)
                row["mta_recognised_ms"] = best_ms(lambda: fast(**kwargs), args.repeats)
                recognised = fast(**kwargs)[0]
                op_module.simplify_mask = lambda mask, B, H, n, causal: (mask, causal)  # the mask as given
                try:
                    row["mta_as_given_ms"] = best_ms(lambda: fast(**kwargs), args.repeats)
                    as_given = fast(**kwargs)[0]
                finally:
                    op_module.simplify_mask = simplify
            row["speedup_recognised_vs_as_given"] = row["mta_as_given_ms"] / row["mta_recognised_ms"]
            row["max_abs_diff"] = float((recognised - as_given).abs().max())
            rows.append(row)
            print(json.dumps(row), flush=True)
    head = ("| model | n | batch | original (SDPA) ms | MTA, mask as given ms | MTA, mask recognised ms | "
            "recognised vs as given | max abs diff |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n']} | {r['batch']} | {r['original_sdpa_ms']:.1f} | {r['mta_as_given_ms']:.1f} | "
                     f"{r['mta_recognised_ms']:.1f} | {r['speedup_recognised_vs_as_given']:.2f}× | {r['max_abs_diff']:.1e} |")
    text = (f"{dt.date.today().isoformat()}, {machine}; MTA c=64, L=2, sinks=4, top_k=2, fp32, forward\n\n"
            + "\n".join(lines) + "\n")
    print("\n" + text)
    stamp = dt.date.today().isoformat()
    atomic_write_text(args.out / f"transformers_masks_{stamp}.md", text)
    atomic_write_text(args.out / f"transformers_masks_{stamp}.json", json.dumps({"machine": machine, "rows": rows},
                                                                                    indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
