"""Wall-clock timing for the demo and the benchmarks (never used in tests)."""

from __future__ import annotations

import time
from typing import Callable


def best_ms(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best of ``repeats`` timed calls after one warm-up call, in milliseconds."""
    fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3
