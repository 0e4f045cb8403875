"""Wall-clock timing for the demo and the benchmarks (never used in tests)."""

from __future__ import annotations

import time
from typing import Callable


def best_ms(fn: Callable[[], object], repeats: int = 3, device=None) -> float:
    """Best of ``repeats`` timed calls after one warm-up call, in milliseconds. On a CUDA
    ``device`` each call is waited for (the GPU runs asynchronously)."""
    import torch

    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3
