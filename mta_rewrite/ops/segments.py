"""Boundary chunks (MTA_SPEC.md, "Grouping strategies": boundary): chunk boundaries from data.

``segment_ids`` [B, n] holds one integer per token (a sentence or document number, say). Chunks:

- a chunk ends where the id changes, and a run of equal ids is cut into chunks of at most c
  tokens (from the run's first token);
- the first ``sinks`` tokens (exact for every query anyway) are chunked on their own, in fixed
  chunks of c from token 0 with the last one ending at token ``sinks``; segments start after them
  (id changes inside the sinks are ignored).

Everything else is MTA_SPEC.md with these chunks: chunk i's window is chunks i−L+1..i (causal) or
|j − i| ≤ L−1 by chunk index, a summary is the mean (or learned average) of a chunk's allowed keys
with log n_j, top-k ranks chunks by q̄_i·k̄_j.

How it runs: every chunk gets its own slot of S positions in a padded sequence of N = M·S
positions (M: the most chunks of any sequence in the batch; S: the longest chunk, rounded up to a
multiple of 16 and at most c, ``SLOT_ROUND``: short segments make short slots). A slot's unused positions hold
padding keys, forbidden to every query, and padding queries (zeros; their rows are dropped).
The fixed-chunk op (chunked implementation on the CPU, the Triton kernels on CUDA, where key
padding is native) over the padded sequence with that key padding then computes boundary MTA
exactly (run with chunk size S: one slot, one chunk): chunk indices and windows are the slots',
summaries leave padding out (n_j counts real keys only), token order and so causality are kept,
the sinks are again positions < ``sinks`` (sink chunks before the last are c = S long), and
top-k ranks by q̄ summed over the real queries of a slot divided by S instead of their count, a
positive factor per query chunk that leaves each chunk's ranking unchanged. A user mask is
carried to the slots: its key columns gathered, its rows (when it varies per query) gathered
with each padding query taking the row of its chunk's last real query, so a block is uniform
exactly when it is over the real queries. Cost: the fixed op's at N = M·S tokens with chunk
size S (``padded_length``), n ≤ N < n + M·(S − 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Slot widths are the longest chunk rounded up to a multiple of this (at most the chunk size):
# the fixed-chunk op's chunk size over the slots, kept to sizes the Triton kernels' blocks tile.
SLOT_ROUND = 16


@dataclass(frozen=True)
class SegmentLayout:
    """Where each token sits in the padded sequence of chunk slots."""

    slot: torch.Tensor  # [B, n] long: the padded position of token t
    source: torch.Tensor  # [B, N] long: the token at each padded position (padding: its chunk's last real token)
    real: torch.Tensor  # [B, N] bool: the position holds a token
    width: int  # S ≤ c, positions per slot: the chunk size the fixed-chunk op runs with over the slots

    @property
    def length(self) -> int:
        return self.real.shape[1]


def check_segment_ids(segment_ids: torch.Tensor, B: int, n: int, device) -> None:
    """One-line errors for a ``segment_ids`` argument that cannot describe [B, n] tokens."""
    if segment_ids.dim() != 2 or segment_ids.shape[1] != n or segment_ids.shape[0] not in (1, B):
        raise ValueError(f"segment_ids must be [B, n] = [{B}, {n}] (or [1, n]); got {tuple(segment_ids.shape)}")
    if segment_ids.is_floating_point() or segment_ids.is_complex() or segment_ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    if segment_ids.device != device:
        raise ValueError(f"segment_ids is on {segment_ids.device} but q is on {device}")


def chunk_starts(segment_ids: torch.Tensor, chunk_size: int, sinks: int) -> torch.Tensor:
    """[B, n] bool: token t begins a chunk (the rules of the module docstring)."""
    seg = segment_ids.long()
    B, n = seg.shape
    t = torch.arange(n, device=seg.device).expand(B, n)
    s = min(sinks, n)
    run = torch.zeros(B, n, dtype=torch.bool, device=seg.device)
    run[:, 1:] = seg[:, 1:] != seg[:, :-1]
    run[:, :s] = False  # no segment boundaries inside the sinks
    run[:, 0] = True
    if 0 < s < n:
        run[:, s] = True  # segments start after the sinks
    run_start = torch.cummax(torch.where(run, t, 0), dim=1).values
    return run | ((t - run_start) % chunk_size == 0)


def chunk_bounds(segment_ids: torch.Tensor, B: int, chunk_size: int, sinks: int) -> torch.Tensor:
    """[B, M + 1] int32: each sequence's chunk starts in token order (M: the most chunks of any
    sequence), then n, which also fills a shorter sequence's missing chunks (empty: start = end).
    Chunk i of sequence b is the tokens [bounds[b, i], bounds[b, i+1]): what the CUDA kernels read
    for boundary chunks without padding slots. One device→host sync (M)."""
    starts = chunk_starts(segment_ids, chunk_size, sinks).expand(B, -1)
    n = starts.shape[1]
    chunk = torch.cumsum(starts, dim=1) - 1  # [B, n] chunk index of each token
    M = int(chunk[:, -1].max()) + 1
    t = torch.arange(n, device=starts.device, dtype=torch.int32).expand(B, n)
    bounds = torch.full((B, M + 1), n, dtype=torch.int32, device=starts.device)
    # a chunk's first token is the smallest of its tokens: scatter with "amin" over each chunk
    return bounds.scatter_reduce(1, chunk, t, reduce="amin", include_self=True)


def segment_layout(segment_ids: torch.Tensor, B: int, chunk_size: int, sinks: int) -> SegmentLayout:
    starts = chunk_starts(segment_ids, chunk_size, sinks).expand(B, -1)
    n = starts.shape[1]
    dev = starts.device
    t = torch.arange(n, device=dev).expand(B, n)
    chunk = torch.cumsum(starts, dim=1) - 1  # [B, n] chunk index of each token
    first = torch.cummax(torch.where(starts, t, 0), dim=1).values  # its chunk's first token
    M, longest = (int(x) + 1 for x in torch.stack([chunk[:, -1].max(), (t - first).max()]).tolist())
    width = min(chunk_size, -(-longest // SLOT_ROUND) * SLOT_ROUND)
    slot = chunk * width + (t - first)
    N = M * width
    placed = torch.full((B, N), -1, dtype=torch.long, device=dev).scatter(1, slot, t)
    real = placed >= 0
    # a slot begins with a real token, so the running maximum gives a padding position its
    # chunk's last real token (and an empty trailing slot the sequence's last token)
    source = torch.cummax(placed, dim=1).values
    return SegmentLayout(slot=slot, source=source, real=real, width=width)


def to_slots(x: torch.Tensor, lay: SegmentLayout) -> torch.Tensor:
    """[B, H, n, d] → [B, H, N, d], zeros at padding positions (differentiable)."""
    B, H, n, d = x.shape
    idx = lay.slot.view(B, 1, n, 1).expand(B, H, n, d)
    return x.new_zeros(B, H, lay.length, d).scatter(2, idx, x)


def from_slots(y: torch.Tensor, lay: SegmentLayout) -> torch.Tensor:
    """[B, H, N, d] → [B, H, n, d]: the rows of the real tokens (differentiable)."""
    B, H, _, d = y.shape
    n = lay.slot.shape[1]
    return y.gather(2, lay.slot.view(B, 1, n, 1).expand(B, H, n, d))


def slot_mask(attn_mask: torch.Tensor | None, lay: SegmentLayout, B: int, Hq: int, n: int) -> torch.Tensor:
    """The user's SDPA mask (None, bool or additive float, broadcastable to [B, Hq, n, n]) in
    slot positions, with every padding key forbidden: [B, Hm, 1 or N, N]."""
    N = lay.length
    real = lay.real.view(B, 1, 1, N)
    if attn_mask is None:
        return real
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    Hm, nq = m.shape[1], m.shape[2]
    m = m.expand(B, Hm, nq, n)
    m = m.gather(3, lay.source.view(B, 1, 1, N).expand(B, Hm, nq, N))  # key columns
    if nq != 1:  # rows too: a padding query takes its chunk's last real query's row
        m = m.gather(2, lay.source.view(B, 1, N, 1).expand(B, Hm, N, N))
    if m.dtype == torch.bool:
        return m & real
    return m.masked_fill(~real, float("-inf"))


def segmented(fn, q, k, v, attn_mask, segment_ids, *, chunk_size, sinks, **kwargs):
    """``fn`` (a fixed-chunk MTA implementation with the op's signature, without segment ids)
    applied with boundary chunks: the tokens moved to their slots, the result moved back. The
    output is contiguous [B, Hq, n, d] in q's dtype."""
    B, Hq, n, _ = q.shape
    lay = segment_layout(segment_ids, B, chunk_size, sinks)
    mask = slot_mask(attn_mask, lay, B, Hq, n)
    out = fn(to_slots(q, lay), to_slots(k, lay), to_slots(v, lay), mask, chunk_size=lay.width, sinks=sinks, **kwargs)
    return from_slots(out, lay)


def padded_length(segment_ids: torch.Tensor, chunk_size: int, sinks: int = 0) -> int:
    """N = M·S, the length the fixed-chunk op runs at for these segments (the cost model's n)."""
    lay = segment_layout(segment_ids, segment_ids.shape[0], chunk_size, sinks)
    return lay.length
