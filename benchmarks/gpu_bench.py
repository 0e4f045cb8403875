"""GPU benchmark: SDPA (flash, cuDNN) vs the fused MTA kernel, one prepared run on a lent GPU.

    python benchmarks/gpu_bench.py [--n 4096 16384 65536 131072] [--chunks 64 128 256] [--out DIR]
                                   [--budget SECONDS]

B = 1, H = 32, d = 128, bf16, causal and not. Steps, in one process, in order of importance (a
lent GPU's time is short: with --budget, work that would start with too little time left is
skipped and listed under "skipped_for_budget", and the run still ends with its report):

1. the copy rate (device-to-device, bytes read + written), which sets the memory floor: q, k, v
   read and the output written once;
2. the main table: for each n and mode, median ms of SDPA with the flash and cuDNN backends and
   of ``torch.ops.mta.attention`` (L = 1, no sinks, no top-k, the default launch) at each chunk
   size, the fraction of the memory floor reached, and (n ≤ 16K) the relative error against the
   portable implementation in fp32;
3. a sweep of the kernel's variants (``KINDS``: three loops after a pre-pass, the default; one
   pipelined loop; TMA tile loads; summaries fused into the main launch, head by head or chunk
   by chunk) and tile sizes (BLOCK_M, BLOCK_N, warps, stages, register cap) at 64K causal for
   each chunk size of --sweep-chunks, against the default choice (``default_launch``); and of
   the pre-pass's own block size;
4. each variant added to the table's rows: with the sweep's best tiles from 16K on, and with the
   default tiles at a chunk size that was not swept;
5. extras at 64K causal, c = 128: the summary pre-pass alone (means and learned), learned
   summaries, boundary chunks (runs of ~100 tokens: the slots' padded length and the op's time;
   the CPU's unpadded path in torch ops on the GPU, for comparison), clustered summaries,
   L = 2 + sinks + top-k (and as ``use_mta`` runs a prompt continued over a cache: 2048 new
   queries after n − 2048 cached, the kernel's grid from the first new block, against cuDNN
   SDPA of those rows over the n keys), GQA (8 kv
   heads), a site with learned sink logits as the rewrite gives it (GPT-OSS's 64 / 8 heads of
   64: one more token, d + 1 = 65) against the same site without them, forward + backward through autograd (the Triton backward) against SDPA's, the
   backward alone with the summaries' gradients by atomics or by their own kernel (and with
   learned summaries), the backward
   of boundary chunks read where they lie against the padded slots', the backward of clustered
   summaries (non-causal, K = 64) against the portable recomputation under autograd, and the op
   at 1K tokens (the cost of launching it);
6. FlexAttention on the same math (``kernels/flex.py``) at ``FLEX_POINTS`` (64K causal): its
   block mask built from block indices (timed once), the first call (compile), then median ms
   against the MTA kernel's in the same run, and the relative difference of their outputs;
7. whole models: the built-in causal LM (``zoo.TinyCausalLM`` with 16 heads of 128, d_model
   2048, 2 layers, random weights, bf16) at ``MODEL_NS`` tokens, and a transformers LlamaModel of
   the same size (4 key/value heads) at ``HF_MODEL_NS``, rewritten with MTA (c = 256) against
   the original on SDPA (PyTorch's default backend, and cuDNN), forward: what a user's model
   gains, layouts, masks, projections and MLPs included.

Before steps 2 to 5, the Triton kernels they launch are compiled ahead in parallel threads
(``benchmarks/precompile.py``): about twenty distinct configurations in the sweep alone, some two
seconds each when compiled one by one on first launch; the json records each step's count and
seconds under "compiled_ahead" (a failure there only means compiling on first use, as before).

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, median). Writes
gpu_<date>.{json,md} to --out (default benchmarks/results/) after every step ("complete": false
until the end). Needs a CUDA GPU (skips cleanly without one).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mta_rewrite  # noqa: E402,F401
from mta_rewrite.ops import mta_attention_chunked  # noqa: E402
from mta_rewrite.ops.clustered import mta_attention_clustered  # noqa: E402

# Kernel variants (LaunchConfig options) and the tiles (BLOCK_M, BLOCK_N, warps, stages) swept for
# each: the default three loops with the summaries from the pre-pass; the window and summaries as
# one pipelined loop; the three loops reading tiles through TMA descriptors; the summaries pooled
# inside the main launch, work taken head by head or chunk by chunk. Fused variants need
# causal=True and no top-k.
KINDS = {"prepass": {}, "one_loop": {"one_loop": True}, "tma": {"tma": True}, "fused": {"fused": True},
         "fused_chunk_major": {"fused": True, "chunk_major": True}}
FUSED_KINDS = ("fused", "fused_chunk_major")
SWEEP = {  # 64K causal on the H100 ruled out (128, 64, 4, 3), (256, 32, 8, 3) and fused 64-row blocks.
    # A fifth entry caps the registers per thread: 8 warps × 128 rows in 128 registers without
    # spills (benchmarks/kernel_resources.py), two blocks per multiprocessor instead of one.
    "prepass": [(128, 32, 4, 3), (128, 32, 4, 2), (128, 32, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3, 128),
                (128, 32, 8, 2, 128)],
    "one_loop": [(128, 32, 4, 3), (128, 32, 4, 2), (128, 32, 8, 3, 128), (64, 64, 4, 3)],
    "tma": [(128, 32, 4, 3), (128, 32, 4, 2), (128, 32, 8, 3, 128), (128, 32, 8, 2, 128), (128, 64, 8, 2, 128),
            (64, 64, 4, 3)],
    "fused": [(128, 32, 4, 3)],
    "fused_chunk_major": [(128, 32, 4, 3), (128, 32, 4, 2), (128, 32, 8, 3, 128), (64, 32, 4, 3)],
}


# (n, causal, chunk) where FlexAttention runs the same math (each point compiles once)
FLEX_POINTS = [(65536, True, 256)]  # add (131072, True, 256) when the device time allows
# sequence lengths at which step 6 runs the whole model
MODEL_NS = [16384, 65536]
HF_MODEL_NS = [16384]  # the transformers model (its [1, 1, n, n] mask: 4 GB of bools at 64K)

DEVICE = "cuda"
COMPILED: list[dict] = []  # what each compile_ahead call compiled, and how long it took


class Budget:
    """--budget: the seconds the whole run may take. The steps come in order of importance, and
    each piece of work (a row, a sweep configuration, a model) first asks ``spent(label, need)``:
    True, and the label recorded in ``skipped``, when fewer than ``need`` seconds are left. The run
    then ends with a complete report of what it measured instead of being killed mid-step."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def spent(self, label: str, need: float = 0.0) -> bool:
        if self.left() > need:
            return False
        self.skipped.append(label)
        print(f"budget: {self.left():.0f} s left, skipping {label} and what follows it", flush=True)
        return True


