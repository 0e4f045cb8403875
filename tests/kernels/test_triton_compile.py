"""The fused forward compiles for Hopper and Ampere (PTX and cubin) without a GPU.

The interpreter checks what the kernel computes; this checks that Triton's real compiler accepts
it (types of runtime branches, dot shapes, layouts) for each dtype and specialisation, so that a
lent GPU's time is not spent on compile errors. It runs in a child process without
TRITON_INTERPRET (this folder's conftest sets it for the interpreter tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CHILD = r"""
import inspect, json, sys, traceback
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mta_rewrite.kernels.clusters import _cluster_sums_kernel, _nearest_kernel
from mta_rewrite.kernels.mta_bwd import _mta_bwd_keys_kernel, _mta_bwd_rows_kernel, _mta_bwd_summaries_kernel
from mta_rewrite.kernels.mta_fwd import _chunk_mean_kernel, _mta_fwd_kernel


class Skip(Exception):
    pass


def source(fn, signature, constexprs):
    params = list(inspect.signature(fn.fn).parameters)
    try:
        return ASTSource(fn=fn, signature=signature, constexprs={(params.index(k),): v for k, v in constexprs.items()})
    except TypeError as exc:
        raise Skip(str(exc))


def check(fn, src, cap, options):
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    assert fn.fn.__name__ in kernel.asm["ptx"] and len(kernel.asm["cubin"]) > 0


def forward(dtype, causal, keymask, cap, block_m, warps, fused, loops, wide, clustered):
    pointers = {"q_ptr", "k_ptr", "v_ptr", "kbar_ptr", "vbar_ptr", "out_ptr", "x_ptr", "y_ptr", "xbar_ptr", "ybar_ptr"}
    other = {"logn_ptr": "*fp32", "sw_ptr": "*fp32", "sel_ptr": "*i32", "sync_ptr": "*i32", "keyok_ptr": "*i8",
             "scale": "fp32", "qk_scale": "fp32", "mu_ptr": "*fp32", "ids_ptr": "*i32", "starts_ptr": "*i32",
             "ck_ptr": "*fp32", "cv_ptr": "*fp32", "cn_ptr": "*fp32"}

    def build(fn, constexprs, descs=None, **options):
        params = list(inspect.signature(fn.fn).parameters)
        signature = {p: f"*{dtype}" if p in pointers else "constexpr" if p in constexprs else other.get(p, "i32")
                     for p in params}
        signature.update(descs or {})
        check(fn, source(fn, signature, constexprs), cap, options)

    descs = ("kd", "vd", "skd", "svd")
    build(_mta_fwd_kernel, {"CAUSAL": causal, "HAS_KEYMASK": keymask, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                            "HEAD_D": 128, "HAS_TOPK": not fused and clustered != 1, "TOPK_PAD": 2, "FUSED": bool(fused),
                            "MAX_SPIN": 1 << 16, "ONE_LOOP": loops == 1, "CHUNK_MAJOR": fused == 2, "TMA": loops == 2,
                            "WIDE": bool(wide), "CLUSTERED": clustered == 1, "VARLEN": clustered == 2,
                            "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_D": 128}
          | ({} if loops == 2 else {name: None for name in descs}),
          descs={name: f"tensordesc<{dtype}[64, 128]>" for name in descs} if loops == 2 else None,
          num_warps=warps, num_stages=3)
    for learned in (False, True):  # mean or learned summaries
        build(_chunk_mean_kernel, {"HAS_Y": True, "HAS_KEYMASK": keymask, "WRITE_LOGN": True, "LEARNED": learned,
                                   "HEAD_D": 128, "BLOCK_C": 64, "BLOCK_D": 128, "WIDE": bool(wide),
                                   "VARLEN": clustered == 2}, num_warps=4)
    if clustered == 1:  # the clustered summaries' pre-pass
        build(_nearest_kernel, {"HEAD_D": 128, "BLOCK_T": 64, "BLOCK_K": 32, "BLOCK_D": 128, "WIDE": bool(wide)},
              num_warps=4)
        build(_cluster_sums_kernel, {"HAS_KEYMASK": keymask, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                                     "HEAD_D": 128, "BLOCK_C": 64, "BLOCK_K": 32, "BLOCK_D": 128, "WIDE": bool(wide)},
              num_warps=4)


