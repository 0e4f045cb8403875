"""A video diffusion transformer rewritten with MTA: the forward pass against the original's.

    python benchmarks/bench_diffusers.py [--frames 4 8] [--blocks 2] [--repeats 3] [--tag T]

diffusers' ``WanTransformer3DModel`` with the block shape of Wan2.1-T2V-1.3B (12 heads of 128,
feed-forward 8960, text width 4096; --blocks of its 30 blocks) and **random weights** (no
checkpoint here): this measures speed, not what MTA does to a real model's videos. The latent is
--frames frames of 64 × 64 (a 512 × 512 video), patches of 1 × 2 × 2: 1024 tokens a frame, one
self-attention over all of them per block (rewritten), a cross-attention to 64 text tokens
(left exact). Per setting, the forward pass (ms, best of --repeats, the original and the
rewritten modules called in turn each round) and the largest difference of the output from the
original's relative to its largest value.

Writes benchmarks/results/diffusers_<date>[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite.timing import best_alternating_ms, cpu_machine, results_name, save_results  # noqa: E402

CONFIGS = {"c=128 L=2 s=4 k=0": mr.MTAConfig(128, 2, 4, 0), "c=128 L=2 s=4 k=2": mr.MTAConfig(128, 2, 4, 2)}


def wan(blocks: int):
    try:
        import diffusers
    except ImportError:
        sys.exit("diffusers is not installed: pip install diffusers")
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                           in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                           num_layers=blocks, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                           eps=1e-6, rope_max_seq_len=1024).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    model = wan(args.blocks)
    g = torch.Generator().manual_seed(1)
    rows = []
    for frames in args.frames:
        inputs = dict(hidden_states=torch.randn(1, 16, frames, 64, 64, generator=g),
                      encoder_hidden_states=torch.randn(1, 64, 4096, generator=g), timestep=torch.tensor([500]),
                      return_dict=False)
        tokens = frames * 32 * 32
        runs = {"original": lambda: model(**inputs)[0]}
        modules = {name: mr.rewrite(model, (), inputs, config=config) for name, config in CONFIGS.items()}
        for name, module in modules.items():
            runs[name] = lambda module=module: module(**inputs)[0]
        with torch.no_grad():
            ms = best_alternating_ms(runs, args.repeats)
            original = runs["original"]()
            for name in CONFIGS:
                got = runs[name]()
                rows.append({"frames": frames, "tokens": tokens, "config": name, "original_ms": round(ms["original"], 1),
                             "mta_ms": round(ms[name], 1), "speedup": round(ms["original"] / ms[name], 2),
                             "max_rel_diff": float((got - original).abs().max() / original.abs().max())})
                print(rows[-1], flush=True)
    machine = cpu_machine()
    lines = [f"`python benchmarks/bench_diffusers.py --frames {' '.join(map(str, args.frames))} --blocks {args.blocks}` "
             f"({machine}): diffusers' WanTransformer3DModel, {args.blocks} blocks of Wan2.1-T2V-1.3B's shape, random "
             "weights (speed only); every self-attention rewritten, the cross-attention exact.", "",
             "| frames (tokens) | config | original ms | MTA ms | speed-up | max diff / max |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['frames']} ({r['tokens']}) | `{r['config']}` | {r['original_ms']} | {r['mta_ms']} | {r['speedup']}× | "
              f"{r['max_rel_diff']:.3f} |" for r in rows]
    save_results(Path(__file__).resolve().parent / "results", results_name("diffusers", args.tag), rows, machine,
                 "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
