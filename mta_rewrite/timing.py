"""Wall-clock timing and peak memory for the demo and the benchmarks (never used in tests)."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Callable


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), or the machine type elsewhere: for benchmark
    headers, which name the machine every figure was measured on."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


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


def best_alternating_ms(runs: dict[str, Callable[[], object]], repeats: int = 5) -> dict[str, float]:
    """Per name, the best of ``repeats`` timed calls in milliseconds, the functions called in turn
    each round (so a slow phase of the machine hits all of them alike), after one warm-up call each."""
    for fn in runs.values():
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(max(1, repeats)):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
    return best


def status_kib(field: str) -> int:
    """A memory field of this process's ``/proc/self/status`` (Linux), in KiB: ``VmRSS`` (resident
    now), ``VmHWM`` (its high-water mark: the peak since the process began or since
    :func:`reset_peak_rss`; not ``ru_maxrss``, which Linux keeps across ``execve``, so a child
    reports its parent's peak where that is higher)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Start this process's ``VmHWM`` again from its current resident memory (Linux), so that what
    ran before (loading a model, warm-up calls) is not the peak measured next."""
    Path("/proc/self/clear_refs").write_text("5")


def cpu_machine() -> str:
    """The CPU machine line of a benchmark's results: model name, threads, torch version."""
    import torch

    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def results_name(stem: str, tag: str = "") -> str:
    """``<stem>_<today>[_<tag>]``: a benchmark's result files, dated, tagged to keep runs apart."""
    import datetime as dt

    return f"{stem}_{dt.date.today().isoformat()}" + (f"_{tag}" if tag else "")


def save_results(folder: Path, name: str, rows: list, machine: str, markdown: str) -> None:
    """A benchmark's rows as ``name.json`` ({date, machine, rows}) and its table as ``name.md``,
    each written atomically."""
    import datetime as dt
    import json

    from .config import atomic_write_text

    payload = {"date": dt.date.today().isoformat(), "machine": machine, "rows": rows}
    atomic_write_text(Path(folder) / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(Path(folder) / f"{name}.md", markdown.rstrip("\n") + "\n")
