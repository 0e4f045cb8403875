"""Boundary chunks without padding slots: the CPU implementation for the common masks.

``segments.py`` runs boundary chunks by moving every chunk into a slot of S ≤ c positions (the
longest chunk, rounded up to 16), so the fixed-chunk op computes them at N = M·S positions (M
chunks), padding rows and keys included (with S = c: 1.15–3× the tokens on real text), and the
summaries of all M chunks for each of those rows. Here
the tokens stay where they are. Queries are cut into blocks of ``Bq`` consecutive tokens (a block
may span several chunks, or a part of one), and block b attends to one key set of X columns:

    [ the tokens of its queries' windows | sinks | the summaries of all M chunks ]

The chunks are contiguous runs of tokens, so the windows of a block's queries lie in one token
range: from the first token of chunk a−L+1 (a: the chunk of the block's first query) to the last
token of chunk z (causal, cut at the block's last query) or z+L−1 (z: the chunk of its last
query). Which of those columns a query may use is its own (chunk ids compared per query and key),
so the mask is per query: [Bq, X] per block, built band by band with the key sets (no n×n
tensor; about n·X/8 at a time; on the CPU a band runs in pieces whose key sets stay under the
memory bound, ``chunked._memory_bands``). Summaries are masked means (or learned weighted means)
over each chunk's allowed non-sink keys, by one ``scatter_add`` over the chunk ids; query t may
use summary j when j is outside its window (causal: j < chunk(t) − L + 1; otherwise |j − chunk(t)| > L − 1) and the
chunk has a key (logit + log n_j). Window keys before ``sinks`` are left to the sink columns
(E(t) is a set). With causality the summaries are banded like the fixed op's.

Cost per head: n·(W + sinks + M) multiply-adds (M about halved with causality), W < Bq + L·c with
causality (the window of the block's first query reaches back to the start of chunk a − L + 1),
W < Bq + 2L·c without; the slots cost N·(L·c + sinks + M), N ≥ n.

Scope: masks None or key padding (one bool or 0/−inf value per key, the same for every head; the
shapes the op's mask simplification leaves for transformers' masks), no top-k. Anything else
(top-k, per-query, per-head or bias masks) and the CUDA kernels take the slots of ``segments.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .chunked import EMPTY_ROW_LSE, NEG, _attention_with_lse, _causal_bands, _compute_dtype, _memory_bands
from .layout import in_layout_of
from .masks import NormalizedMask, normalize_mask, simplify_mask
from .segments import chunk_starts


def varlen_applies(mask: NormalizedMask | None, top_k: int) -> bool:
    """Whether :func:`mta_attention_varlen` computes this call (the module docstring's scope)."""
    if top_k > 0:
        return False
    return mask is None or (not mask.per_query and not mask.per_head and mask.bias is None)


def takes(attn_mask: torch.Tensor | None, B: int, Hq: int, n: int, top_k: int) -> bool:
    """:func:`varlen_applies` for an SDPA mask as the op has simplified it, deciding by shape first:
    a mask that varies per query or head is refused without reading its n×n values."""
    if top_k > 0:
        return False
    if attn_mask is not None and attn_mask.dim() >= 2 and (
            attn_mask.shape[-2] != 1 or attn_mask.dim() >= 3 and attn_mask.shape[-3] != 1):
        return False  # per query ([..., n, n]) or per head ([..., Hq, 1, n])
    return varlen_applies(normalize_mask(attn_mask, B, Hq, n), top_k)


def runs_unpadded(attn_mask: torch.Tensor | None, B: int, Hq: int, n: int, causal: bool, top_k: int) -> bool:
    """Whether the op on the CPU runs boundary chunks here, for this SDPA mask (as the op simplifies
    it: transformers' materialised masks read as key padding ∧ causality) and top-k."""
    attn_mask, _ = simplify_mask(attn_mask, B, Hq, n, causal)
    return takes(attn_mask, B, Hq, n, top_k)


def blocks_beat_chunks(chunk_size: int, n: int) -> bool:
    """Whether fixed chunks run faster here, in query blocks, than chunk by chunk (``chunked.py``):
    for c < 8 with at least 256 chunks. The chunk-by-chunk op builds one key set per chunk,
    nc·(L·c + sinks + nc) rows of k and v, quadratic in the chunk count (built band by band, so
    memory is bounded, but the rows are still written and read); blocks of 64 queries build one
    per block. Measured on this project's CPU box (``benchmarks/bench_query_blocks.py``, blocks of
    64, 2026-12-03, after the key sets went into bands): c = 2 and 4 at 4K and 16K tokens take
    0.40–0.73× the time in blocks; c = 8 0.86–1.18× (even); c ≥ 16 1.16–2× (slower)."""
    return chunk_size < 8 and n >= 256 * chunk_size


def query_block(chunk_size: int) -> int:
    """Queries per block: 64 up to c = 64, 128 above. A block's window range grows with it (by up
    to a block), the fused kernel's efficiency falls below it; the fastest on this project's CPU
    box at 1–8K tokens for c = 16 … 256 (``benchmarks/bench_boundaries.py --sections op``)."""
    return 64 if chunk_size <= 64 else 128


@dataclass(frozen=True)
class BlockPlan:
    """The chunks of boundary ids and the query blocks over them, as the op lays them out."""

    chunk: torch.Tensor  # [B, n] long: the chunk of each token
    chunks: int  # M, the most chunks of any sequence
    block: int  # Bq, queries per block
    qpos: torch.Tensor  # [nb, Bq]: each block row's query (pad rows repeat the last query)
    qchunk: torch.Tensor  # [B, nb, Bq]: its chunk
    lo: torch.Tensor  # [B, nb]: the first token of the block's window range
    hi: torch.Tensor  # [B, nb] (or [1, nb]): one past its last
    bands: list  # (first block, end block, summaries the band needs)

    @property
    def width(self) -> int:
        """Wmax, the window columns of every block's key set."""
        return int((self.hi - self.lo).max())


def plan_blocks(segment_ids: torch.Tensor | None, B: int, *, chunk_size: int, causal: bool = False,
                local_chunks: int = 1, sinks: int = 0, block: int | None = None, n: int | None = None,
                device=None) -> BlockPlan:
    """The chunks (``segments.chunk_starts``' rules; ``segment_ids`` None: fixed chunks of c over
    ``n`` tokens) and, per block of ``block`` queries, the token range its queries' windows lie in;
    the bands of blocks the op runs (module docstring)."""
    n = segment_ids.shape[1] if segment_ids is not None else n
    dev = segment_ids.device if segment_ids is not None else device
    c, L, s = chunk_size, local_chunks, min(sinks, n)
    Bq = min(block or query_block(c), n)
    nb = -(-n // Bq)
    t = torch.arange(n, device=dev).expand(B, n)
    if segment_ids is None:
        chunk = (torch.arange(n, device=dev) // c).expand(B, n)
    else:
        chunk = (torch.cumsum(chunk_starts(segment_ids, c, s), dim=1) - 1).expand(B, n)
    M = int(chunk[:, -1].max()) + 1
    first = torch.full((B, M), n, dtype=torch.long, device=dev).scatter_reduce(1, chunk, t, "amin")
    qpos = torch.arange(nb * Bq, device=dev).clamp(max=n - 1).view(nb, Bq)
    qchunk = chunk[:, qpos]
    lo = first.gather(1, (qchunk[..., 0] - L + 1).clamp(min=0))
    if causal:  # up to the block's last query
        hi = qpos[:, -1].view(1, nb) + 1
    else:  # to the end of chunk z + L − 1 (z: the chunk of the block's last query)
        end = torch.zeros(B, M, dtype=torch.long, device=dev).scatter_reduce(1, chunk, t + 1, "amax")
        hi = end.gather(1, torch.minimum(qchunk[..., -1] + L - 1, chunk[:, -1:]))
    # bands bound the mask's memory (n·X / 8); with causality query t uses the summaries
    # j < chunk(t) − L + 1, so a band needs only the first max chunk − L + 1 of them
    bands = []
    for lo_b, hi_b in _causal_bands(nb):
        width = max(0, int(qchunk[:, lo_b:hi_b].max()) - L + 1) if causal else M
        bands.append((lo_b, hi_b, width))
    return BlockPlan(chunk, M, Bq, qpos, qchunk, lo, hi, bands)


def key_columns(segment_ids: torch.Tensor | None, *, chunk_size: int, causal: bool = False, local_chunks: int = 1,
                sinks: int = 0, n: int | None = None) -> tuple[float, int]:
    """(columns per query, key-set rows) the op computes per sequence in query blocks for these ids
    (every sequence of a batch runs the layout of the widest; ``segment_ids`` None: fixed chunks over
    ``n`` tokens): the cost model's keys per query (window range, sinks, summaries) and the rows of
    the key sets it builds (``calibration.cost``)."""
    B, n = segment_ids.shape if segment_ids is not None else (1, n)
    plan = plan_blocks(segment_ids, B, chunk_size=chunk_size, causal=causal, local_chunks=local_chunks, sinks=sinks,
                       n=n)
    s = min(sinks, n)
    W = plan.width
    columns = sum((hi_b - lo_b) * plan.block * (W + s + width) for lo_b, hi_b, width in plan.bands)
    return columns / n, plan.qpos.shape[0] * (W + s + plan.chunks)


def mta_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    *,
    chunk_size: int,
    causal: bool = False,
    scale: float | None = None,
    local_chunks: int = 1,
    sinks: int = 0,
    top_k: int = 0,
    summary_weight: torch.Tensor | None = None,
    block: int | None = None,
    rows_from: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Boundary-chunk MTA (``segments.py``'s chunks, MTA_SPEC.md's math) for the masks and options
    of :func:`varlen_applies`, differentiable in q, k, v and ``summary_weight``. ``block``: the
    queries per block (default :func:`query_block`). ``rows_from``: the caller reads the output's
    rows from this query on only; the query blocks wholly before it are not computed (their rows
    are zeros). ``softcap``: logits soft-capped (``chunked.soft_capped``). See the module docstring."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    mask = normalize_mask(attn_mask, B, Hq, n)
    if not varlen_applies(mask, top_k):
        raise ValueError("mta_attention_varlen takes no mask or key padding, and no top-k (use segments.segmented)")
    q_in = q
    cdt = _compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    dev = q.device
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    L, s = local_chunks, min(sinks, n)
    plan = plan_blocks(segment_ids, B, chunk_size=chunk_size, causal=causal, local_chunks=L, sinks=s, block=block,
                       n=n, device=dev)
    chunk, M, Bq, qpos, qchunk = plan.chunk, plan.chunks, plan.block, plan.qpos, plan.qchunk
    nb = qpos.shape[0]
    npad = nb * Bq
    t = torch.arange(n, device=dev)
    key_ok = mask.allowed.view(-1, n).expand(B, n) if mask is not None else torch.ones(B, n, dtype=torch.bool,
                                                                                        device=dev)

    # ---- summaries [B, Hkv, M, d]: masked (or learned weighted) means, log n_j ---------------
    w = key_ok & (t >= s)  # the keys a summary pools: allowed, not a sink
    n_j = torch.zeros(B, M, dtype=cdt, device=dev).scatter_add(1, chunk, w.to(cdt))
    idx = chunk.view(B, 1, n, 1).expand(B, Hkv, n, d)
    if summary_weight is None:
        weight = w.to(cdt).view(B, 1, n, 1)
        norm = n_j.view(B, 1, M, 1)
    else:
        logit = torch.einsum("bhnd,hd->bhn", k, summary_weight.to(cdt)).masked_fill(~w.view(B, 1, n), NEG)
        top = torch.full((B, Hkv, M), NEG, dtype=cdt, device=dev).scatter_reduce(
            2, chunk.view(B, 1, n).expand(B, Hkv, n), logit.detach(), "amax")  # for stability only
        a = torch.exp(logit - top.gather(2, chunk.view(B, 1, n).expand(B, Hkv, n))) * w.view(B, 1, n)
        weight = a.unsqueeze(-1)
        norm = torch.zeros(B, Hkv, M, dtype=cdt, device=dev).scatter_add(2, chunk.view(B, 1, n).expand(B, Hkv, n), a)
        norm = norm.unsqueeze(-1)
    inv = 1.0 / norm.clamp(min=1e-30)
    kbar = torch.zeros(B, Hkv, M, d, dtype=cdt, device=dev).scatter_add(2, idx, k * weight) * inv
    vbar = torch.zeros(B, Hkv, M, d, dtype=cdt, device=dev).scatter_add(2, idx, v * weight) * inv
    log_n = torch.where(n_j > 0, torch.log(n_j.clamp(min=1.0)), NEG)  # [B, M]

    # ---- per block: the window columns, the tokens lo … hi − 1 -------------------------------
    lo, hi = plan.lo, plan.hi
    Wmax = plan.width
    kpos = lo.unsqueeze(-1) + torch.arange(Wmax, device=dev)  # [B, nb, Wmax]
    kin = kpos < hi.unsqueeze(-1)
    kpos = kpos.clamp(max=n - 1)
    kchunk = chunk.gather(1, kpos.view(B, -1)).view(B, nb, Wmax)
    kok = key_ok.gather(1, kpos.view(B, -1)).view(B, nb, Wmax)

    # ---- queries [Hkv, nb·B, G·Bq, d] (block-major: a run of blocks is a contiguous slice) ------
    qp = q if npad == n else torch.nn.functional.pad(q, (0, 0, 0, npad - n))
    q_rows = qp.view(B, Hkv, G, nb, Bq, d).permute(1, 3, 0, 2, 4, 5).reshape(Hkv, nb * B, G * Bq, d)
    kT, vT = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, B, n, d]

    # ---- one fused attention call per band of blocks ------------------------------------------
    # On the CPU a band runs in pieces whose key sets stay under the memory bound
    # (chunked._memory_bands), built, used and freed one after the other.
    out = torch.empty(Hkv, nb * B, G * Bq, d, dtype=cdt, device=dev)
    lse = torch.empty(Hkv, nb * B, G * Bq, dtype=cdt, device=dev)
    first = min(max(rows_from, 0) // Bq, nb)  # the first query block computed (rows: block·B + b)
    if first:
        out[:, :first * B] = 0.0
        lse[:, :first * B] = 0.0
    jj = torch.arange(M, device=dev)
    for lo_p, hi_p, width in plan.bands:
        lo_p = max(lo_p, first)
        if lo_p >= hi_p:
            continue
        cols = Wmax + s + width
        row_bytes = Hkv * B * cols * (d + (2 * G * Bq if softcap else 0)) * cdt.itemsize  # (+ scores, soft-cap)
        for lo_b, hi_b in _memory_bands(lo_p, hi_p, row_bytes, dev):
            m_b = hi_b - lo_b
            sel = slice(lo_b, hi_b)
            # key sets [Hkv, m, B, cols, d]: the window tokens, sinks, the summaries the band needs
            k_set = torch.empty(Hkv, m_b, B, cols, d, dtype=cdt, device=dev)
            v_set = torch.empty(Hkv, m_b, B, cols, d, dtype=cdt, device=dev)
            gidx = kpos[:, sel].reshape(1, B, m_b * Wmax, 1).expand(Hkv, B, m_b * Wmax, d)
            k_set[:, :, :, :Wmax] = kT.gather(2, gidx).view(Hkv, B, m_b, Wmax, d).transpose(1, 2)
            v_set[:, :, :, :Wmax] = vT.gather(2, gidx).view(Hkv, B, m_b, Wmax, d).transpose(1, 2)
            if s > 0:
                k_set[:, :, :, Wmax:Wmax + s] = kT[:, :, :s].unsqueeze(1)
                v_set[:, :, :, Wmax:Wmax + s] = vT[:, :, :s].unsqueeze(1)
            k_set[:, :, :, Wmax + s:] = kbar[:, :, :width].transpose(0, 1).unsqueeze(1)
            v_set[:, :, :, Wmax + s:] = vbar[:, :, :width].transpose(0, 1).unsqueeze(1)

            qc = qchunk[:, sel].unsqueeze(-1)  # [B, m, Bq, 1]
            tq = qpos[sel].view(1, m_b, Bq, 1)
            # exact window columns: in range, not a sink, allowed, chunk in the query's window
            kc = kchunk[:, sel].unsqueeze(-2)  # [B, m, 1, Wmax]
            win = (kin[:, sel] & (kpos[:, sel] >= s) & kok[:, sel]).unsqueeze(-2) & (kc >= qc - L + 1)
            win = win & ((kpos[:, sel].unsqueeze(-2) <= tq) if causal else (kc <= qc + L - 1))
            parts = [torch.where(win, 0.0, NEG).to(cdt)]
            if s > 0:
                sink = key_ok[:, :s].view(B, 1, 1, s)
                if causal:
                    sink = sink & (t[:s].view(1, 1, 1, s) <= tq)
                parts.append(torch.where(sink, 0.0, NEG).to(cdt).expand(B, m_b, Bq, s))
            j = jj[:width]  # the summaries the band needs
            outside = (j < qc - L + 1) if causal else ((j - qc).abs() > L - 1)
            parts.append(torch.where(outside, log_n[:, :width].view(B, 1, 1, width), NEG).to(cdt))
            m = torch.cat(parts, dim=-1)  # [B, m, Bq, cols]
            if G > 1:  # rows are (query head of the group, query): the same mask for each head
                m = m.unsqueeze(2).expand(-1, -1, G, -1, -1).flatten(2, 3)
            m = m.transpose(0, 1).reshape(1, m_b * B, G * Bq, cols)  # rows: block·B + b
            rows = slice(lo_b * B, hi_b * B)
            o, l = _attention_with_lse(q_rows[:, rows], k_set.view(Hkv, m_b * B, cols, d),
                                       v_set.view(Hkv, m_b * B, cols, d), m, scale, softcap)
            out[:, rows], lse[:, rows] = o, l
    # a query with nothing to attend to (every key padded away) outputs zeros
    out = out.masked_fill((lse <= EMPTY_ROW_LSE).unsqueeze(-1), 0.0)
    out = out.view(Hkv, nb, B, G, Bq, d).permute(2, 0, 3, 1, 4, 5).reshape(B, Hq, npad, d)
    return in_layout_of(q_in, out[:, :, :n])