def backward(dtype, causal, keymask, varlen, clustered):
    typed = {"q_ptr", "k_ptr", "v_ptr", "kbar_ptr", "vbar_ptr", "do_ptr", "dq_ptr"}
    fp32 = {"logn_ptr", "lse_ptr", "delta_ptr", "dkbar_ptr", "dvbar_ptr", "dk_ptr", "dv_ptr", "dks_ptr", "dvs_ptr"}
    for fn in (_mta_bwd_rows_kernel, _mta_bwd_keys_kernel, _mta_bwd_summaries_kernel):
        params = list(inspect.signature(fn.fn).parameters)
        constexprs = {"CAUSAL": causal, "HAS_KEYMASK": keymask, "PRECISION": "ieee" if dtype == "fp32" else "tf32",
                      "HAS_TOPK": causal, "TOPK_PAD": 2, "HEAD_D": 128, "SUMMARY_ATOMICS": not keymask, "BLOCK_M": 64,
                      "BLOCK_N": 32, "BLOCK_D": 128, "VARLEN": varlen, "CLUSTERED": clustered}
        constexprs = {k: v for k, v in constexprs.items() if k in params}
        signature = {p: f"*{dtype}" if p in typed else "*fp32" if p in fp32 else "*i8" if p == "keyok_ptr"
                     else "*i32" if p in ("sel_ptr", "starts_ptr", "chunk_of_ptr")
                     else "constexpr" if p in constexprs else "fp32" if p in ("qk_scale", "scale") else "i32"
                     for p in params}
        check(fn, source(fn, signature, constexprs), 90, dict(num_warps=4, num_stages=2))


for line in sys.stdin:  # one job a line: ["forward" or "backward", its arguments]
    kind, args = json.loads(line)
    try:
        (forward if kind == "forward" else backward)(*args)
        result = "OK"
    except Skip as exc:
        result = f"SKIP {exc}"
    except Exception:  # reported with the job, the next job still compiles
        result = "FAIL " + traceback.format_exc()[-3000:]
    print("RESULT", json.dumps([kind, args, result]), flush=True)
"""

# fused: 0 pre-pass, 1 fused head by head, 2 fused chunk by chunk; loops: 0 three, 1 one, 2 three with
# TMA; wide: 64-bit batch and head offsets; clustered: 1 clustered summaries (non-causal) and their
# pre-pass, 2 boundary chunks read without padding (VARLEN, the main kernel and the pre-pass)
FORWARD = [
    ("bf16", True, True, 90, 128, 4, 0, 0, 0, 0), ("bf16", True, False, 90, 64, 4, 1, 0, 0, 0),
    ("bf16", True, True, 90, 128, 8, 2, 0, 0, 0), ("fp16", False, False, 90, 128, 8, 0, 0, 0, 0),
    ("fp32", True, False, 90, 64, 4, 0, 0, 0, 0), ("bf16", False, True, 80, 64, 4, 0, 0, 0, 0),
    ("bf16", True, True, 90, 128, 4, 0, 1, 0, 0), ("bf16", False, False, 90, 128, 8, 0, 1, 0, 0),
    ("bf16", True, True, 90, 128, 4, 0, 2, 0, 0), ("fp16", False, False, 90, 64, 4, 0, 2, 0, 0),
    ("bf16", True, True, 90, 128, 4, 2, 0, 1, 0), ("bf16", True, False, 90, 128, 4, 0, 2, 1, 0),
    ("bf16", False, True, 90, 128, 4, 0, 0, 0, 1), ("bf16", False, False, 90, 128, 4, 0, 2, 0, 1),
    ("fp16", False, True, 80, 64, 4, 0, 0, 1, 1), ("bf16", True, True, 90, 128, 4, 0, 0, 0, 2),
    ("fp16", False, False, 90, 64, 4, 0, 1, 0, 2),
]
# varlen: boundary chunks read where they lie (VARLEN); clustered: clustered summaries (CLUSTERED)
BACKWARD = [("bf16", True, True, False, False), ("fp16", False, False, False, False), ("bf16", True, True, True, False),
            ("bf16", False, False, False, True)]


@pytest.fixture(scope="module")
def compiled():
    """Every configuration below compiled by one child process (importing torch and the kernels
    took 3 of the 3.7 s each configuration's own child took), each result by itself: the
    configuration's test fails or skips alone."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = [("forward", list(p)) for p in FORWARD] + [("backward", list(p)) for p in BACKWARD]
    run = subprocess.run([sys.executable, "-c", CHILD], input="".join(json.dumps(job) + "\n" for job in jobs),
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line[len("RESULT "):]) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    return {(kind, tuple(args)): result for kind, args, result in results}


def _check(compiled, key):
    assert key in compiled, f"the child reported nothing for {key}"
    if compiled[key].startswith("SKIP"):
        pytest.skip(f"this triton's ASTSource takes other arguments: {compiled[key]}")
    assert compiled[key] == "OK", compiled[key]


@pytest.mark.parametrize("dtype,causal,keymask,cap,block_m,warps,fused,loops,wide,clustered", FORWARD)
def test_compiles_to_cubin(compiled, dtype, causal, keymask, cap, block_m, warps, fused, loops, wide, clustered):
    _check(compiled, ("forward", (dtype, causal, keymask, cap, block_m, warps, fused, loops, wide, clustered)))


@pytest.mark.parametrize("dtype,causal,keymask,varlen,clustered", BACKWARD)
def test_backward_compiles_to_cubin(compiled, dtype, causal, keymask, varlen, clustered):
    _check(compiled, ("backward", (dtype, causal, keymask, varlen, clustered)))


TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "kernel_resources.py")