BUDGET = Budget(None)


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def launch_of(tiles, opts):
    """LaunchConfig from (BLOCK_M, BLOCK_N, warps, stages[, register cap]) and a variant's options."""
    from mta_rewrite.kernels.mta_fwd import LaunchConfig

    block_m, block_n, warps, stages, *cap = tiles
    return LaunchConfig(block_m, block_n, warps, stages, max_registers=cap[0] if cap else None, **opts)


def time_variant(record: dict, name: str, fn) -> None:
    """record[name + "_ms"] = the median time of fn, or record[name + "_error"]: one variant that
    fails (a compile error, out of memory) must not cost the rest of the run."""
    try:
        record[f"{name}_ms"] = median_ms(fn)
    except Exception as exc:  # noqa: BLE001 - reported in the results, the run goes on
        record[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"{name}: {record[name + '_error']}", flush=True)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_ms(fn):
    if DEVICE != "cuda":  # --dry-run: one call, wall clock (checks the script, measures nothing)
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_rate_bytes_per_ms():
    x = torch.randn(1 << (28 if DEVICE == "cuda" else 20), device=DEVICE)
    y = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / median_ms(lambda: y.copy_(x))


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm()).item()


def render(head, chunks, sweep_n, rows, sweep, prepass, extras, flex, models=()) -> str:
    """The markdown report of what has been measured so far."""
    def cell(ms, ref):
        return f"{ms:.3f}" + (f" ({ref / ms:.1f}×)" if ref else "")

    lines = ["| n | mode | SDPA flash ms | SDPA cuDNN ms | memory floor ms | "
             + " | ".join(f"MTA c={c} ms (× cuDNN)" for c in chunks)
             + " | fastest MTA variant, ms (× cuDNN, % of floor) |",
             "|---|---|---|---|---|" + "---|" * len(chunks) + "---|"]
    for r in rows:
        cud = r.get("sdpa_cudnn_ms")
        cells = [cell(r[f"mta_c{c}_ms"], cud) for c in chunks]
        variants = {key[4:-3]: val for key, val in r.items() if key.startswith("mta_") and key.endswith("_ms")}
        best_name = min(variants, key=variants.get)
        best_ms = variants[best_name]
        fl = f"{r['sdpa_flash_ms']:.3f}" if r.get("sdpa_flash_ms") else "—"
        cu = f"{cud:.3f}" if cud else "—"
        lines.append(f"| {r['n']} | {r['mode']} | {fl} | {cu} | {r['memory_floor_ms']:.3f} | " + " | ".join(cells)
                     + f" | {best_name}: {best_ms:.3f}" + (f" ({cud / best_ms:.1f}×, " if cud else " (")
                     + f"{100 * r['memory_floor_ms'] / best_ms:.0f}%) |")

    def best_text(b):
        if not b:
            return "—"
        cap = b["config"][4] if len(b["config"]) > 4 else None
        return f"{b['ms']:.3f} ms {tuple(b['config'][:4])}" + (f" ≤{cap} regs" if cap else "")

    sweep_lines = [f"c={c}: default {[r for r in s['results'] if r['default']][0]['ms']:.3f} ms; best "
                   + "; ".join(f"{kind} {best_text(b)}" for kind, b in s["best"].items())
                   + " (BLOCK_M, BLOCK_N, warps, stages; register cap)" for c, s in sweep.items()
                   if any(r["default"] for r in s["results"])]
    flex_lines = ["| n | mode | c | block mask build ms | first call (compile) s | FlexAttention ms | MTA kernel ms | "
                  "Flex / MTA | rel. err. Flex vs MTA | recompiled while timed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in flex:
        if "error" in e:
            flex_lines.append(f"| {e['n']} | {e['mode']} | {e['chunk']} | {e['error']} |||||||")
            continue
        flex_lines.append(f"| {e['n']} | {e['mode']} | {e['chunk']} | {e['block_mask_build_ms']:.0f} | "
                          f"{e['first_call_s']:.1f} | {e['flex_ms']:.3f} | {e['mta_ms']:.3f} | "
                          f"{e['flex_ms'] / e['mta_ms']:.2f}× | {e['rel_err_vs_mta']:.1e} | "
                          f"{e.get('graphs_compiled_while_timing', '—')} |")
    model_lines = ["| n | model | original, default SDPA ms | original, SDPA cuDNN ms | MTA ms | × default | × cuDNN | "
                   "logits rel. diff. |", "|---|---|---|---|---|---|---|---|"]
    for e in models:
        def ms(key):
            return f"{e[key]:.2f}" if key in e else e.get(key.replace("_ms", "_error"), "—")

        def ratio(key):
            return f"{e[key] / e['mta_ms']:.1f}×" if key in e and "mta_ms" in e else "—"

        model_lines.append(f"| {e['n']} | {e['model']} | {ms('original_ms')} | {ms('original_cudnn_ms')} | "
                           f"{ms('mta_ms')} | {ratio('original_ms')} | {ratio('original_cudnn_ms')} | "
                           f"{e['logits_rel_diff']:.2e} |" if "logits_rel_diff" in e else
                           f"| {e.get('n', '—')} | {e.get('model', '—')} | {e.get('error', '')} ||||||")
    return (f"{head}\n\n" + "\n".join(lines) + f"\n\nTile sweep at n={sweep_n}, causal:\n"
            + ("\n".join(sweep_lines) if sweep_lines else "(none)")
            + f"\n\nPre-pass alone at n={sweep_n}, c=128: {json.dumps(prepass)}"
            + f"\n\nExtras (64K causal, c=128): {json.dumps(extras)}\n"
            + f"\nKernels compiled ahead of the timings, in parallel (benchmarks/precompile.py): {json.dumps(COMPILED)}\n"
            + (f"\nSkipped, the --budget spent: {'; '.join(BUDGET.skipped)}\n" if BUDGET.skipped else "")
            + ("\nFlexAttention on the same math (kernels/flex.py; L = 1):\n\n" + "\n".join(flex_lines) + "\n"
               if flex else "")
            + ("\nA whole model (zoo.TinyCausalLM, random weights, bf16, forward; MTA L = 1):\n\n"
               + "\n".join(model_lines) + "\n" if models else ""))


def save(args, head, rows, sweep, prepass, extras, flex, final=False, models=()) -> None:
    """Write gpu_<date>.{json,md} to --out (atomically), after every step: a run cut short by
    its time limit still leaves what it measured."""
    text = render(head, args.chunks, args.sweep_n, rows, sweep, prepass, extras, flex, models)
    if final:
        print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat()
    payload = {"head": head, "complete": final, "rows": rows, "sweep": {str(c): s for c, s in sweep.items()},
               "prepass": prepass, "extras": extras, "flex": flex, "models": list(models), "compiled_ahead": COMPILED,
               "skipped_for_budget": BUDGET.skipped}
    for path, content in ((args.out / f"gpu_{stamp}.json", json.dumps(payload, indent=2) + "\n"),
                          (args.out / f"gpu_{stamp}.md", text)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content)
        tmp.replace(path)


def model_specs(gpu: bool) -> list[tuple]:
    """Step 6's models: (name, build() → model, call(model, ids), chunk, lengths). The built-in
    causal LM, and a transformers Llama (random weights from a config object; GQA), which builds
    the [1, 1, n, n] causal mask transformers models pass to attention: MTA recognises it as
    causal (ops/masks.simplify_mask) and runs the kernels."""
    from mta_rewrite import zoo

    dim, heads, layers, c = (2048, 16, 2, 256) if gpu else (32, 2, 2, 16)

    def tiny():
        return zoo.TinyCausalLM(d=dim, heads=heads, layers=layers)

    def llama():
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=32000 if gpu else 256, hidden_size=dim, num_hidden_layers=layers,
                                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                                       intermediate_size=4 * dim, max_position_embeddings=max(HF_MODEL_NS) if gpu else 8 * c)
        cfg._attn_implementation = "sdpa"
        cfg.use_cache = False
        return transformers.LlamaModel(cfg)

    return [(f"TinyCausalLM d={dim}, {heads} heads, {layers} layers", tiny, lambda m, ids: m(ids), c,
             MODEL_NS if gpu else [8 * c]),
            (f"transformers LlamaModel d={dim}, {heads} heads ({max(1, heads // 4)} kv), {layers} layers", llama,
             lambda m, ids: m(ids)[0], c, HF_MODEL_NS if gpu else [8 * c])]


