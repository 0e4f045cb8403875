"""MTA written as PyTorch FlexAttention: the baseline the fused kernel is measured against.

The same function as MTA_SPEC.md (no mask, no sinks, no top-k) expressed as one attention of the
queries over ``n + nc`` keys, the tokens followed by the chunk summaries:

    keys   = [k_0 … k_{n−1}, k̄_0 … k̄_{nc−1}]      values = [v_0 … v_{n−1}, v̄_0 … v̄_{nc−1}]
    mask_mod(t, s):  s < n:  s's chunk is in t's window (causal: i−L+1 ≤ j ≤ i and s ≤ t;
                             otherwise |j − i| ≤ L−1), i = t // c, j = s // c;
                     s ≥ n:  summary j = s − n of a chunk outside the window (causal: j < i−L+1)
    score_mod(score, s): score + log n_j for a summary (n_j = its number of tokens).

The block mask is built from block indices (``BlockMask.from_kv_blocks``), never from a dense
n × (n + nc) mask: for each block of queries only the key blocks of its window and of the
summaries it may see are candidates, and only those tiles are evaluated (as booleans) to sort
them into full, partial and empty. ``create_block_mask`` materialises the dense mask and runs
out of memory at 128K tokens on an 80 GB GPU (issue #6); this builds the 128K causal mask in
O(n · (c·L + nc)) memory. Build it once per shape (:func:`mta_block_mask`) and reuse it.

On CUDA, ``flex_attention`` is compiled (``torch.compile``; once per shape); elsewhere it runs
eagerly (PyTorch's reference path: correct, slow, for tests).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention


@dataclass(frozen=True)
class _Layout:
    n: int
    c: int
    nc: int
    L: int
    causal: bool


def _layout(n: int, chunk_size: int, local_chunks: int, causal: bool) -> _Layout:
    if chunk_size < 1 or local_chunks < 1:
        raise ValueError(f"chunk_size and local_chunks must be positive, got {chunk_size}, {local_chunks}")
    c = min(chunk_size, n)
    nc = -(-n // c)
    return _Layout(n, c, nc, min(local_chunks, nc), bool(causal))


def _mask_mod(lay: _Layout):
    n, c, L = lay.n, lay.c, lay.L

    def mask_mod(b, h, q_idx, kv_idx):
        i = q_idx // c
        is_summary = kv_idx >= n
        j_key = kv_idx // c
        j_sum = kv_idx - n
        if lay.causal:
            window = (j_key >= i - L + 1) & (kv_idx <= q_idx)
            summary = j_sum < i - L + 1
        else:
            window = (j_key - i).abs() <= L - 1
            summary = (j_sum - i).abs() > L - 1
        return (is_summary & summary) | (~is_summary & window)

    return mask_mod


def _score_mod(lay: _Layout, logn: torch.Tensor):
    n = lay.n

    def score_mod(score, b, h, q_idx, kv_idx):
        j = (kv_idx - n).clamp(min=0)
        return torch.where(kv_idx >= n, score + logn[j], score)

    return score_mod


def _chunk_counts(lay: _Layout, device) -> torch.Tensor:
    """n_j, the tokens of each chunk (the last one may be short), fp32 [nc]."""
    return (lay.n - torch.arange(lay.nc, device=device) * lay.c).clamp(max=lay.c).to(torch.float32)


@functools.lru_cache(maxsize=64)
def _cached_score_mod(lay: _Layout, device: torch.device):
    """One score_mod (and its log n_j table) per layout and device: a compiled flex_attention
    guards on the function it is given, so a new closure per call would recompile every call."""
    return _score_mod(lay, _chunk_counts(lay, device).log())


def _candidate_blocks(lay: _Layout, block: int, device) -> torch.Tensor:
    """[nqb, W] key-block indices (−1 padded) that a block of queries may touch: its window's
    token blocks and the summary blocks before (causal) or around it."""
    n, c, L = lay.n, lay.c, lay.L
    nqb = -(-n // block)
    last_kb = -(-(n + lay.nc) // block) - 1
    rows = []
    for qb in range(nqb):
        r0, r1 = qb * block, min((qb + 1) * block, n) - 1
        i0, i1 = r0 // c, r1 // c
        win_lo = max(i0 - L + 1, 0) * c // block
        win_hi = r1 // block if lay.causal else (min((i1 + L) * c, n) - 1) // block
        cand = list(range(win_lo, win_hi + 1))
        j_end = i1 - L + 1 if lay.causal else lay.nc  # summaries 0 … j_end−1 at most
        if j_end > 0:
            cand += range(n // block, min((n + j_end - 1) // block, last_kb) + 1)
        rows.append(sorted(set(cand)))
    width = max(len(r) for r in rows)
    out = torch.full((nqb, width), -1, dtype=torch.int64)
    for qb, r in enumerate(rows):
        out[qb, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(device)


def _pack(flags: torch.Tensor, cand: torch.Tensor, n_kv_blocks: int):
    """Per query block: the number of flagged candidates and their indices first, sorted, in a
    row as wide as the key blocks (BlockMask's layout)."""
    count = flags.sum(-1).to(torch.int32)
    big = torch.iinfo(torch.int64).max
    idx = torch.where(flags, cand, big).sort(-1).values
    idx = torch.where(idx == big, 0, idx).to(torch.int32)
    width = max(n_kv_blocks, idx.shape[-1])
    idx = torch.nn.functional.pad(idx, (0, width - idx.shape[-1]))[..., :n_kv_blocks]
    return count[None, None], idx[None, None].contiguous()


def mta_block_mask(n: int, *, chunk_size: int, causal: bool = False, local_chunks: int = 1, block: int = 128,
                   device=None, rows_per_step: int = 64) -> BlockMask:
    """The BlockMask of MTA over ``n`` queries and ``n + nc`` keys (tokens, then summaries),
    built from block indices: candidates per query block by index arithmetic, each candidate
    tile evaluated once (``rows_per_step`` query blocks at a time) and classified full / partial /
    empty. Shared by every batch and head."""
    lay = _layout(n, chunk_size, local_chunks, causal)
    device = torch.device(device) if device is not None else torch.device("cpu")
    mask_mod = _mask_mod(lay)
    cand = _candidate_blocks(lay, block, device)  # [nqb, W]
    nqb, width = cand.shape
    n_kv = n + lay.nc
    offs = torch.arange(block, device=device)
    full = torch.zeros(nqb, width, dtype=torch.bool, device=device)
    some = torch.zeros_like(full)
    for s in range(0, nqb, rows_per_step):
        qb = torch.arange(s, min(s + rows_per_step, nqb), device=device)
        q_idx = (qb[:, None] * block + offs)[:, None, :, None]  # [R, 1, bq, 1]
        kv_idx = (cand[qb].clamp(min=0)[:, :, None] * block + offs)[:, :, None, :]  # [R, W, 1, bk]
        inside = (q_idx < n) & (kv_idx < n_kv)
        ok = mask_mod(0, 0, q_idx, kv_idx) & inside
        valid = cand[qb] >= 0
        some[qb] = ok.flatten(2).any(-1) & valid
        # full: every pair inside the sequence allowed, and the tile wholly inside (a tile cut
        # by n or n + nc still needs the mask_mod, which flex applies to partial blocks only)
        full[qb] = (ok | ~inside).flatten(2).all(-1) & inside.flatten(2).all(-1) & valid & some[qb]
    partial = some & ~full
    n_kv_blocks = -(-n_kv // block)
    kv_num, kv_idx = _pack(partial, cand, n_kv_blocks)
    full_num, full_idx = _pack(full, cand, n_kv_blocks)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(n, n_kv))


def _summaries(x: torch.Tensor, lay: _Layout) -> torch.Tensor:
    """Chunk means [B, H, nc, d] (the last chunk may be short)."""
    B, H, n, d = x.shape
    xs = torch.nn.functional.pad(x.float(), (0, 0, 0, lay.nc * lay.c - n)).view(B, H, lay.nc, lay.c, d).sum(3)
    return (xs / _chunk_counts(lay, x.device)[:, None]).to(x.dtype)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def mta_flex_attention(q, k, v, *, chunk_size: int, causal: bool = False, scale: float | None = None,
                       local_chunks: int = 1, block_mask: BlockMask | None = None, block: int = 128,
                       compiled: bool | None = None) -> torch.Tensor:
    """MTA (no mask, sinks or top-k) through ``flex_attention``. ``block_mask``: from
    :func:`mta_block_mask` for this n and configuration (built here if None, which costs a build
    per call). ``compiled``: default True on CUDA, False elsewhere."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    lay = _layout(n, chunk_size, local_chunks, causal)
    if block_mask is None:
        block_mask = mta_block_mask(n, chunk_size=chunk_size, causal=causal, local_chunks=local_chunks, block=block,
                                    device=q.device)
    elif tuple(block_mask.seq_lengths) != (n, n + lay.nc):
        raise ValueError(f"block_mask is for {tuple(block_mask.seq_lengths)} (queries, keys), "
                         f"this call needs {(n, n + lay.nc)}")
    keys = torch.cat([k, _summaries(k, lay)], dim=2)
    values = torch.cat([v, _summaries(v, lay)], dim=2)
    if compiled is None:
        compiled = q.is_cuda
    fn = _compiled_flex() if compiled else flex_attention
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    return fn(q, keys, values, score_mod=_cached_score_mod(lay, q.device), block_mask=block_mask, scale=scale,
              enable_gqa=Hq != Hkv)
