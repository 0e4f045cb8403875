"""Without CUDA, the kernels run in Triton's interpreter: set it before anything imports triton
(``@triton.jit`` decides between compiled and interpreted when the kernel module is imported)."""

import os

import pytest
import torch

# every fused launch checks its tickets and waits (mta_fwd.CHECK_SYNC)
os.environ.setdefault("MTA_CHECK_SYNC", "1")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    # a helper's call inside a launch no longer re-patches triton.language, and no int32 overflow
    # check is built for device_assert to drop: half the interpreter's time on these kernels
    # (mta_rewrite/kernels/interpreter.py)
    from mta_rewrite.kernels.interpreter import speed_up_interpreter

    speed_up_interpreter()

# The test files that launch kernels (in the interpreter without CUDA).
LAUNCHING = {"test_triton_fwd.py", "test_triton_bwd.py", "test_triton_clustered.py", "test_gpu_bench_script.py",
             "test_interpreter.py", "test_triton_softcap.py", "test_triton_random.py"}


def _version(module) -> tuple[int, ...]:
    return tuple(int(part) for part in module.__version__.split(".")[:2] if part.isdigit())


def interpreter_unusable() -> str | None:
    """Why Triton's interpreter cannot run here, or None. Triton before 3.7 turns one-element
    arrays into Python ints in a way NumPy 2.4 rejects (triton-lang/triton#9171): every kernel
    with a loop bound that is an argument fails. torch 2.11's CUDA wheels pin triton 3.6."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    if _version(triton) < (3, 7) and _version(numpy) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} "
                "(triton-lang/triton#9171): pip install 'numpy<2.4' or 'triton>=3.7'")
    return None


def pytest_collection_modifyitems(config, items):
    reason = interpreter_unusable()
    if reason:
        for item in items:
            if item.path.name in LAUNCHING:
                item.add_marker(pytest.mark.skip(reason=reason))