def whole_model(args, save_now, SDPBackend, sdpa_kernel, models, budget):
    """Step 7: each model of ``model_specs`` rewritten with MTA against the original, forward, at
    its lengths (tiny on the CPU dry run); every entry saved as it comes."""
    import mta_rewrite as mr

    gpu = DEVICE == "cuda"
    for name, build, call, c, lengths in model_specs(gpu):
        if budget.spent(f"step 7: {name.split()[0]}", need=30):
            break
        try:
            torch.manual_seed(0)
            model = build().eval().to(device=DEVICE, dtype=torch.bfloat16 if gpu else torch.float32)
            example = torch.randint(0, 256, (1, 4 * c), device=DEVICE)
            fast = mr.rewrite(model, (example,), config=mr.MTAConfig(chunk_size=c))
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            models.append({"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
            save_now()
            continue
        for n in lengths:
            if budget.spent(f"step 7: {name.split()[0]} n={n}", need=10):
                break
            entry = {"n": n, "model": name, "chunk": c}
            ids = torch.randint(0, 256, (1, n), device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(n))
            with torch.no_grad():
                time_variant(entry, "original", lambda: call(model, ids))
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    time_variant(entry, "original_cudnn", lambda: call(model, ids))
                time_variant(entry, "mta", lambda: call(fast, ids))
                try:
                    want, got = call(model, ids).float(), call(fast, ids).float()
                    entry["logits_rel_diff"] = rel_err(got, want)
                except Exception as exc:  # noqa: BLE001
                    entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            models.append(entry)
            print(json.dumps(entry), flush=True)
            save_now()
            ids = None
            empty_cache()
        model = fast = None
    return models


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    ap.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sweep-n", type=int, default=65536)
    ap.add_argument("--sweep-chunks", type=int, nargs="+", default=[128, 256],
                    help="chunk sizes swept in step 2 (c = 64 keeps 64 × 64 tiles, swept on 2026-11-27)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--no-sweep", action="store_true", help="skip step 3 (the tile and pre-pass sweeps)")
    ap.add_argument("--no-flex", dest="flex", action="store_false", help="skip step 6 (FlexAttention)")
    ap.add_argument("--no-model", dest="model", action="store_false", help="skip step 7 (a whole model)")
    ap.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                    help="end the run within this many seconds, skipping the less important work left (recorded)")
    ap.add_argument("--dry-run", action="store_true",
                    help="run every step on the CPU in Triton's interpreter at tiny sizes (checks the script only)")
    args = ap.parse_args(argv)
    global DEVICE, BUDGET
    BUDGET = budget = Budget(args.budget)
    if args.dry_run:
        import os

        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        from mta_rewrite.kernels.interpreter import speed_up_interpreter

        speed_up_interpreter()  # mta_rewrite/kernels/interpreter.py: half the interpreter's time
        DEVICE = "cpu"
        args.n, args.chunks, args.sweep_n, args.heads, args.head_dim = [128, 256], [16, 32], 128, 2, 16
        args.sweep_chunks = [16, 32]
    elif not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure")
        return 0
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mta_rewrite.kernels import dispatch_cuda, mta_fwd
    from mta_rewrite.kernels import backward_cuda
    from mta_rewrite.ops.segments import chunk_bounds, from_slots, segment_layout, segmented, slot_mask, to_slots
    from mta_rewrite.kernels.mta_bwd import mta_backward_triton
    from mta_rewrite.kernels.mta_fwd import LaunchConfig, _chunk_means, default_launch, mta_forward_triton

    mta_fwd.CHECK_SYNC = False  # checked once per configuration below, not inside the timings
    reference_launch = LaunchConfig(64, 64, 4, 3, False)  # what the sweep checks each configuration against

    def compile_ahead(label, calls):
        """Compile the Triton kernels ``calls`` launch, in parallel threads (benchmarks/precompile.py),
        so that the steps after spend the device's time running kernels rather than compiling
        them one by one; on the GPU only (the dry run's interpreter compiles nothing)."""
        if DEVICE != "cuda":
            COMPILED.append({"step": label, "calls": len(calls), "skipped": "no compiler in the interpreter"})
            return
        from precompile import compile_ahead as ahead

        COMPILED.append({"step": label, **ahead(calls)})
        print("compiled ahead:", json.dumps(COMPILED[-1]), flush=True)

    t_start = time.time()
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run)"
    rate = copy_rate_bytes_per_ms()
    H, d = args.heads, args.head_dim
    head = (f"{dt.date.today().isoformat()}, {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
            f"B=1, H={H}, d={d}, bf16; copy rate {rate / 1e9:.2f} TB/s")
    print(head, flush=True)

    def qkv(n, hkv=H, seed=0):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter's bf16 dot is wrong
        return [torch.randn(1, h, n, d, device=DEVICE, dtype=dtype, generator=g) for h in (H, hkv, hkv)]

    floor = {n: 4 * H * n * d * 2 / rate for n in args.n}  # q, k, v read and the output written once, bf16
    rows = []

    # 2. the main table: SDPA (flash, cuDNN) and the op's default launch at every n, mode and chunk
    #    size, first, so that a run cut short by its budget still has the table #6 asks for
    q, k, v = qkv(min(args.n))  # one specialisation serves every n (n and n/c stay multiples of 16)
    compile_ahead("step 2", [lambda c=c, causal=causal: torch.ops.mta.attention(q, k, v, chunk_size=c, causal=causal)
                             for causal in (True, False) for c in args.chunks])
    q = k = v = None
    for n in args.n:
        if budget.spent(f"step 2: n={n}"):
            break
        q, k, v = qkv(n)
        for causal in (True, False):
            row = {"n": n, "mode": "causal" if causal else "full", "memory_floor_ms": floor[n]}
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        row[f"sdpa_{name}_ms"] = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                except RuntimeError as exc:
                    row[f"sdpa_{name}_ms"] = None
                    row[f"sdpa_{name}_error"] = str(exc).splitlines()[0]
            for c in args.chunks:
                kw = dict(chunk_size=c, causal=causal)
                out = torch.ops.mta.attention(q, k, v, **kw)
                assert torch.isfinite(out).all(), f"non-finite output at n={n} c={c} causal={causal}"
                if n <= 16384:
                    row[f"mta_c{c}_rel_err"] = rel_err(out, mta_attention_chunked(q.float(), k.float(), v.float(), **kw))
                out = None
                row[f"mta_c{c}_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, **kw))
            rows.append(row)
            print(json.dumps(row), flush=True)
            save(args, head, rows, {}, {}, {}, [])
        q = k = v = None
        empty_cache()

    # 3. the sweep of the kernel's variants and tiles at --sweep-n, causal
    sweep = {}
    swept = [] if args.no_sweep else [c for c in args.chunks if c in args.sweep_chunks]
    q, k, v = qkv(args.sweep_n)

    def checked(cfg, c):
        """Run once with the fused launch's tickets and waits checked, then compare with the pre-pass."""
        mta_fwd.CHECK_SYNC = True
        try:
            out = mta_forward_triton(q, k, v, None, chunk_size=c, causal=True, launch=cfg)
        finally:
            mta_fwd.CHECK_SYNC = False
        ref = mta_forward_triton(q, k, v, None, chunk_size=c, causal=True, launch=reference_launch)
        return rel_err(out, ref.float())

    def kind_of(cfg):
        if cfg.fused:
            return "fused_chunk_major" if cfg.chunk_major else "fused"
        return "one_loop" if cfg.one_loop else "tma" if cfg.tma else "prepass"

    def candidates(c):
        """The configurations the sweep times at chunk size c (the default among them), in order."""
        cands = {default_launch(c, d, torch.bfloat16)} | {
            launch_of(t, opts) for kind, opts in KINDS.items() for t in (SWEEP[kind] if DEVICE == "cuda" else [(16, 16, 4, 1)])
            if t[0] <= max(16, triton.next_power_of_2(c))}
        return sorted(cands, key=lambda x: (kind_of(x), x.block_m, x.block_n, x.num_warps, x.num_stages,
                                            x.max_registers or 0))

    if swept and not budget.spent("step 3", need=60):
        compile_ahead("step 3", [lambda c=c, cfg=cfg: mta_forward_triton(q, k, v, None, chunk_size=c, causal=True,
                                                                         launch=cfg)
                                 for c in swept for cfg in candidates(c) + [reference_launch]])
        for c in swept:
            default = default_launch(c, d, torch.bfloat16)
            res = []
            for cfg in candidates(c):
                if budget.spent(f"step 3: c={c} {cfg}"):
                    break
                try:
                    err = checked(cfg, c)
                    ms = median_ms(lambda: mta_forward_triton(q, k, v, None, chunk_size=c, causal=True, launch=cfg))
                except Exception as exc:  # noqa: BLE001 - a tile choice the compiler rejects (shared memory)
                    print(f"sweep c={c} {cfg}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", flush=True)
                    continue
                res.append({"config": [cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.max_registers],
                            "kind": kind_of(cfg),
                            "ms": ms, "rel_err_vs_prepass": err, "default": cfg == default})
                print(f"sweep n={args.sweep_n} causal c={c} {cfg}: {ms:.3f} ms, rel err vs pre-pass {err:.1e}"
                      f"{' (default)' if cfg == default else ''}", flush=True)
            best = {kind: min((r for r in res if r["kind"] == kind), key=lambda r: r["ms"], default=None)
                    for kind in KINDS}
            sweep[c] = {"results": res, "best": best}
            save(args, head, rows, sweep, {}, {}, [])
    nc = args.sweep_n // 128
    logn = torch.empty(1, H, nc, device=DEVICE)
    prepass = {}
    for block_c in () if args.no_sweep or budget.spent("step 3: pre-pass blocks", need=10) else (32, 64, 128):
        for warps in (4, 8):
            prepass[f"block_c={block_c},warps={warps}"] = median_ms(
                lambda: _chunk_means(k, v, None, 128, nc, 0, 1.0, logn, block_c=block_c, num_warps=warps))
    print("pre-pass (c=128):", json.dumps(prepass), flush=True)
    q = k = v = None
    empty_cache()

    # 4. the variants in the table's rows: each with the sweep's best tiles from 16K on (time is
    #    short below), and with the default tiles where c was not swept
    variants_from = 0 if args.dry_run else 16384

    def default_tile_variants(c, causal):
        """Each variant (but the default's) with the default tiles: timed where c was not swept."""
        base = default_launch(c, d, torch.bfloat16)
        return {kind: LaunchConfig(base.block_m, base.block_n, base.num_warps, base.num_stages, **opts)
                for kind, opts in KINDS.items() if kind != "prepass" and (causal or kind not in FUSED_KINDS)}

    def variants(n, c, causal):
        """(column, launch) of the variants step 4 times in the row (n, mode) at chunk size c."""
        out = [(f"mta_c{c}_{kind}", cfg) for kind, cfg in
               ({} if c in sweep else default_tile_variants(c, causal)).items()]
        for kind, opts in KINDS.items():
            best = sweep.get(c, {}).get("best", {}).get(kind)
            if best is not None and (causal or kind not in FUSED_KINDS) and n >= variants_from:
                out.append((f"mta_c{c}_best_{kind}", launch_of(best["config"], opts)))
        return out

    q, k, v = qkv(min(args.n))
    if not budget.spent("step 4", need=30):
        compile_ahead("step 4", [lambda c=c, causal=causal, cfg=cfg: mta_forward_triton(
            q, k, v, None, chunk_size=c, causal=causal, launch=cfg) for c in args.chunks for causal in (True, False)
            for _, cfg in variants(max(args.n), c, causal)])
    q = k = v = None
    for n in sorted({r["n"] for r in rows}):
        if budget.spent(f"step 4: n={n}"):
            break
        q, k, v = qkv(n)
        for row in (r for r in rows if r["n"] == n):
            causal = row["mode"] == "causal"
            for c in args.chunks:
                for column, cfg in variants(n, c, causal):
                    time_variant(row, column, lambda: mta_forward_triton(q, k, v, None, chunk_size=c, causal=causal,
                                                                         launch=cfg))
            print(json.dumps(row), flush=True)
            save(args, head, rows, sweep, prepass, {}, [])
        q = k = v = None
        empty_cache()

    # 5. extras at 64K causal, c = 128
    extras = {}
    if ((65536 in args.n and 128 in args.chunks) or args.dry_run) and not budget.spent("step 5", need=60):
        n, c = (65536, 128) if not args.dry_run else (256, 32)
        q, k, v = qkv(4096 if not args.dry_run else n)  # the launches below, compiled ahead (same specialisation)
        qg, kg, vg = qkv(q.shape[2], hkv=max(1, H // 4))

        from mta_rewrite.ops.attention import attention_autograd

        def continued(q, k, v, m):
            """The op as use_mta runs a prompt continued over a cache: m new queries after n − m cached
            tokens, the rows from the first new query block on (attention_autograd's rows_from)."""
            with torch.no_grad():
                return attention_autograd(q, k, v, rows_from=q.shape[2] - m, chunk_size=c, causal=True,
                                          local_chunks=2, sinks=4, top_k=2)

        def segments(length):  # boundary chunks: runs of 100 tokens on average (a sentence, a paragraph)
            g = torch.Generator().manual_seed(7)
            return torch.cumsum((torch.rand(1, length, generator=g) < 0.01).long(), dim=1).to(DEVICE)

        compile_ahead("step 5", [
            lambda: torch.ops.mta.attention(q, k, v, chunk_size=c, causal=True, local_chunks=2, sinks=4, top_k=2),
            lambda: torch.ops.mta.attention(qg, kg, vg, chunk_size=c, causal=True),
            lambda: torch.ops.mta.attention(q, k, v, None, torch.zeros(H, q.shape[3], device=DEVICE), chunk_size=c,
                                            causal=True),
            lambda: torch.ops.mta.attention(q, k, v, None, None, segments(q.shape[2]), chunk_size=c, causal=True),
            lambda: segmented(dispatch_cuda, q, k, v, None, segments(q.shape[2]), chunk_size=c, causal=True, scale=None,
                              local_chunks=1, sinks=0, top_k=0),
            lambda: torch.ops.mta.attention(q, k, v, None, None, None, k[0, :, :64].float(), chunk_size=c),
            *(lambda atomics=atomics: mta_backward_triton(q, k, v, None, torch.randn_like(q), chunk_size=c, causal=True,
                                                          summary_atomics=atomics) for atomics in (True, False)),
            lambda: mta_backward_triton(q, k, v, None, torch.randn_like(q), chunk_size=c, causal=True,
                                        chunk_starts=chunk_bounds(segments(q.shape[2]), 1, c, 0)),
            lambda: mta_backward_triton(q, k, v, None, torch.randn_like(q), chunk_size=c,
                                        centroids=k[0, :, :64].float()),
            lambda: continued(q, k, v, min(2048, q.shape[2] // 4))])
        qg = kg = vg = None
        q, k, v = qkv(n)
        nc = n // c
        logn = torch.empty(1, H, nc, device=DEVICE)
        extras["summary_prepass_ms"] = median_ms(lambda: _chunk_means(k, v, None, c, nc, 0, 1.0, logn))
        w = torch.randn(H, q.shape[3], device=DEVICE) * 0.1  # learned summaries: one online softmax per chunk
        extras["summary_prepass_learned_ms"] = median_ms(lambda: _chunk_means(k, v, None, c, nc, 0, 1.0, logn,
                                                                              summary_weight=w))
        extras["learned_summaries_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, None, w, chunk_size=c,
                                                                                   causal=True))
        # boundary chunks: the tokens moved into padded chunk slots (key padding in the kernels) and back
        seg = segments(n)
        from mta_rewrite.ops.segments import padded_length

        extras["boundary_padded_over_n"] = padded_length(seg, c) / n
        extras["boundary_chunks_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, None, None, seg, chunk_size=c,
                                                                                 causal=True))  # no padding (VARLEN)
        # the same in padded chunk slots (the route before the unpadded kernels, and other masks' now)
        time_variant(extras, "boundary_chunks_slots", lambda: segmented(dispatch_cuda, q, k, v, None, seg, chunk_size=c,
                                                                        causal=True, scale=None, local_chunks=1,
                                                                        sinks=0, top_k=0))
        # the CPU's unpadded path (ops/varlen.py: torch ops, attention by matmul + softmax off the
        # CPU) on the GPU: whether CUDA should route boundary chunks there instead of the slots
        from mta_rewrite.ops.varlen import mta_attention_varlen

        time_variant(extras, "boundary_unpadded_portable", lambda: mta_attention_varlen(q, k, v, None, seg, chunk_size=c,
                                                                                        causal=True))
        empty_cache()
        seg = None
        # clustered summaries (non-causal): 64 centroids per head drawn from the keys; the pre-pass
        # (assignment, sums per chunk and cluster, each query chunk's summaries) alone, and the op,
        # against chunk summaries (non-causal) at the same c in the same run
        from mta_rewrite.kernels.clusters import cluster_summaries

        mu = k[0, :, ::n // 64].float().contiguous()
        extras["clustered_prepass_K64_ms"] = median_ms(lambda: cluster_summaries(k, v, None, mu, c, nc, 1, 0))
        extras["clustered_K64_full_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, None, None, None, mu,
                                                                                    chunk_size=c))
        extras["chunks_full_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, chunk_size=c))
        mu = None
        empty_cache()
        kw = dict(chunk_size=c, causal=True, local_chunks=2, sinks=4, top_k=2)
        extras["L2_sinks4_topk2_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, **kw))
        # a prompt continued over a cache (use_mta: a chunked prefill's last piece, a second turn):
        # 2048 new queries after n − 2048 cached, the kernel's grid from the first new query block,
        # against every row (the line above) and exact attention of the 2048 rows over the n keys
        # (cuDNN, no mask: their causal triangle leaves out fewer than 2048 of the n keys)
        m = min(2048, n // 4)
        extras["continued_2048_after_n_rows_from_ms"] = median_ms(lambda: continued(q, k, v, m))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            try:
                extras["continued_2048_sdpa_cudnn_ms"] = median_ms(
                    lambda: F.scaled_dot_product_attention(q[:, :, -m:], k, v))
            except RuntimeError as exc:
                extras["continued_2048_sdpa_cudnn_error"] = str(exc).splitlines()[0]
        # a model's q, k, v: transposed [B, n, H, d] buffers, read in place (no copies) by the kernel
        time_variant(extras, "contiguous_qkv", lambda: torch.ops.mta.attention(q, k, v, chunk_size=c, causal=True))
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        time_variant(extras, "transposed_qkv", lambda: torch.ops.mta.attention(q, k, v, chunk_size=c, causal=True))
        q = k = v = None
        q, k, v = qkv(n, hkv=max(1, H // 4))
        extras["gqa_8kv_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, chunk_size=c, causal=True))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            try:
                extras["gqa_8kv_sdpa_cudnn_ms"] = median_ms(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            except RuntimeError as exc:
                extras["gqa_8kv_sdpa_cudnn_error"] = str(exc).splitlines()[0]
        # learned sink logits (GPT-OSS's attention: 64 query / 8 key-value heads of 64): the op on the
        # operands the rewrite gives such a site (passes.lower.sink_logit_operands: one more token and
        # d + 1 = 65, so tiles of 128), with the graph's work around it, against the same site
        # without sink logits and cuDNN SDPA (no sink term) in the same run
        from mta_rewrite.passes.lower import drop_sink_token, sink_logit_operands

        q = k = v = None
        hq, hkv = (64, 8) if DEVICE == "cuda" else (8, 1)
        gen = torch.Generator(device=DEVICE).manual_seed(11)
        sink_dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # (as qkv: the interpreter's bf16 dot)
        q, k, v = (torch.randn(1, h, n, 64, device=DEVICE, dtype=sink_dtype, generator=gen) for h in (hq, hkv, hkv))
        column = torch.randn(1, hq, 1, 1, device=DEVICE, dtype=sink_dtype, generator=gen)

        def with_sink_logits():
            q1, k1, v1, _ = sink_logit_operands(q, k, v, None, column, 64 ** -0.5)
            return drop_sink_token(torch.ops.mta.attention(q1, k1, v1, chunk_size=c, causal=True, scale=64 ** -0.5,
                                                           sinks=1))

        time_variant(extras, "sink_logits_gptoss", with_sink_logits)
        time_variant(extras, "sink_logits_gptoss_without", lambda: torch.ops.mta.attention(q, k, v, chunk_size=c,
                                                                                           causal=True))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            time_variant(extras, "sink_logits_gptoss_sdpa_cudnn",
                         lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        q = k = v = column = None
        empty_cache()
        # forward + backward through autograd (the Triton backward: no top-k) vs SDPA's
        q, k, v = (x.requires_grad_() for x in qkv(n))
        grad_out = torch.randn_like(q)

        def step(fn):
            def run():
                fn().backward(grad_out)
                q.grad = k.grad = v.grad = None
            return run

        time_variant(extras, "fwd_bwd", step(lambda: torch.ops.mta.attention(q, k, v, chunk_size=c, causal=True)))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            try:
                extras["fwd_bwd_sdpa_cudnn_ms"] = median_ms(step(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
            except RuntimeError as exc:
                extras["fwd_bwd_sdpa_cudnn_error"] = str(exc).splitlines()[0]
        q, k, v = (x.detach() for x in (q, k, v))
        for name, atomics in (("bwd_summary_atomics", True), ("bwd_summary_kernel", False)):  # backward alone
            time_variant(extras, name, lambda: mta_backward_triton(q, k, v, None, grad_out, chunk_size=c, causal=True,
                                                                   summary_atomics=atomics))
        w = torch.randn(H, q.shape[3], device=DEVICE) * 0.1  # learned summaries: the same kernels, dw in torch
        time_variant(extras, "bwd_learned", lambda: mta_backward_triton(q, k, v, None, grad_out, chunk_size=c,
                                                                        causal=True, summary_weight=w))
        w = None
        # boundary chunks' backward: reading the chunks where they lie, against the slots' (the
        # tokens moved into padded chunk slots, the fixed-chunk backward there, moved back)
        seg = segments(n)
        starts = chunk_bounds(seg, 1, c, 0)
        time_variant(extras, "boundary_bwd", lambda: mta_backward_triton(q, k, v, None, grad_out, chunk_size=c,
                                                                         causal=True, chunk_starts=starts))
        lay = segment_layout(seg, 1, c, 0)
        slot_keep = slot_mask(None, lay, 1, H, n)

        def slots_backward():
            padded = [to_slots(x, lay) for x in (q, k, v, grad_out)]
            grads = backward_cuda(*padded[:3], slot_keep, padded[3], chunk_size=lay.width, causal=True, scale=None,
                                  local_chunks=1, sinks=0, top_k=0)
            return [from_slots(g, lay) for g in grads]

        time_variant(extras, "boundary_bwd_slots", slots_backward)
        seg = starts = lay = slot_keep = None
        empty_cache()
        # clustered summaries' backward (non-causal, K = 64): the Triton kernels against the
        # portable implementation recomputed under autograd (the op's route for them before)
        mu = k[0, :, ::n // 64].float().contiguous()
        time_variant(extras, "clustered_K64_bwd", lambda: mta_backward_triton(q, k, v, None, grad_out, chunk_size=c,
                                                                              centroids=mu))

        def clustered_recomputed():
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            out = mta_attention_clustered(*leaves, None, chunk_size=c, centroids=mu)
            return torch.autograd.grad(out, leaves, grad_out)

        time_variant(extras, "clustered_K64_bwd_recompute", clustered_recomputed)
        mu = None
        q = k = v = grad_out = None
        q, k, v = qkv(1024)
        extras["n1024_causal_c64_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, chunk_size=64, causal=True))
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                extras["n1024_causal_sdpa_cudnn_ms"] = median_ms(
                    lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        except RuntimeError as exc:
            extras["n1024_causal_sdpa_cudnn_error"] = str(exc).splitlines()[0]
        q = k = v = None
        print(json.dumps(extras), flush=True)
        save(args, head, rows, sweep, prepass, extras, [])

    # 6. FlexAttention on the same math (kernels/flex.py), the baseline #6 names: block mask built
    #    from block indices once per shape (timed apart), flex_attention compiled once per shape
    flex = []
    points = [(256, True, 32)] if args.dry_run else [p for p in FLEX_POINTS if p[0] in args.n] if args.flex else []
    for n, causal, c in points:
        if budget.spent(f"step 6: n={n}", need=60):  # compiling flex_attention takes most of it
            break
        from mta_rewrite.kernels.flex import mta_block_mask, mta_flex_attention

        q, k, v = qkv(n)
        kw = dict(chunk_size=c, causal=causal)
        entry = {"n": n, "mode": "causal" if causal else "full", "chunk": c}
        try:
            sync()
            t0 = time.perf_counter()
            bm = mta_block_mask(n, device=DEVICE, **kw)
            sync()
            entry["block_mask_build_ms"] = 1e3 * (time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = mta_flex_attention(q, k, v, block_mask=bm, **kw)
            sync()
            entry["first_call_s"] = time.perf_counter() - t0  # compiles
            entry["rel_err_vs_mta"] = rel_err(out, torch.ops.mta.attention(q, k, v, **kw).float())
            out = None
            from torch._dynamo.utils import counters

            graphs = counters["stats"]["unique_graphs"]
            entry["flex_ms"] = median_ms(lambda: mta_flex_attention(q, k, v, block_mask=bm, **kw))
            # a recompilation inside the timing would be timed too: say so
            entry["graphs_compiled_while_timing"] = counters["stats"]["unique_graphs"] - graphs
            entry["mta_ms"] = median_ms(lambda: torch.ops.mta.attention(q, k, v, **kw))
        except Exception as exc:  # noqa: BLE001 - report (e.g. out of memory, a compile error) and go on
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        flex.append(entry)
        print(json.dumps(entry), flush=True)
        save(args, head, rows, sweep, prepass, extras, flex)
        q = k = v = bm = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    # 7. a whole model, rewritten vs original
    models = []
    if args.model:
        models = whole_model(args, lambda: save(args, head, rows, sweep, prepass, extras, flex, models=models),
                             SDPBackend, sdpa_kernel, models, budget)

    save(args, head, rows, sweep, prepass, extras, flex, final=True, models=models)
    print(f"bench wall time {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
