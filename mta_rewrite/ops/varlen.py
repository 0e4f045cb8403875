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
over each chunk's allowed non-sink keys, by one ``index_add`` over the chunk ids; query t may
use summary j when j is outside its window (causal: j < chunk(t) − L + 1; otherwise |j − chunk(t)| > L − 1) and the
chunk has a key (logit + log n_j). Window keys before ``sinks`` are left to the sink columns
(E(t) is a set). With causality the summaries are banded like the fixed op's.

Cost per head: n·(W + sinks + M) multiply-adds (M about halved with causality), W < Bq + L·c with
causality (the window of the block's first query reaches back to the start of chunk a − L + 1),
W < Bq + 2L·c without; the slots cost N·(L·c + sinks + M), N ≥ n.

Top-k (``top_k`` K > 0): per query chunk i and query head, the K summarised chunks with the
largest scale·q̄_i·k̄_j (q̄_i: the mean of chunk i's queries; MTA_SPEC.md's rule, ties to the lower
index) are attended exactly instead of through their summaries. A block's key set then also holds
the tokens of the union U of the chunks its queries' chunks select (per query head: the heads of a
GQA group select differently, so with top-k every query head gets its own key set, k and v read
per query head), as one more column range after the summaries; each row's mask keeps the columns of
its own chunk's selection and drops those chunks' summaries. Without gradients that part runs
per (query head, block, sequence) pair, the pairs of all blocks together: sorted by their columns
(their block's summaries, then their union's tokens) and cut into up to four runs, each one call
padded to its own most (``pair_groups``: the cheapest cuts, counting a cost per call; on real text
the union varies several-fold between heads and blocks, with a long tail), and merged with the
window's call by log-sum-exp. A pair's terms depend on a row only through its chunk, so they are
built per chunk its block spans and repeated for the chunk's rows. Under autograd one key set per
query head, padded to the band's most. ``key_columns`` counts the forward's columns, as the cost
model reads. (On the q, k, v of SmolLM2's layers 0, 1, 2, 11 and 24 at 4K and 8K tokens this
forward takes 1.75–2.2× the time of the same configuration without top-k, for 1.2–1.7× its
columns; with per-row terms and each band's pairs in groups of equal count, until 2026-12-05,
2.3–3.0×.)

Scope: masks None or key padding (one bool or 0/−inf value per key, the same for every head; the
shapes the op's mask simplification leaves for transformers' masks). Anything else (per-query,
per-head or bias masks) and the CUDA kernels take the slots of ``segments.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .chunked import (EMPTY_ROW_LSE, NEG, _attention_with_lse, _causal_bands, _compute_dtype, _memory_bands,
                      _merge_by_lse, _wants_grad)
from .layout import in_layout_of
from .masks import NormalizedMask, normalize_mask, simplify_mask
from .segments import chunk_starts


def varlen_applies(mask: NormalizedMask | None) -> bool:
    """Whether :func:`mta_attention_varlen` computes a call with this mask (the module docstring's scope)."""
    return mask is None or (not mask.per_query and not mask.per_head and mask.bias is None)


def takes(attn_mask: torch.Tensor | None, B: int, Hq: int, n: int) -> bool:
    """:func:`varlen_applies` for an SDPA mask as the op has simplified it, deciding by shape first:
    a mask that varies per query or head is refused without reading its n×n values."""
    if attn_mask is not None and attn_mask.dim() >= 2 and (
            attn_mask.shape[-2] != 1 or attn_mask.dim() >= 3 and attn_mask.shape[-3] != 1):
        return False  # per query ([..., n, n]) or per head ([..., Hq, 1, n])
    return varlen_applies(normalize_mask(attn_mask, B, Hq, n))


def runs_unpadded(attn_mask: torch.Tensor | None, B: int, Hq: int, n: int, causal: bool) -> bool:
    """Whether the op on the CPU runs boundary chunks here, for this SDPA mask (as the op simplifies
    it: transformers' materialised masks read as key padding ∧ causality)."""
    attn_mask, _ = simplify_mask(attn_mask, B, Hq, n, causal)
    return takes(attn_mask, B, Hq, n)


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
    first: torch.Tensor  # [B, M]: the first token of each chunk (n for a chunk the sequence lacks)
    sizes: torch.Tensor  # [B, M]: its tokens

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
    sizes = torch.zeros(B, M, dtype=torch.long, device=dev).scatter_add(1, chunk, torch.ones_like(chunk))
    return BlockPlan(chunk, M, Bq, qpos, qchunk, lo, hi, bands, first, sizes)


