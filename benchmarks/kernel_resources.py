"""What the fused forward costs a GPU's multiprocessor, without a GPU: registers, spills, shared
memory and the blocks per multiprocessor they allow, for each kernel variant and tile choice.

    python benchmarks/kernel_resources.py [--chunk 256] [--n 65536] [--full] [--arch 90] [--out FILE]

Each configuration of ``_mta_fwd_kernel`` (the variants and tiles that benchmarks/gpu_bench.py
sweeps) is compiled by Triton's real compiler to a cubin for the target and read back with the
``cuobjdump`` that ships with Triton: registers per thread, stack bytes (spills), local-memory
loads and stores in the SASS, tensor-core instructions (HGMMA: Hopper's wgmma; HMMA: the older
path), dynamic shared memory, and the resulting blocks and warps per multiprocessor (H100:
65,536 registers, 228 KB shared memory, 1 KB of it reserved per block).

The arguments are specialised as ``JITFunction.run`` specialises those of a representative call
(B = 1, H = 32, d = 128, bf16, --n tokens, --chunk): integers equal to 1 become constants and
multiples of 16 carry the divisibility hint, pointers are 16-byte aligned. Without these hints the
compiler cannot prove the strides aligned and emits scalar 16-bit loads, and every tile choice
reads as 255 registers (a wrong conclusion an earlier note drew from a bare compile).

Use the Triton version of the GPU you will run on (the lent H100 has 3.6: a virtual environment
with ``pip install triton==3.6.0 torch==2.13.0`` reproduces its compiler). Nothing is timed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REGS_PER_SM, SMEM_PER_SM, SMEM_RESERVED, MAX_WARPS = 65536, 228 * 1024, 1024, 64
POINTERS = {"q_ptr", "k_ptr", "v_ptr", "kbar_ptr", "vbar_ptr", "out_ptr"}
OTHER = {"logn_ptr": "*fp32", "sel_ptr": "*i32", "sync_ptr": "*i32", "keyok_ptr": "*i8", "qk_scale": "fp32", "starts_ptr": "*i32"}


def call_values(n: int, c: int, H: int, d: int) -> dict[str, int]:
    """The integer arguments of ``_mta_fwd_kernel`` at B = 1, Hq = Hkv = H, L = 1, no sinks or top-k."""
    nc = -(-n // c)
    x = dict(b=H * n * d, h=n * d, n=d)
    return dict(stride_qb=x["b"], stride_qh=x["h"], stride_qn=d, stride_kb=x["b"], stride_kh=x["h"], stride_kn=d,
                stride_vb=x["b"], stride_vh=x["h"], stride_vn=d, stride_sb=H * nc * d, stride_sh=nc * d, stride_sj=d,
                stride_lb=H * nc, stride_lh=nc, stride_lj=1, stride_selb=1, stride_selh=1, stride_seli=1,  # the placeholder
                stride_ob=x["b"], stride_oh=x["h"], stride_on=d, n=n, nc=nc, c=c, L=1, sinks=0, top_k=0,
                Hq=H, Hkv=H, G=1, clusters=0, first_block=0, stride_csb=0)


def compile_cubin(fn, constexprs: dict, values: dict, dtype: str, arch: int, num_warps: int, num_stages: int,
                  extra: dict | None = None, max_registers: int | None = None):
    """``extra``: signature entries that override the defaults (tensor descriptors)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn.fn).parameters)
    constexprs = dict(constexprs) | {p: 1 for p, v in values.items() if v == 1}  # JIT: ints equal to 1
    sig = {p: f"*{dtype}" if p in POINTERS else "constexpr" if p in constexprs else OTHER.get(p, "i32") for p in params}
    sig |= extra or {}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in params
             if sig[p].startswith("*") or (sig[p] == "i32" and values.get(p, 1) % 16 == 0)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if max_registers:
        options["maxnreg"] = max_registers
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resources(kernel, num_warps: int) -> dict:
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True).stdout
        sass = subprocess.run([str(cuobjdump), "-sass", str(path)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump gave no resource line: {usage[:200]!r}")
    regs, stack = int(found.group(1)), int(found.group(2))
    smem = int(kernel.metadata.shared)
    regs_per_warp = -(-regs // 8) * 8 * 32  # allocated per warp, 8 registers per thread at a time
    blocks = min(REGS_PER_SM // (regs_per_warp * num_warps), SMEM_PER_SM // (smem + SMEM_RESERVED),
                 MAX_WARPS // num_warps)
    return {"registers": regs, "stack_bytes": stack, "LDL": len(re.findall(r"\bLDL", sass)),
            "STL": len(re.findall(r"\bSTL", sass)), "HGMMA": len(re.findall(r"\bHGMMA", sass)),
            "HMMA": len(re.findall(r"\bHMMA", sass)), "shared_bytes": smem, "blocks_per_sm": blocks,
            "warps_per_sm": blocks * num_warps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--full", action="store_true", help="not causal (default: causal)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200)")
    ap.add_argument("--kinds", nargs="+", help="only these variants (default: every one in gpu_bench.KINDS)")
    ap.add_argument("--tiles", nargs="+", metavar="M,N,WARPS,STAGES[,MAXREGS]",
                    help="only these tiles, optionally with a register cap (default: gpu_bench.SWEEP's per variant)")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) and the rows (json, beside it)")
    args = ap.parse_args(argv)
    try:
        only_tiles = [tuple(int(x) for x in t.split(",")) for t in args.tiles or []]
        if any(len(t) not in (4, 5) for t in only_tiles):
            raise ValueError
    except ValueError:
        print(f"error: --tiles takes M,N,WARPS,STAGES[,MAXREGS] (four or five integers), got {args.tiles}",
              file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("error: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    import torch
    from rich.console import Console
    from rich.table import Table

    from gpu_bench import KINDS, SWEEP
    from mta_rewrite.kernels.mta_fwd import _mta_fwd_kernel, default_launch

    d, causal = 128, not args.full
    default = default_launch(args.chunk, d, torch.bfloat16)
    unknown = set(args.kinds or []) - set(KINDS)
    if unknown:
        print(f"error: unknown kind(s) {sorted(unknown)}; choose from {list(KINDS)}", file=sys.stderr)
        return 2
    rows = []
    for kind, opts in KINDS.items():
        if (opts.get("fused") and not causal) or (args.kinds and kind not in args.kinds):
            continue
        for bm, bn, warps, stages, *cap in only_tiles or SWEEP[kind]:
            if bm > max(16, triton.next_power_of_2(args.chunk)):
                continue
            tma = bool(opts.get("tma"))
            constexprs = {"CAUSAL": causal, "HAS_KEYMASK": False, "PRECISION": "tf32", "HEAD_D": d, "HAS_TOPK": False,
                          "TOPK_PAD": 1, "FUSED": bool(opts.get("fused")), "MAX_SPIN": 1 << 16,
                          "ONE_LOOP": bool(opts.get("one_loop")), "CHUNK_MAJOR": bool(opts.get("chunk_major")),
                          "TMA": tma, "WIDE": False, "CLUSTERED": False, "VARLEN": False, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": d}
            descs = ("kd", "vd", "skd", "svd")
            if not tma:  # the launcher passes None: a constant
                constexprs |= {name: None for name in descs}
            values = call_values(args.n, args.chunk, args.heads, d)
            if opts.get("chunk_major"):
                values["stride_lj"] = 8  # log2 n_j one per 32-byte sector (mta_forward_triton)
            kernel = compile_cubin(_mta_fwd_kernel, constexprs, values, "bf16",
                                   args.arch, warps, stages, max_registers=cap[0] if cap else None,
                                   extra={name: f"tensordesc<bf16[{bn}, {d}]>" for name in descs} if tma else None)
            is_default = kind == "prepass" and not cap and (bm, bn, warps, stages) == (
                default.block_m, default.block_n, default.num_warps, default.num_stages)
            rows.append({"kind": kind, "tiles": [bm, bn, warps, stages], "max_registers": cap[0] if cap else None,
                         "default": is_default,
                         **resources(kernel, warps)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    title = (f"_mta_fwd_kernel on sm_{args.arch}, triton {triton.__version__}: n={args.n}, c={args.chunk}, "
             f"{'causal' if causal else 'full'}, d={d}, bf16")
    table = Table(title=title)
    cols = ["kind", "tiles (M, N, warps, stages)", "register cap", "registers", "stack B", "LDL/STL", "HGMMA",
            "shared KB", "blocks/SM", "warps/SM"]
    for col in cols:
        table.add_column(col)
    md = [title, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["kind"] + (" (default)" if r["default"] else ""), str(tuple(r["tiles"])),
                 str(r["max_registers"] or "—"), str(r["registers"]),
                 str(r["stack_bytes"]), f"{r['LDL']}/{r['STL']}", str(r["HGMMA"]), f"{r['shared_bytes'] / 1024:.0f}",
                 str(r["blocks_per_sm"]), str(r["warps_per_sm"])]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console().print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((args.out, "\n".join(md) + "\n"),
                           (args.out.with_suffix(".json"), json.dumps({"title": title, "rows": rows}, indent=2) + "\n")):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)  # atomic: a reader never sees half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())
