"""The whole suite: under pytest-xdist, the CPU's cores shared between the workers.

Each worker is a process whose torch (and OpenMP) would otherwise start one thread per core, so
`-n 2` on two cores ran four busy threads on two: tests/ops and tests/onnx took 626 s in two
workers with two threads each and 406 s with one (this project's 2-core AMD EPYC box,
2026-12-03). Child processes the tests start (the CLI, the benchmark's dry run, the cubin
builds) inherit the same share through OMP_NUM_THREADS. Without xdist nothing changes.
"""

from __future__ import annotations

import os

import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))

if _WORKERS > 0:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _share = max(1, _cores // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