def _chunk_sums(x: torch.Tensor, chunk: torch.Tensor, M: int) -> torch.Tensor:
    """x [B, H, n, e] summed over each chunk's tokens (``chunk`` [B, n] the chunk ids) → [B, H, M, e].
    ``index_add`` per sequence: on this project's CPU box 2.5–3.4× faster than ``scatter_add`` with an
    expanded index (SmolLM2-sized heads at 4K tokens: 0.6 ms against 1.5), the same sums in the
    same order."""
    out = x.new_zeros(x.shape[0], x.shape[1], M, x.shape[3])
    if x.shape[0] == 1:
        return out.index_add(2, chunk[0], x)
    return torch.stack([out[b].index_add(1, chunk[b], x[b]) for b in range(x.shape[0])])


def _summaries(k, v, chunk, w, M: int, summary_weight, cdt):
    """The chunks' summaries [B, Hkv, M, d] (masked or learned weighted means over the keys ``w``
    [B, n] marks: allowed, not a sink; ``v`` None: the keys' only) and log n_j [B, M] (−1e30 for a
    chunk with no such key)."""
    B, Hkv, n, d = k.shape
    dev = k.device
    n_j = torch.zeros(B, M, dtype=cdt, device=dev).scatter_add(1, chunk, w.to(cdt))
    if summary_weight is None:
        weight = w.to(cdt).view(B, 1, n, 1)
        norm = n_j.view(B, 1, M, 1)
    else:
        logit = torch.einsum("bhnd,hd->bhn", k, summary_weight.to(cdt)).masked_fill(~w.view(B, 1, n), NEG)
        top = torch.full((B, Hkv, M), NEG, dtype=cdt, device=dev).scatter_reduce(
            2, chunk.view(B, 1, n).expand(B, Hkv, n), logit.detach(), "amax")  # for stability only
        a = torch.exp(logit - top.gather(2, chunk.view(B, 1, n).expand(B, Hkv, n))) * w.view(B, 1, n)
        weight = a.unsqueeze(-1)
        norm = _chunk_sums(a.unsqueeze(-1), chunk, M)
    inv = 1.0 / norm.clamp(min=1e-30)
    kbar = _chunk_sums(k * weight, chunk, M) * inv
    vbar = None
    if v is not None:
        vbar = _chunk_sums(v * weight, chunk, M) * inv
    log_n = torch.where(n_j > 0, torch.log(n_j.clamp(min=1.0)), NEG)  # [B, M]
    return kbar, vbar, n_j, log_n


def _summarised(j: torch.Tensor, i: torch.Tensor, local_chunks: int, causal: bool) -> torch.Tensor:
    """Whether chunk j is outside the window of a query in chunk i, so summarised for it (causal:
    j < i − L + 1; otherwise |j − i| > L − 1), broadcast over ``j`` and ``i``."""
    return (j < i - local_chunks + 1) if causal else ((j - i).abs() > local_chunks - 1)


# elements of one piece of the selection's scores (B·H·chunks·M), which it sorts
_SELECT_ELEMENTS = 4 << 20