def test_resource_report_offline(tmp_path):
    """benchmarks/kernel_resources.py reads registers, spills and shared memory off a real cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "res.md"
    run = subprocess.run([sys.executable, TOOL, "--kinds", "prepass", "one_loop", "tma", "--tiles", "128,32,8,3",
                          "128,32,8,3,128", "--out", str(out)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["kind"], r["max_registers"]) for r in rows] == [(k, cap) for k in ("prepass", "one_loop", "tma")
                                                                for cap in (None, 128)]
    for r in rows:
        if r["max_registers"]:  # the cap holds, and two 8-warp blocks (80 KB of shared memory each) fit
            assert r["registers"] <= 128 and r["blocks_per_sm"] == 2
        assert 0 < r["registers"] <= 255 and r["HGMMA"] > 0  # sm_90: wgmma
        # q (128 × 128 bf16) and three stages of a 32 × 128 key and value tile live in shared memory
        assert r["shared_bytes"] >= 3 * 2 * 32 * 128 * 2
        assert r["blocks_per_sm"] >= 1 and r["warps_per_sm"] == 8 * r["blocks_per_sm"]
    assert "| prepass | (128, 32, 8, 3) |" in out.read_text()


def test_resource_report_rejects_bad_tiles():
    run = subprocess.run([sys.executable, TOOL, "--tiles", "128,32,8"], capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0
    assert "--tiles takes M,N,WARPS,STAGES[,MAXREGS]" in run.stderr


# benchmarks/precompile.py on the real compiler. There is no GPU driver here, so a stand-in answers
# the three questions a compile-only launch asks (device, stream, target: sm_90); on a GPU the
# real driver answers them.
PRECOMPILE_CHILD = r"""
import sys, threading
sys.path[:0] = [sys.argv[1] + "/benchmarks", sys.argv[1]]
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

class StandIn:
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)

driver.set_active(StandIn())
from mta_rewrite.kernels import mta_fwd
from mta_rewrite.kernels.mta_fwd import LaunchConfig, mta_forward_triton
import precompile

run = JITFunction.run
q, k, v = (torch.randn(1, 2, 256, 64, dtype=torch.bfloat16) for _ in range(3))
cfgs = [LaunchConfig(64, 32, 4, 2), LaunchConfig(64, 32, 4, 2, one_loop=True)]
calls = [lambda cfg=cfg: mta_forward_triton(q, k, v, None, chunk_size=64, causal=True, launch=cfg) for cfg in cfgs]
threads = set()
import triton.compiler.compiler as cc
real_compile = cc.compile
def counting_compile(*a, **kw):
    threads.add(threading.get_ident())
    return real_compile(*a, **kw)
for fn in (mta_fwd._mta_fwd_kernel, mta_fwd._chunk_mean_kernel):
    fn.device_caches[0]  # build the binder, then count the compiles it makes
    fn.compile = counting_compile
report = precompile.compile_ahead(calls, workers=2)
assert report.get("calls") == 2, report
assert JITFunction.run is run  # launches launch again
assert len(mta_fwd._mta_fwd_kernel.device_caches[0][0]) == 2 and len(mta_fwd._chunk_mean_kernel.device_caches[0][0]) == 1
assert threading.get_ident() not in threads and threads, threads  # compiled in the pool's threads
for kernel in mta_fwd._mta_fwd_kernel.device_caches[0][0].values():
    assert kernel.metadata.num_warps == 4 and kernel.metadata.num_stages == 2 and len(kernel.asm["cubin"]) > 0
compiled = []
original = JITFunction._do_compile
JITFunction._do_compile = lambda self, *a, **kw: compiled.append(self) or original(self, *a, **kw)
with precompile.compile_only():  # the launches the benchmark times find their kernels compiled
    for call in calls:
        call()
assert compiled == [], compiled
bad = precompile.compile_ahead([lambda: mta_forward_triton(q, k, v, None, chunk_size=64, causal=False,
                                                           launch=LaunchConfig(64, 32, 4, 2, fused=True))])
assert "fused" in bad["error"] and JITFunction.run is run, bad
print("OK")
"""


def test_precompile_fills_the_kernel_cache_in_threads():
    """compile_ahead compiles each launch's kernel (same specialisation as the launch) in a thread
    pool and leaves it in the kernel's cache: the same launches then compile nothing; a launch
    that fails is reported and launching is restored."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", PRECOMPILE_CHILD, os.path.join(os.path.dirname(__file__), "..", "..")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "OK"
