"""mta_rewrite/kernels/interpreter.py: helper calls inside an interpreted launch skip re-patching
triton.language, overflow checks that device_assert would drop are not built, and nothing else
changes. Each case runs in a fresh interpreter process, once as Triton ships it and once patched,
so the two never share a patched module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

# One process: a kernel made of helpers (one of them reaching triton.language.core under its own
# name, which the launch does not swap), our forward kernel on every loop, a launch that fails
# inside a helper, and what triton.language looks like after each launch.
SCRIPT = r"""
import json, sys
import torch
if sys.argv[1] == "patched":
    from mta_rewrite.kernels.interpreter import speed_up_interpreter
    assert all(speed_up_interpreter().values()) and all(speed_up_interpreter().values())  # idempotent
import triton
import triton.language as tl
from triton.runtime import interpreter
from helpers_core import add_via_core

calls = {"patch_builtin": 0}
patch_builtin = interpreter._patch_builtin
def counting(*args, **kwargs):
    calls["patch_builtin"] += 1
    return patch_builtin(*args, **kwargs)
interpreter._patch_builtin = counting

@triton.jit
def _twice(x):
    return x * 2

@triton.jit
def _row(x_ptr, offs, FAIL: tl.constexpr):
    if FAIL:
        tl.static_assert(False, "failing on purpose")
    return _twice(tl.load(x_ptr + offs))

@triton.jit
def _kernel(x_ptr, y_ptr, BLOCK: tl.constexpr, FAIL: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, add_via_core(_row(x_ptr, offs, FAIL), 1.0))

x = torch.arange(64, dtype=torch.float32)
y = torch.empty_like(x)
_kernel[(4,)](x, y, BLOCK=16, FAIL=False)
def builtins_now():  # which of triton.language's functions are Triton's own again (not interpreter wrappers)
    return {f"{m.__name__}.{name}": tl.core.is_builtin(getattr(m, name)) for m in (tl, tl.core) for name in ("arange", "load", "maximum")}
restored = builtins_now()
try:
    _kernel[(4,)](x, y * 0, BLOCK=16, FAIL=True)
    failed = None
except Exception as exc:
    failed = type(exc).__name__
restored_after_failure = builtins_now()
_kernel[(4,)](x, y2 := torch.empty_like(x), BLOCK=16, FAIL=False)

from mta_rewrite.kernels.mta_fwd import LaunchConfig, mta_forward_triton
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, h, 40, 16, generator=g) for h in (2, 1, 1))
before = calls["patch_builtin"]
outs = [mta_forward_triton(q, k, v, None, chunk_size=8, causal=True, local_chunks=2, sinks=3, top_k=1,
                           launch=LaunchConfig(16, 16, 4, 1, one_loop=one_loop)) for one_loop in (False, True)]

# int32 arithmetic that overflows: wraps silently with debug off (the check is dropped, or with
# the patch never built), fails the launch with debug on (built and asserted, patched or not)
@triton.jit
def _times_four(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 4)

big = torch.tensor([1, 2**29, 2**30, -2**30], dtype=torch.int32)
wrapped = torch.empty_like(big)
_times_four[(1,)](big, wrapped, BLOCK=4)
import dataclasses
options = interpreter.interpreter_builder.options
interpreter.interpreter_builder.options = dataclasses.replace(options, debug=True)
try:
    _times_four[(1,)](big, torch.empty_like(big), BLOCK=4)
    overflow_in_debug = None
except Exception as exc:
    overflow_in_debug = str(exc)
interpreter.interpreter_builder.options = options
print(json.dumps({"y": y.tolist(), "y2": y2.tolist(), "restored": restored, "failed": failed,
                  "restored_after_failure": restored_after_failure,
                  "mta": [o.flatten().tolist() for o in outs], "patch_builtin_calls": calls["patch_builtin"] - before,
                  "wrapped": wrapped.tolist(), "overflow_in_debug": overflow_in_debug}))
