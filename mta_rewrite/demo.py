"""The built-in example behind ``mta-rewrite demo``: the MTA op on a long sequence.

It checks the op against the float64 reference on a short sequence (and against SDPA where the
spec says they agree), then times it against ``scaled_dot_product_attention`` at a long one.
The rewrite of whole models arrives with the detection pass; this demo is the op alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops import mta_attention_reference


@dataclass(frozen=True)
class DemoRow:
    mode: str
    n: int
    chunk_size: int
    max_err_vs_reference: float
    sdpa_ms: float
    mta_ms: float

    @property
    def speedup(self) -> float:
        return self.sdpa_ms / self.mta_ms


def _best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def run_op_demo(n: int = 8192, heads: int = 8, head_dim: int = 64, chunk_size: int | None = None,
                repeats: int = 2, seed: int = 0, progress=None) -> list[DemoRow]:
    """Accuracy at 256 tokens (vs the float64 reference) and time at ``n`` tokens, both modes."""
    if n < 2:
        raise ValueError(f"--n must be at least 2, got {n}")
    c = chunk_size or max(1, 1 << round(0.5 * (n.bit_length() - 1)))  # ≈ √n, a power of two
    g = torch.Generator().manual_seed(seed)
    rows = []
    for causal in (False, True):
        small = [torch.randn(1, 2, 256, head_dim, generator=g) for _ in range(3)]
        kw = dict(chunk_size=16, causal=causal, sinks=4, top_k=2, local_chunks=2)
        err = (torch.ops.mta.attention(*small, **kw).double() - mta_attention_reference(*small, **kw)).abs().max()
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))
        sdpa_ms = _best_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), 1)
        mta_ms = _best_ms(lambda: torch.ops.mta.attention(q, k, v, chunk_size=c, causal=causal), repeats)
        rows.append(DemoRow("causal" if causal else "full", n, c, float(err), sdpa_ms, mta_ms))
        if progress is not None:
            progress()
    return rows