@torch.no_grad()
def _select(q, kbar, n_j, plan: BlockPlan, *, local_chunks: int, causal: bool, scale: float, top_k: int):
    """Top-k (MTA_SPEC.md): per sequence, query head and query chunk i, the ``top_k`` summarised
    chunks j (outside i's window, before it with causality, with a key to summarise) with the largest
    scale·q̄_i·k̄_j, ties to the lower index → [B, H, M, top_k] chunk ids, −1 where fewer exist.
    ``kbar`` has q's heads (the caller repeats a GQA group's). In pieces of query chunks."""
    B, H, n, d = q.shape
    M, L, chunk = plan.chunks, local_chunks, plan.chunk
    K = min(top_k, M)
    qbar = _chunk_sums(q, chunk, M)
    qbar = qbar * (scale / plan.sizes.clamp(min=1).to(q.dtype)).view(B, 1, M, 1)
    jj = torch.arange(M, device=q.device)
    has_keys = (n_j > 0).view(B, 1, 1, M)
    sel = torch.full((B, H, M, top_k), -1, dtype=torch.long, device=q.device)
    step = max(1, _SELECT_ELEMENTS // max(1, B * H * M))
    for i0 in range(0, M, step):
        i = jj[i0:i0 + step].view(-1, 1)
        outside = _summarised(jj, i, L, causal)  # [m, M]
        score = torch.einsum("bhid,bhjd->bhij", qbar[:, :, i0:i0 + step], kbar)
        score = score.masked_fill(~(outside & has_keys), float("-inf"))
        sel[:, :, i0:i0 + step, :K] = _top_chunks(score, K)
    return sel


def _top_chunks(score: torch.Tensor, K: int) -> torch.Tensor:
    """The indices of the K largest finite entries of each row of ``score`` [..., M], ties to the
    lower index (−1 where fewer are finite): ``torch.topk`` (a partial selection, not a sort),
    and a stable sort only for the rows where a tie straddles the K-th place (topk's choice
    among equal values is not the spec's)."""
    vals, idx = torch.topk(score, K, dim=-1)
    kth = vals[..., -1:]
    straddles = ((score == kth).sum(-1) > (vals == kth).sum(-1)) & (kth[..., 0] > float("-inf"))
    if straddles.any():
        rows = straddles.nonzero(as_tuple=True)
        top = torch.sort(score[rows], dim=-1, descending=True, stable=True)
        vals[rows], idx[rows] = top.values[..., :K], top.indices[..., :K]
    return torch.where(vals > float("-inf"), idx, -1)


@dataclass(frozen=True)
class Selected:
    """Per query block and head, the chunks its queries' chunks select (their union U, as lists)
    and their token counts: the column range a block's key set gives them."""

    chunks: torch.Tensor  # [B, H, M, K]: each query chunk's selection (:func:`_select`)
    union: torch.Tensor  # [B, H, nb, U]: the union's chunk ids, ascending, −1 padded
    sizes: torch.Tensor  # [B, H, nb, U]: their tokens (0 for padding)
    ends: torch.Tensor  # [B, H, nb, U]: cumulative sizes
    total: torch.Tensor  # [B, H, nb]: the union's tokens

    def width(self, lo: int, hi: int) -> int:
        """Columns the blocks lo … hi − 1 give the selected tokens: the most of any block and head."""
        return int(self.total[:, :, lo:hi].max()) if hi > lo and self.total.numel() else 0


@torch.no_grad()
def _selected_union(sel: torch.Tensor, plan: BlockPlan) -> Selected:
    B, H, M, K = sel.shape
    nb, Bq = plan.qpos.shape
    rows = sel.gather(2, plan.qchunk.view(B, 1, nb * Bq, 1).expand(B, H, nb * Bq, K)).view(B, H, nb, Bq, K)
    flat = torch.sort(rows.reshape(B, H, nb, Bq * K), dim=-1).values
    new = (flat >= 0) & torch.cat([torch.ones_like(flat[..., :1], dtype=torch.bool), flat[..., 1:] != flat[..., :-1]],
                                  dim=-1)
    U = max(1, int(new.sum(-1).max()))
    order = torch.sort((~new).to(torch.int8), dim=-1, stable=True).indices[..., :U]  # the distinct ids, in order
    union = torch.where(new.gather(-1, order), flat.gather(-1, order), -1)
    sizes = plan.sizes.view(B, 1, 1, M).expand(B, H, nb, M).gather(-1, union.clamp(min=0))
    sizes = torch.where(union >= 0, sizes, 0)
    ends = sizes.cumsum(-1)
    return Selected(sel, union, sizes, ends, ends[..., -1])


def _selected_positions(selected: Selected, plan: BlockPlan, index: torch.Tensor, b: torch.Tensor, T: int):
    """For the (sequence, query head, block) pairs ``index`` [P] (into their flattened [B·H·nb];
    ``b`` their sequences), the T selected columns: each one's token [P, T] (clamped to the
    sequence), its chunk (−1 past the pair's union) and whether it is one of the union's tokens."""
    ends, sizes, union = (x.flatten(0, 2).index_select(0, index) for x in (selected.ends, selected.sizes, selected.union))
    p = torch.arange(T, device=ends.device).expand(ends.shape[0], T).contiguous()
    e = torch.searchsorted(ends, p, right=True).clamp(max=ends.shape[-1] - 1)  # the union entry of column p
    cid = union.gather(-1, e)
    begin = ends.gather(-1, e) - sizes.gather(-1, e)  # its first column
    M = plan.chunks
    start = plan.first.view(-1)[b.unsqueeze(-1) * M + cid.clamp(min=0)]
    real = p < selected.total.flatten().index_select(0, index).unsqueeze(-1)
    pos = (start + p - begin).clamp(0, plan.chunk.shape[1] - 1)
    return pos, torch.where(real, cid, -1), real


# a call of the fused attention, in columns of one (head, block) pair: what splitting the pairs
# into one more group must save (:func:`pair_groups`); at most this many groups; cut points at
# every 1/32 of the ranks. (256 … 4096 and 4 … 16 groups timed alike, within the box's noise, on
# SmolLM2's layers at 4K: 249–263 ms over four layers)
_GROUP_OVERHEAD = 1024
_MAX_GROUPS = 4
_CUT_POINTS = 32


def summary_widths(plan: BlockPlan, *, causal: bool, local_chunks: int) -> torch.Tensor:
    """[nb]: per query block, the summaries its rows may use are among the first this many (causal:
    up to its last query's chunk − L + 1; otherwise all M)."""
    if causal:
        return (plan.qchunk.amax(dim=(0, 2)) - local_chunks + 1).clamp(min=0)
    return torch.full((plan.qpos.shape[0],), plan.chunks, dtype=torch.long, device=plan.qchunk.device)


def pair_groups(selected: Selected, widths: torch.Tensor, first: int = 0) -> list[tuple[torch.Tensor, int]]:
    """The forward's second key set with top-k: the (query head, block, sequence) pairs of blocks
    ``first`` … nb − 1, as indices h·nb·B + block·B + b, in groups that each run as one call (in
    pieces under the memory bound), padded to their own most columns → [(pairs, columns)]. A
    pair's columns are its block's summaries (``widths``, :func:`summary_widths`) then its union's
    tokens; the pairs are sorted by their count and cut where padding and calls cost least
    (:func:`_cuts`); pairs with no column are left out."""
    B, H, nb = selected.total.shape
    totals = selected.total.permute(1, 2, 0)[:, first:]  # [H, nb − first, B]
    pairs = (torch.arange(H, device=totals.device).view(H, 1, 1) * (nb * B)
             + torch.arange(first * B, nb * B, device=totals.device).view(1, nb - first, B))
    cost = (widths[first:].view(1, -1, 1) + totals).reshape(-1)
    live = cost > 0
    pairs, cost = pairs.reshape(-1)[live], cost[live]
    order = torch.argsort(cost, stable=True)
    ranked = cost[order].tolist()
    return [(pairs[order[a:e]], ranked[e - 1]) for a, e in _cuts(ranked)]


def _cuts(ranked: list[int]) -> list[tuple[int, int]]:
    """Ascending costs cut into at most ``_MAX_GROUPS`` runs [a, e), each padded to its last, that
    minimise Σ (e − a)·ranked[e − 1] + ``_GROUP_OVERHEAD`` per run: exactly (dynamic programming)
    over cut points at every 1/32 of the ranks and where the cost changes most (a long tail of a
    few wide pairs gets a run of its own)."""
    N = len(ranked)
    if N == 0:
        return []
    points = sorted({0, N} | {N * i // _CUT_POINTS for i in range(1, _CUT_POINTS)}
                    | {i for i in range(1, N) if ranked[i] > 2 * ranked[i - 1] + 16})
    inf = float("inf")
    # best[g][i]: the least cost of ranks 0 … points[i] − 1 in g runs, and where the last run starts
    best = [[(0.0, -1)] + [(inf, -1)] * (len(points) - 1)]
    for g in range(1, _MAX_GROUPS + 1):
        row = [(inf, -1)] * len(points)
        for i in range(1, len(points)):
            e = points[i]
            for j in range(i):
                prev = best[g - 1][j][0]
                if prev < inf:
                    c = prev + (e - points[j]) * ranked[e - 1] + _GROUP_OVERHEAD
                    if c < row[i][0]:
                        row[i] = (c, j)
        best.append(row)
    g = min(range(1, _MAX_GROUPS + 1), key=lambda g: best[g][-1][0])
    runs, i = [], len(points) - 1
    for level in range(g, 0, -1):
        j = best[level][i][1]
        runs.append((points[j], points[i]))
        i = j
    return runs[::-1]


def key_columns(segment_ids: torch.Tensor | None, *, chunk_size: int, causal: bool = False, local_chunks: int = 1,
                sinks: int = 0, n: int | None = None, top_k: int = 0, q: torch.Tensor | None = None,
                k: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                scale: float | None = None) -> tuple[float, int, int]:
    """(columns per query, key-set rows, chunks) the op computes per sequence and head in query
    blocks for these ids (every sequence of a batch runs the layout of the widest; ``segment_ids``
    None: fixed chunks over ``n`` tokens): the cost model's keys per query (window range, sinks,
    summaries, with top-k the selected chunks' tokens), the rows of the key sets it builds and the
    chunks M (top-k scores M chunks per query chunk) (``calibration.cost``). With ``top_k`` the
    selected columns depend on the data: ``q`` and ``k`` (and the call's mask and scale) are
    needed, and the op's own selection counts them."""
    B, n = segment_ids.shape if segment_ids is not None else (1, n)
    B = q.shape[0] if q is not None else B
    device = q.device if q is not None else None if segment_ids is None else segment_ids.device
    plan = plan_blocks(None if segment_ids is None else segment_ids.to(device), B, chunk_size=chunk_size, causal=causal,
                       local_chunks=local_chunks, sinks=sinks, n=n, device=device)
    s = min(sinks, n)
    W = plan.width
    selected = None
    if top_k > 0:
        if q is None or k is None:
            raise ValueError("key_columns with top_k counts the chunks the data selects: give q and k")
        selected = _selection_of(q, k, attn_mask, plan, causal=causal, local_chunks=local_chunks, sinks=s,
                                 scale=scale, top_k=top_k)
    columns = rows = 0
    for lo_b, hi_b, width in plan.bands:  # the window and sinks, and the summaries without top-k
        columns += (hi_b - lo_b) * plan.block * (W + s + (0 if top_k else width))
        rows += (hi_b - lo_b) * (W + s + (0 if top_k else plan.chunks))
    if selected is not None:  # the summaries and selected tokens of the forward's groups of pairs
        H = selected.total.shape[1]
        widths = summary_widths(plan, causal=causal, local_chunks=local_chunks)
        padded = sum(len(pairs) * cols for pairs, cols in pair_groups(selected, widths)) / (B * H)
        columns += plan.block * padded
        rows += padded
    return columns / n, round(rows), plan.chunks


@torch.no_grad()
def _selection_of(q, k, attn_mask, plan: BlockPlan, *, causal: bool, local_chunks: int, sinks: int, scale, top_k: int):
    """The op's top-k selection and its per-block union for these inputs (:func:`key_columns`)."""
    B, Hq, n, d = q.shape
    mask = normalize_mask(simplify_mask(attn_mask, B, Hq, n, causal)[0], B, Hq, n)
    if not varlen_applies(mask):
        raise ValueError("key_columns counts calls with no mask or key padding")
    cdt = _compute_dtype(q.dtype)
    q, k = q.to(cdt), k.to(cdt).repeat_interleave(Hq // k.shape[1], dim=1)
    key_ok = mask.allowed.view(-1, n).expand(B, n) if mask is not None else torch.ones(B, n, dtype=torch.bool,
                                                                                        device=q.device)
    w = key_ok & (torch.arange(n, device=q.device) >= sinks)
    kbar, _, n_j, _ = _summaries(k, None, plan.chunk, w, plan.chunks, None, cdt)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _selected_union(_select(q, kbar, n_j, plan, local_chunks=local_chunks, causal=causal, scale=scale,
                                   top_k=top_k), plan)


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
    """Boundary-chunk MTA (``segments.py``'s chunks, MTA_SPEC.md's math) for the masks of
    :func:`varlen_applies`, differentiable in q, k, v and ``summary_weight``. ``block``: the
    queries per block (default :func:`query_block`). ``rows_from``: the caller reads the output's
    rows from this query on only; the query blocks wholly before it are not computed (their rows
    are zeros). ``softcap``: logits soft-capped (``chunked.soft_capped``). See the module docstring."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    mask = normalize_mask(attn_mask, B, Hq, n)
    if not varlen_applies(mask):
        raise ValueError("mta_attention_varlen takes no mask or key padding (use segments.segmented)")
    q_in = q
    cdt = _compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    dev = q.device
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    L, s = local_chunks, min(sinks, n)
    K = top_k
    # With top-k each query head has its own selected chunks. Where no gradient is wanted (the op's
    # forward: the fused kernel's log-sum-exp has none), a block runs as two key sets merged by
    # their log-sum-exps: A, the window and sinks, per key/value head with the rows of its query
    # heads together (as without top-k), band by band; B, the summaries and the selected chunks'
    # tokens, per (query head, block) pair, all blocks' pairs in a few groups after the bands.
    # Under autograd, one key set per query head (k and v repeated to the query heads).
    split = K > 0 and not _wants_grad(q, k, v, summary_weight)
    if K > 0 and not split and G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        if summary_weight is not None:
            summary_weight = summary_weight.repeat_interleave(G, dim=0)
        Hkv, G = Hq, 1
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
    kbar, vbar, n_j, log_n = _summaries(k, v, chunk, w, M, summary_weight, cdt)
    selected = None
    if K > 0:  # each query chunk's top-k chunks, per query head; per block the union of its rows'
        sel = _select(q, kbar.repeat_interleave(G, dim=1), n_j, plan, local_chunks=L, causal=causal, scale=scale,
                      top_k=K)
        selected = _selected_union(sel, plan)

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
    jj = torch.arange(M, device=dev)
    if K > 0:
        # a block's rows by chunk: R, the most chunks a block spans, and [nb·B, R] rows per chunk
        local = (qchunk - qchunk[..., :1]).transpose(0, 1).reshape(nb * B, Bq)  # rows: block·B + b
        R = int(local.max()) + 1
        row_counts = torch.zeros(nb * B, R, dtype=torch.long, device=dev).scatter_add_(1, local, torch.ones_like(local))
        # the rows :func:`headwise_part` selects from: k's (v's) tokens, then the summaries
        k_src = torch.cat([k.reshape(B * Hkv * n, d), kbar.reshape(B * Hkv * M, d)])
        v_src = torch.cat([v.reshape(B * Hkv * n, d), vbar.reshape(B * Hkv * M, d)])

    def shared_part(k_dst, v_dst, sel: slice, m_b: int, width: int) -> torch.Tensor:
        """Fills [Hkv, m, B, ·, d] with the window tokens, the sinks and (``width`` > 0) the first
        ``width`` summaries; → their terms [B, m, Bq, ·], the same for every head."""
        gidx = kpos[:, sel].reshape(1, B, m_b * Wmax, 1).expand(Hkv, B, m_b * Wmax, d)
        k_dst[:, :, :, :Wmax] = kT.gather(2, gidx).view(Hkv, B, m_b, Wmax, d).transpose(1, 2)
        v_dst[:, :, :, :Wmax] = vT.gather(2, gidx).view(Hkv, B, m_b, Wmax, d).transpose(1, 2)
        if s > 0:
            k_dst[:, :, :, Wmax:Wmax + s] = kT[:, :, :s].unsqueeze(1)
            v_dst[:, :, :, Wmax:Wmax + s] = vT[:, :, :s].unsqueeze(1)
        if width:
            k_dst[:, :, :, Wmax + s:] = kbar[:, :, :width].transpose(0, 1).unsqueeze(1)
            v_dst[:, :, :, Wmax + s:] = vbar[:, :, :width].transpose(0, 1).unsqueeze(1)
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
        if width:  # summary j for the rows it is summarised for, log n_j
            parts.append(torch.where(_summarised(jj[:width], qc, L, causal), log_n[:, :width].view(B, 1, 1, width),
                                     NEG).to(cdt))
        return torch.cat(parts, dim=-1)

    def headwise_part(pairs: torch.Tensor, C: int, widths: torch.Tensor):
        """For the (query head h, block, sequence b) ``pairs`` [P] (indices h·nb·B + block·B + b):
        → keys and values [P, C, d] and their terms [P, Bq, C]. A pair's columns are its block's
        first w summaries (w: ``widths`` of its block), then the tokens of the chunks its rows
        select (a row's selected chunks leave its summaries for their exact columns), then padding
        (−1e30). (One ``index_select`` of rows of ``k_src``: a memory copy per row, where advanced
        indexing on the CPU copies element by element.)"""
        h, mb = pairs // (nb * B), pairs % (nb * B)  # mb: block·B + b
        b, blk = mb % B, mb // B
        P = len(pairs)
        kv_row = (b * Hkv + h // G).unsqueeze(-1)
        index = (b * Hq + h) * nb + blk  # into Selected's [B·H·nb]
        # the terms depend on a row only through its chunk: built for the R chunks a block may span
        # ([P, R, C]), then each repeated for its rows
        qc = (qchunk.flatten(0, 1).index_select(0, b * nb + blk)[:, :1] + torch.arange(R, device=dev)).clamp(max=M - 1)
        srows = selected.chunks.flatten(0, 2).index_select(0, ((b * Hq + h) * M).unsqueeze(-1).add(qc).view(-1))
        srows = srows.view(P, R, K)
        qc = qc.unsqueeze(-1)  # [P, R, 1]
        w = widths.index_select(0, blk).unsqueeze(-1)  # [P, 1]
        col = torch.arange(C, device=dev)
        is_summary = col < w  # [P, C]
        ln = log_n.index_select(0, b)[:, col.clamp(max=M - 1)].unsqueeze(1)  # [P, 1, C]
        term = torch.where(_summarised(col, qc, L, causal) & is_summary.unsqueeze(1), ln, NEG).to(cdt)  # [P, R, C]
        # a row's selected chunks: their summaries' terms to −1e30 (amin: −1 entries leave theirs)
        pick = (srows >= 0) & (srows < w.unsqueeze(-1))
        term.scatter_reduce_(-1, srows.clamp(0, C - 1), torch.where(pick, NEG, float("inf")).to(cdt), "amin")
        src = B * Hkv * n + kv_row * M + col.clamp(max=M - 1)  # the summaries' rows of k_src
        T = int((C - w).max())
        if T > 0:
            spos, schunk, sreal = _selected_positions(selected, plan, index, b, T)  # [P, T]
            # a row's own selection, of the union's real tokens, not sinks (the sink columns'), allowed
            # (a selected chunk's keys all come before the query: no causal test)
            usable = sreal & (spos >= s) & key_ok[b.unsqueeze(-1), spos]
            at = (col - w).clamp(0, T - 1)  # [P, C]: the selected column of each column past the summaries
            spos, schunk = spos.gather(-1, at), torch.where(usable, schunk, -2).gather(-1, at)
            src = torch.where(is_summary, src, kv_row * n + spos)
            schunk = torch.where(is_summary, -2, schunk).unsqueeze(1)  # [P, 1, C]
            for r in range(K):
                term.masked_fill_(schunk == srows[..., r:r + 1], 0.0)
        term = term.view(P * R, C).repeat_interleave(row_counts.index_select(0, mb).view(-1), dim=0,
                                                     output_size=P * Bq).view(P, Bq, C)
        src = src.view(-1)
        return k_src.index_select(0, src).view(-1, C, d), v_src.index_select(0, src).view(-1, C, d), term

    # ---- fused attention per band of blocks ---------------------------------------------------
    # On the CPU a band runs in pieces whose key sets stay under the memory bound
    # (chunked._memory_bands), built, used and freed one after the other.
    out = torch.empty(Hkv, nb * B, G * Bq, d, dtype=cdt, device=dev)
    lse = torch.empty(Hkv, nb * B, G * Bq, dtype=cdt, device=dev)
    first = min(max(rows_from, 0) // Bq, nb)  # the first query block computed (rows: block·B + b)
    if first:
        out[:, :first * B] = 0.0
        lse[:, :first * B] = 0.0
    for lo_p, hi_p, width in plan.bands:
        lo_p = max(lo_p, first)
        if lo_p >= hi_p:
            continue
        # columns per row: shared (window, sinks; the summaries without top-k) and, under autograd
        # with top-k, per query head (the summaries and the selected tokens); bytes per block: the
        # key sets, the scores of a soft-cap, the per-head terms
        cols_a = Wmax + s + (0 if K else width)
        cols_b = width + selected.width(lo_p, hi_p) if K and not split else 0
        row_bytes = (Hkv * B * cols_a * (d + (2 * G * Bq if softcap else 0))
                     + Hq * B * cols_b * (d + Bq + (2 * Bq if softcap else 0))) * cdt.itemsize
        for lo_b, hi_b in _memory_bands(lo_p, hi_p, row_bytes, dev):
            m_b = hi_b - lo_b
            sel = slice(lo_b, hi_b)
            rows = slice(lo_b * B, hi_b * B)
            cols_b = width + selected.width(lo_b, hi_b) if K and not split else 0
            # one key set [Hkv, m, B, cols, d] (with top-k under autograd here G = 1: every query
            # head its own, the selected part after the shared one)
            cols = cols_a + cols_b
            k_set = torch.empty(Hkv, m_b, B, cols, d, dtype=cdt, device=dev)
            v_set = torch.empty(Hkv, m_b, B, cols, d, dtype=cdt, device=dev)
            term = shared_part(k_set[..., :cols_a, :], v_set[..., :cols_a, :], sel, m_b, 0 if K else width)
            if cols_b:  # [Hkv, m, B, Bq, cols] (rows: block·B + b): the shared terms, then the per-head ones
                shared, term = term, torch.empty(Hkv, m_b, B, Bq, cols, dtype=cdt, device=dev)
                term[..., :cols_a] = shared.transpose(0, 1)
                pairs = (torch.arange(Hq, device=dev).view(Hq, 1) * (nb * B)
                         + torch.arange(lo_b * B, hi_b * B, device=dev)).view(-1)
                k_b, v_b, term_b = headwise_part(pairs, cols_b, torch.full((nb,), width, device=dev))
                k_set[..., cols_a:, :] = k_b.view(Hkv, m_b, B, cols_b, d)
                v_set[..., cols_a:, :] = v_b.view(Hkv, m_b, B, cols_b, d)
                term[..., cols_a:] = term_b.view(Hkv, m_b, B, Bq, cols_b)
                term = term.view(Hkv, m_b * B, Bq, cols)
            else:
                if G > 1:  # rows are (query head of the group, query): the same terms for each head
                    term = term.unsqueeze(2).expand(-1, -1, G, -1, -1).flatten(2, 3)
                term = term.transpose(0, 1).reshape(1, m_b * B, G * Bq, cols)  # rows: block·B + b
            o, l = _attention_with_lse(q_rows[:, rows], k_set.view(Hkv, m_b * B, cols, d),
                                       v_set.view(Hkv, m_b * B, cols, d), term, scale, softcap)
            out[:, rows], lse[:, rows] = o, l
    if split:  # the second key set, per (query head, block, sequence) pair, merged by log-sum-exp
        # a pair's rows in ``q_rows``, ``out`` and ``lse`` as [Hkv·nb·B·G, Bq, ·]: (kv head, block·B + b, g)
        q_pairs, o_pairs, l_pairs = q_rows.reshape(-1, Bq, d), out.view(-1, Bq, d), lse.view(-1, Bq)
        widths = summary_widths(plan, causal=causal, local_chunks=L)
        for pairs, C in pair_groups(selected, widths, first):
            row_bytes = C * (2 * d + Bq + (2 * Bq if softcap else 0)) * cdt.itemsize
            for a, e in _memory_bands(0, len(pairs), row_bytes, dev):
                part = pairs[a:e]
                h = part // (nb * B)
                rows = ((h // G) * (nb * B) + part % (nb * B)) * G + h % G
                k_b, v_b, term_b = headwise_part(part, C, widths)
                o_b, l_b = _attention_with_lse(q_pairs.index_select(0, rows).unsqueeze(0), k_b.unsqueeze(0),
                                               v_b.unsqueeze(0), term_b.unsqueeze(0), scale, softcap)
                del k_b, v_b, term_b
                o, l = _merge_by_lse(o_pairs.index_select(0, rows), l_pairs.index_select(0, rows), o_b[0], l_b[0])
                o_pairs.index_copy_(0, rows, o)
                l_pairs.index_copy_(0, rows, l)
    # a query with nothing to attend to (every key padded away) outputs zeros
    out = out.masked_fill((lse <= EMPTY_ROW_LSE).unsqueeze(-1), 0.0)
    out = out.view(Hkv, nb, B, G, Bq, d).permute(2, 0, 3, 1, 4, 5).reshape(B, Hq, npad, d)
    return in_layout_of(q_in, out[:, :, :n])