"""

HELPER = '''
import triton
from triton.language import core


@triton.jit
def add_via_core(x, y):
    return core.maximum(x + y, x)
'''


def _run(mode: str, tmp_path: Path) -> dict:
    (tmp_path / "helpers_core.py").write_text(HELPER)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=600,
                         env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_patched_interpreter_computes_the_same_with_less_patching(tmp_path):
    shipped, patched = _run("shipped", tmp_path), _run("patched", tmp_path)
    expected = [2.0 * i + 1.0 for i in range(64)]
    for result in (shipped, patched):
        assert result["y"] == expected and result["y2"] == expected
        assert result["failed"] is not None  # the failing helper still fails the launch
        # the launch's modules are put back after it, also when it fails
        assert result["restored"]["triton.language.arange"] and result["restored_after_failure"]["triton.language.load"]
    # what is patched after a launch, as Triton ships it: the helper's triton.language.core stays
    # patched there (its helper-call scope is never restored), and the same here
    assert patched["restored"] == shipped["restored"] and patched["restored_after_failure"] == shipped["restored_after_failure"]
    assert patched["mta"] == shipped["mta"]  # our forward kernel, bit for bit
    # the launches' own patching stays (a few calls each); helper calls no longer repatch
    assert 0 < patched["patch_builtin_calls"] < shipped["patch_builtin_calls"] / 10, (patched, shipped)
    # overflow: wrapped alike with debug off; with debug on the check is built and fails the launch
    assert patched["wrapped"] == shipped["wrapped"] == [4, -2**31, 0, 0]
    for result in (shipped, patched):
        assert "int32 overflow detected for operation mul" in result["overflow_in_debug"], result["overflow_in_debug"]


def test_installed_for_the_kernel_tests():
    """conftest.py installs it wherever these tests run in the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernels compiled for the GPU here: no interpreter")
    from triton.runtime import interpreter

    assert getattr(interpreter._patch_lang, "patches_once", False)
    assert getattr(interpreter.interpreter_semantic.binary_op_sanitize_overflow_impl, "skips_discarded", False)


def test_kernels_index_without_int32_overflow_in_debug_mode(monkeypatch):
    """With the interpreter's debug on, every int32 +, - and * in our kernels is checked for
    overflow (and any device_assert holds): the forward on each kernel variant and the backward,
    with padding, GQA, sinks and a partial last chunk, launch cleanly and match the reference."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernels compiled for the GPU here: no interpreter")
    import dataclasses

    import torch
    from triton.runtime import interpreter

    from mta_rewrite.kernels.mta_bwd import mta_backward_triton
    from mta_rewrite.kernels.mta_fwd import mta_forward_triton
    from mta_rewrite.ops.reference import mta_attention_reference
    from mta_rewrite.kernels.mta_fwd import key_padding
    from tests.kernels.common import inputs, padding
    from tests.kernels.test_triton_bwd import reference_grads
    from tests.kernels.test_triton_fwd import FUSED, LAUNCHES

    monkeypatch.setattr(interpreter.interpreter_builder, "options",
                        dataclasses.replace(interpreter.interpreter_builder.options, debug=True))
    B, Hq, Hkv, n, d = 2, 2, 1, 90, 16
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, torch.float32, seed=1, grad=True)
    mask = padding(B, n)
    kw = dict(chunk_size=24, causal=True, local_chunks=2, sinks=3)
    ref = mta_attention_reference(q, k, v, mask, top_k=0, **kw)
    plain, one_loop, tma, fused, chunk_major = LAUNCHES[0], LAUNCHES[3], LAUNCHES[5], FUSED[0], FUSED[2]
    for cfg in (plain, one_loop, tma, fused, chunk_major):  # each kernel variant once
        out = mta_forward_triton(q, k, v, key_padding(mask, B, Hq, n), launch=cfg, top_k=0, **kw)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{cfg}: {m}")
    grads = mta_backward_triton(q, k, v, key_padding(mask, B, Hq, n), grad_out, top_k=1, **kw)
    for got, want in zip(grads, reference_grads(q, k, v, mask, grad_out, top_k=1, **kw)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
