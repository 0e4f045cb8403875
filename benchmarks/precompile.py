"""Compile the Triton kernels a benchmark will launch, in parallel threads, before timing starts.

A lent GPU comes with a fixed budget of device time, and gpu_bench.py's sweep alone launches some
forty configurations of ``_mta_fwd_kernel``, each compiled on first use, one after the other, in
about two seconds (measured on a 2-core CPU with triton 3.9). Most of a compile is LLVM and
ptxas, which do not hold Python's GIL, so threads overlap them: on 2 cores four compiles took
5.8 s in two threads against 8.0 s one after the other; a 16-core GPU host overlaps more.

``compile_ahead(calls)`` runs each zero-argument callable (a call of a launcher such as
``mta_forward_triton``) with every Triton launch turned into a ``warmup``: the launcher does its
host work and allocations, the kernel is specialised exactly as the real launch specialises it
(same arguments, same options), and compiled instead of launched. Triton's ``AsyncCompileMode``
(triton ≥ 3.4) sends the compiles to a thread pool and, on leaving, stores each compiled kernel
in the kernel's own cache, so the timed launches that follow find it there (tested with a
stand-in driver on triton 3.6 and 3.9: tests/kernels/test_triton_compile.py). A compile that
fails is left for the real launch to raise again (and the benchmark to report); if anything here
fails, the benchmark goes on with compiles on first use.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor


@contextlib.contextmanager
def compile_only():
    """Inside: a launch of any Triton kernel (``kernel[grid](*args, **options)``) compiles it for
    those arguments, as ``JITFunction.warmup`` does, instead of running it."""
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def warmup_run(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)

    JITFunction.run = warmup_run
    try:
        yield
    finally:
        JITFunction.run = run


def compile_ahead(calls, workers: int | None = None) -> dict:
    """Run ``calls`` with their Triton kernels compiled in ``workers`` threads instead of launched.
    Returns {"calls", "seconds", "workers"} or {"error": ...} (then nothing is lost: kernels
    compile on first use as usual)."""
    workers = workers or max(1, min(16, os.cpu_count() or 1))
    start = time.perf_counter()
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError as exc:  # triton < 3.4
        return {"error": f"no AsyncCompileMode in this triton: {exc}"}
    try:
        with ThreadPoolExecutor(workers) as pool, compile_only(), AsyncCompileMode(pool, ignore_errors=True):
            for call in calls:
                call()
    except Exception as exc:  # noqa: BLE001 - reported; the benchmark compiles on first use instead
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    return {"calls": len(calls), "seconds": round(time.perf_counter() - start, 1), "workers": workers}
