"""Memory layouts, shared by the op, the kernels and the rewrite pass.

The op's output takes q's layout (the one ``torch.empty_like(q)`` gives), models hand it
transposed [B, n, H, d] buffers, and a rewritten graph keeps the memory order its attention output
had when traced: these helpers say what a layout is and move a tensor into one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def dense_order(sizes: Sequence[int], strides: Sequence[int]) -> list[int] | None:
    """The dimensions from outermost to innermost in memory if the layout is dense (no gaps, no
    overlap: some permutation of a contiguous tensor), else None. Dimensions of size 1 have no
    place in memory; they keep their relative order."""
    order = sorted(range(len(sizes)), key=lambda i: (-strides[i], i))
    expected = 1  # dense: each dimension's stride is the product of the sizes inside it
    for i in reversed(order):
        if sizes[i] != 1 and strides[i] != expected:
            return None
        expected *= sizes[i]
    return order


def is_permuted(sizes: Sequence[int], order: Sequence[int]) -> bool:
    """Whether a dense order differs from the contiguous one (ignoring dimensions of size 1)."""
    moving = [i for i in order if sizes[i] != 1]
    return moving != sorted(moving)


def in_layout_of(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (q's shape) in q's dtype and memory layout, the ones ``torch.empty_like(q)`` gives:
    the op's output on every device (a model's transposed [B, n, H, d] queries give a transposed
    output, as SDPA's do). One copy at most, none when ``out`` already has both."""
    res = torch.empty_like(q)
    return out if res.stride() == out.stride() and out.dtype == q.dtype else res.copy_(out)
