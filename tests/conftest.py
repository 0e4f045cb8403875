"""The whole suite: under pytest-xdist, the CPU's cores shared between the workers; one torchlib
registry per process for the ONNX exports.

Each worker is a process whose torch (and OpenMP) would otherwise start one thread per core, so
`-n 2` on two cores ran four busy threads on two: tests/ops and tests/onnx took 626 s in two
workers with two threads each and 406 s with one (this project's 2-core AMD EPYC box,
2026-12-03). Child processes the tests start (the CLI, the benchmark's dry run, the cubin
builds) inherit the same share through OMP_NUM_THREADS. Without xdist nothing changes.

torch.onnx.export builds its registry of torchlib functions anew on every export (onnxscript
re-parses the source of some 500 functions for their domain): 2.1 s of the 3.4 s an export of a
one-site model takes, on each of the suite's hundred-odd exports. Here each process builds it
once per opset and every export gets its own copy (the function lists copied, so registering
our op in one leaves the next untouched); tests/onnx/test_export.py checks that an export with
the reused registry is byte for byte the export with a fresh one. It is installed before a test
runs once ``mta_rewrite.onnx`` has been imported (by the test modules that export, when they are
collected): torch.onnx's exporter then costs 0.1 s more to import, where on its own it would add
2.3 s to every test process, also those that never export.
"""

from __future__ import annotations

import inspect
import os
import sys

import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))

if _WORKERS > 0:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _share = max(1, _cores // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def reuse_torchlib_registry() -> bool:
    """Make ``ONNXRegistry.from_torchlib`` build once per process and arguments and hand out
    copies (see the module docstring). True if installed (or already); False where this torch has
    no such private classmethod (nothing changed then). The original is ``from_torchlib.__wrapped__``."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return False
    registry_type = getattr(_registration, "ONNXRegistry", None)
    original = getattr(registry_type, "__dict__", {}).get("from_torchlib")
    if not isinstance(original, classmethod):
        return False
    if hasattr(original.__func__, "__wrapped__"):
        return True
    built: dict = {}
    signature = inspect.signature(original.__func__)

    def from_torchlib(cls, *args, **kwargs):
        arguments = signature.bind(cls, *args, **kwargs)
        arguments.apply_defaults()  # from_torchlib() and from_torchlib(opset_version=<default>): one registry
        key = tuple(arguments.arguments.items())
        if key not in built:
            built[key] = original.__func__(cls, *args, **kwargs)
        copy = cls.__new__(cls)
        copy.__dict__.update(built[key].__dict__)
        copy.functions = {target: list(metas) for target, metas in built[key].functions.items()}
        return copy

    from_torchlib.__wrapped__ = original.__func__
    registry_type.from_torchlib = classmethod(from_torchlib)
    return True


def pytest_runtest_setup(item):
    if "mta_rewrite.onnx" in sys.modules:
        reuse_torchlib_registry()
