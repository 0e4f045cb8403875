"""The efficient MTA implementation (CPU, and any device without a dedicated kernel).

Everything is vectorised over chunks: no Python loop over queries or heads (the only loops are
over bands of query chunks, each band's ≤ 2L−1 window offsets and top_k gathered slots).

Layout. Queries are cut into ``nc`` chunks of ``c`` tokens; the queries of one chunk and of the
``G = Hq / Hkv`` query heads that share a key/value head form one row block of ``T = G·c`` rows
(grouped-query attention without copying k and v to Hq heads). For every query chunk ``i`` we
build one key set of ``X`` columns:

    [ exact chunks of i (window, top-k selected, non-uniform-mask blocks) | sinks | summaries ]

and run all chunks as one batch through PyTorch's fused CPU flash-attention kernel. What differs
per chunk but not per query inside the chunk (a window chunk that falls off the sequence, key
padding, a summary's ``log n_j``, a summary excluded because it is exact for this chunk) is one
row of additive terms per chunk, passed as a mask with a broadcast query dimension (stride 0 in
the kernel: nothing n×X is built). Per-query terms are the causal triangle of the diagonal chunk
(a [T, X] mask shared by every chunk and head) and, for masks the user built per query, the
gathered blocks of that mask. When the per-chunk terms differ per head (top-k, per-batch key
padding) *and* causality needs the triangle, the terms ride in one extra head dimension instead
(q' = [q, 1/scale], k' = [k, term]) so the mask stays the small shared triangle.

With top-k (whose selection differs between query heads) and no gradient wanted, each band runs
as two key sets merged by their log-sum-exps: the window and sinks per key/value head, the
selected chunks and summaries per query head (``_TopKSplit``).

Layouts. Models hand q, k and v over as transposed [B, n, H, d] buffers (each token's heads side
by side), often slices of one fused projection. The op reads them as they are: the chunk sums as
one matmul per chunk over all of a token's heads, the query rows a band at a time (a view where
batch and heads merge, else a band's copy), and the bands write the output into q's own layout,
so a model's layout costs no whole-tensor copy (it cost a fifth of the op at 16K tokens).

Key sets are built, used and freed band by band (runs of query chunks, at most ``_BAND_BYTES``
per key set), so the allocator reuses one band's memory for the next instead of faulting in fresh
pages for a whole-sequence key set.

Cost per head: n·X·d multiply-adds with X = c·(W + top_k) + sinks + nc (W = L causal, 2L−1
otherwise), the causal summaries banded to about half; memory O(n·d) for the output and the
summaries, one band's key sets, and O(n·X) inside the kernel's tiles. No n×n tensor exists
unless the user passed one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import in_layout_of
from .masks import NormalizedMask, normalize_mask

# Additive term for "excluded": finite, so that a fully excluded row has a finite log-sum-exp
# (found below and zeroed) and 0·NEG stays 0 in the backward pass through the extra head
# dimension; exp(NEG − anything real) is 0.
NEG = -1.0e30
# A row whose log-sum-exp is below this attended nothing (all its terms were NEG).
EMPTY_ROW_LSE = -1.0e29


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half types are computed in fp32 on the CPU: the flash kernel accumulates in fp32 anyway,
    # and the summaries (means over up to c keys) lose precision in bf16.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def soft_capped(s: torch.Tensor, softcap: float) -> torch.Tensor:
    """Logits soft-capped as Gemma-2 caps its attention scores: softcap·tanh(s / softcap); 0 is no cap."""
    return s if not softcap else torch.tanh(s / softcap) * softcap


def _attention_with_lse(q, k, v, mask, scale, softcap: float = 0.0):
    """softmax(cap(scale·q·kᵀ) + mask)·v and its log-sum-exp over 4-D [B', H', T, e] tensors
    (cap: :func:`soft_capped`, the identity for ``softcap`` 0). The mask is added after the cap,
    so its terms (−1e30 for excluded columns, log n_j for summaries) keep their meaning."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and not softcap:
        # The CPU flash kernel returns the log-sum-exp we need to find empty rows; it is
        # differentiable in its output (derivatives.yaml) and never materialises T×X scores
        # beyond its tiles.
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )
        return out, lse
    # (a soft-cap has no fused kernel: the scores of the call are materialised, a band's worth)
    s = soft_capped(torch.matmul(q, k.transpose(-1, -2)) * scale, softcap)
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.softmax(s, dim=-1), v)
    return out, lse


def _attend(qb, k_set, v_set, term, tri, user, scale: float, aug: bool, softcap: float = 0.0):
    """One band's fused attention: queries qb [B'·H', nb, T, d] against key and value sets
    [B', H', nb, width, e] with additive terms: ``term`` [Bt, Ht, nb, width] per query chunk (one
    row all its queries share), ``tri`` [T, width] bool (the causal triangle, excluded) or None,
    ``user`` [.., nb, T, width] per-query terms or None. ``aug`` (e = d + 1): the per-chunk terms
    ride in the extra head column instead of the mask, q' = [q, 1/scale], k' = [k, term], so that
    the mask is the shared triangle alone (not with ``softcap``: the cap would take the terms in).
    → (out [B'·H', nb, T, d], log-sum-exp [B'·H', nb, T])."""
    Bk, Hk, nb, width, e = k_set.shape
    d, T = qb.shape[-1], qb.shape[-2]
    if aug:
        qa = torch.empty(Bk * Hk, nb, T, e, dtype=qb.dtype, device=qb.device)
        qa[..., :d] = qb
        qa[..., d] = 1.0 / scale
        qb = qa
        k_set[..., d] = term
        v_set[..., d] = 0.0  # the kernel wants one head size; this column is dropped after
        m = torch.zeros(1, 1, 1, 1, width, dtype=qb.dtype, device=qb.device)
    else:
        m = term.unsqueeze(-2)  # [Bt, Ht, nb, 1, width]: one row per chunk (stride 0)
    if tri is not None:
        m = m.masked_fill(tri, NEG)
    if user is not None:
        m = m + user
    if m.shape[0] * m.shape[1] == 1:
        m4 = m.reshape(1, *m.shape[2:])
    else:
        m4 = m.expand(Bk, Hk, *m.shape[2:]).reshape(Bk * Hk, *m.shape[2:])
    o, lse = _attention_with_lse(qb, k_set.view(Bk * Hk, nb, width, e), v_set.view(Bk * Hk, nb, width, e), m4, scale,
                                 softcap)
    return o[..., :d], lse


def _merge_by_lse(o_a, l_a, o_b, l_b):
    """Two softmax attentions over disjoint key sets merged exactly into the one over their union by
    their log-sum-exps: out = oA·σ(lA − lB) + oB·σ(lB − lA) → (out, log-sum-exp)."""
    return torch.lerp(o_b, o_a, torch.sigmoid(l_a - l_b).unsqueeze(-1)), torch.logaddexp(l_a, l_b)


def _wants_grad(*tensors) -> bool:
    """Whether autograd will want gradients of any of these tensors (None entries ignored)."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)


def _pad_tokens(x: torch.Tensor, npad: int, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    if npad == n:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, npad - n]
    return F.pad(x, pad)


def _window_offsets(L: int, causal: bool) -> list[int]:
    return list(range(-(L - 1), 1)) if causal else list(range(-(L - 1), L))


def _window_into(dst_k: torch.Tensor, dst_v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, offsets: list[int],
                 lo: int, hi: int) -> None:
    """The window of query chunks lo … hi − 1 into dst [..., hi − lo, len(offsets)·c, d] (views
    of a band's key sets): slot j holds chunk i + offsets[j] of kc, vc [..., nc, c, d] (leading
    dimensions broadcast: [B, Hkv, 1] into [B, Hkv, G] reads each key/value head once per query
    head, no copy of k), shifted copies without an index gather; zeros where that chunk is off the
    sequence (its term excludes it)."""
    nc, c = kc.shape[-3], kc.shape[-2]
    nb = hi - lo
    for slot, o in enumerate(offsets):
        a, b = max(lo, -o), min(hi, nc - o)  # the query chunks whose chunk i + o exists
        cols = slice(slot * c, (slot + 1) * c)
        if b > a:
            dst_k[..., a - lo:b - lo, cols, :] = kc[..., a + o:b + o, :, :]
            dst_v[..., a - lo:b - lo, cols, :] = vc[..., a + o:b + o, :, :]
        for edge in (slice(0, max(0, min(a, hi) - lo)), slice(max(0, max(b, lo) - lo), nb)):
            dst_k[..., edge, cols, :] = 0.0
            dst_v[..., edge, cols, :] = 0.0


def _gather_chunks_into(dst: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> None:
    """dst [B, H, nb, K·c, e] (a view) ← chunks of x [B, H / share, nc, c, e] named by idx
    [Bl, Hl, nb, K] (chunk ids ≥ 0; query head h reads key/value head h // share), one slot of c
    columns at a time: each slot's gather is one ``index_select`` over the chunks of x, small
    enough to stay in cache on its way into ``dst`` (one gather of all K slots builds a K-times
    larger intermediate and runs 2–3× slower on the CPU)."""
    B, H = dst.shape[:2]
    share = H // x.shape[1]
    nc, c = x.shape[2], x.shape[3]
    nb = idx.shape[2]
    flat = x.reshape(-1, c, x.shape[-1])
    base = (torch.arange(B * H, device=x.device) // share * nc).view(B, H, 1)
    for slot in range(idx.shape[-1]):
        rows = (idx[..., slot].expand(B, H, nb) + base).reshape(-1)
        dst[:, :, :, slot * c:(slot + 1) * c] = flat.index_select(0, rows).view(B, H, nb, c, -1)


def _causal_bands(nc: int, count: int = 8) -> list[tuple[int, int]]:
    """Split nc query chunks into up to ``count`` contiguous bands of about equal size."""
    count = max(1, min(count, nc // 4))
    return _even_bands(nc, count)


def _even_bands(nc: int, count: int) -> list[tuple[int, int]]:
    edges = [round(b * nc / count) for b in range(count + 1)]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


# Bytes of one band's key set (its value set takes as much again); see the band loop.
_BAND_BYTES = 8 << 20


def _memory_bands(lo: int, hi: int, row_bytes: int, device: torch.device, at_least: int = 1) -> list[tuple[int, int]]:
    """Rows lo … hi − 1 (query chunks, or query blocks) in at least ``at_least`` contiguous bands of
    about equal size, and on the CPU enough that a band's key set (``row_bytes`` per row) fits in
    ``_BAND_BYTES`` (other devices have caching allocators, and each band is a few more kernel
    launches): the memory bound of every CPU implementation here. No bands for no rows (a caller
    that reads no row: ``rows_from`` at the end)."""
    rows = hi - lo
    if rows <= 0:
        return []
    count = at_least
    if device.type == "cpu":
        count = max(count, -(-rows * row_bytes // _BAND_BYTES))
    return [(lo + a, lo + b) for a, b in _even_bands(rows, min(rows, count))]


def _bands(nc: int, causal: bool, row_bytes: int, device: torch.device, first: int = 0) -> list[tuple[int, int]]:
    """The bands of :func:`mta_attention_chunked` over query chunks first … nc − 1: at least 8 when
    causal (and there are ≥ 32 of them), each under the memory bound (:func:`_memory_bands`)."""
    rows = nc - first
    return _memory_bands(first, nc, row_bytes, device, at_least=max(1, min(8, rows // 4)) if causal else 1)


def _top_index_lists(flags: torch.Tensor, count: int) -> torch.Tensor:
    """For bool flags [..., nc_j], the indices of the first ``count`` True entries, -1 padded."""
    order = torch.sort((~flags).to(torch.int8), dim=-1, stable=True).indices[..., :count]
    taken = torch.gather(flags, -1, order)
    return torch.where(taken, order, torch.full_like(order, -1))


class _MaskBlocks:
    """The mask in (query chunk, key chunk) blocks, as :func:`mta_attention_chunked` reads it.

    ``allowed``, ``bias``: padded to whole chunks (pad keys forbidden; pad queries repeat the last
    real row, which keeps uniformity), or None. ``Iq``: nc when the mask varies per query, else 1.
    ``w`` [Bm|1, Hm|1, Iq, nc, c]: the keys that may enter a summary (real, not a sink, allowed for
    the block's first query). ``uniform`` [Bm, Hm, Iq, nc] (None: every block): block (i, j) may be
    summarised, every query of chunk i allowing the same keys of chunk j with one constant bias
    over them (``summary_bias``, added to the summary logit); any other block is attended exactly."""

    def __init__(self, mask: NormalizedMask | None, n: int, c: int, s: int, cdt: torch.dtype, dev):
        nc = -(-n // c)
        npad = nc * c
        self.nc, self.c = nc, c
        pos = torch.arange(npad, device=dev)
        allowed = bias = None
        if mask is not None:
            allowed, bias = mask.allowed.to(dev), mask.bias
            if bias is not None:
                bias = bias.to(device=dev, dtype=cdt)
            allowed = _pad_tokens(allowed, npad, 3)
            if bias is not None:
                bias = _pad_tokens(bias, npad, 3)
            if mask.per_query and npad > n:
                rep = [allowed[:, :, -1:].expand(-1, -1, npad - n, -1)]
                allowed = torch.cat([allowed] + rep, dim=2)
                if bias is not None:
                    bias = torch.cat([bias, bias[:, :, -1:].expand(-1, -1, npad - n, -1)], dim=2)
        self.allowed, self.bias = allowed, bias
        self.Iq = nc if (mask is not None and mask.per_query) else 1  # query-chunk extent of the mask
        base = ((pos < n) & ~(pos < s)).view(nc, c)
        self.uniform = self.summary_bias = None
        if allowed is None:
            self.w = base.view(1, 1, 1, nc, c)
            return
        ab = self.blocks(allowed)
        w = self.w = ab[:, :, :, 0] & base  # [Bm, Hm, Iq, nc, c]
        if mask.per_query:
            eff = ab & base.view(1, 1, 1, 1, nc, c)
            self.uniform = (eff == eff[:, :, :, :1]).all(dim=3).all(dim=-1)  # [Bm, Hm, nc, nc]
        if bias is not None:
            bb = self.blocks(bias)
            b0 = bb[:, :, :, 0]
            big = torch.tensor(float("inf"), dtype=cdt, device=dev)
            bmax = torch.where(w, b0, -big).amax(-1)
            bmin = torch.where(w, b0, big).amin(-1)
            const = (bmax == bmin) | ~w.any(-1)
            if mask.per_query:
                zero = torch.zeros((), dtype=cdt, device=dev)
                same = (torch.where(eff, bb, zero) == torch.where(w, b0, zero).unsqueeze(3)).all(3).all(-1)
                const = const & same
            self.uniform = const if self.uniform is None else self.uniform & const
            self.summary_bias = torch.where(w.any(-1), bmax, torch.zeros((), dtype=cdt, device=dev))

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[Bm, Hm, nq, npad] -> [Bm, Hm, Iq, cq, nc, c]"""
        return x.view(x.shape[0], x.shape[1], self.Iq, -1, self.nc, self.c)


def _outside_window(nc: int, L: int, causal: bool, dev) -> torch.Tensor:
    """[nc, nc] bool: key chunk j is outside query chunk i's window of L chunks (before it only,
    with causality): summarised, or attended exactly when top-k selects it or its block is not uniform."""
    ii = torch.arange(nc, device=dev).view(nc, 1)
    jj = torch.arange(nc, device=dev).view(1, nc)
    return (jj < ii - L + 1) if causal else ((jj - ii).abs() > L - 1)


def _chunk_sums(xc: torch.Tensor, w: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """Σ_s w_s·x_s over each chunk: xc [B, H, nc, c, d], w [Bm|1, Hm|1, Iq, nc, c] bool → [B, H, Iq,
    nc, d]. Where w is the same for every head and xc is a model's transposed [B, n, H, d] buffer
    (each token's heads side by side in memory, as in a [B, n, H·d] projection or a slice of a fused
    one), one matmul per chunk over all heads at once reads it as it is ([c] · [c, H·d]); the general
    einsum would first copy it whole into a head-major order."""
    B, H, nc, c, d = xc.shape
    if w.shape[1] == 1 and H > 1 and xc.stride(1) == d * xc.stride(4):
        Iq = w.shape[2]
        by_token = xc.permute(0, 2, 3, 1, 4).reshape(B, nc, c, H * d)  # (a view: heads inside tokens)
        weights = w[:, 0].to(cdt).expand(B, Iq, nc, c).transpose(1, 2)  # [B, nc, Iq, c]
        sums = torch.matmul(weights, by_token)  # [B, nc, Iq, H·d]
        return sums.view(B, nc, Iq, H, d).permute(0, 3, 2, 1, 4)
    return torch.einsum("bhijc,bhjcd->bhijd", w.to(cdt).expand(B, H, -1, -1, -1), xc)


def _learned_summaries(kc, vc, w, summary_weight):
    """Learned summaries: chunk j's keys (and values) weighted by a_s = softmax over the keys s
    that may enter it (``w``) of k_s·w_h, for kc, vc [B, Hkv, nc, c, d], w [Bm|1, Hm|1, Iq, nc, c],
    summary_weight [Hkv, d] → kbar, vbar [B, Hkv, Iq, nc, d]. w_h = 0 gives the masked mean."""
    logit = torch.einsum("bhjcd,hd->bhjc", kc, summary_weight).unsqueeze(2)  # [B, Hkv, 1, nc, c]
    # NEG, not −inf: a chunk with no key gives a finite (discarded) row, and no NaN in the backward
    a = torch.softmax(torch.where(w, logit, NEG), dim=-1)
    a = torch.where(w, a, 0.0)
    return torch.einsum("bhijc,bhjcd->bhijd", a, kc), torch.einsum("bhijc,bhjcd->bhijd", a, vc)


class _TopKSplit:
    """Fixed chunks with top-k, no gradient wanted: each band in two fused calls merged by their
    log-sum-exps (see "top-k: two key sets" in :func:`mta_attention_chunked`). Part A: the window
    (``n_win`` chunks) and the sinks, per key/value head of k (H0 = H / share heads), the rows of
    its ``share`` query heads together (one copy of them, and the triangle ``tri``); part B: the
    other exact chunks (top-k selected, non-uniform) and the summaries, per query head, one term
    row per query chunk. A sink inside a part-B chunk is excluded there (part A attends it).
    ``q_rows(lo, hi)``: the query rows of a band per query head, [B·H, hi − lo, c, d]."""

    def __init__(self, q_rows, qp, k, v, kc, vc, kbar, vbar, term_exact, term_sink, term_summary, kpos, exact_idx,
                 n_win, share, s, scale, tri, offsets, softcap=0.0):
        B, H0, nc, c, d = kc.shape  # (k as given, or repeated per head for a per-head mask)
        self.B, self.H0, self.share, self.nc, self.c, self.d, self.s = B, H0, share, nc, c, d, s
        nw = self.nw = n_win * c
        self.q_b, self.k, self.v, self.kc, self.vc = q_rows, k, v, kc, vc
        self.kbar, self.vbar, self.idx, self.n_win = kbar[:, :, 0], vbar[:, :, 0], exact_idx, n_win
        self.q_a = qp.view(B, H0, share, nc, c, d)  # (its rows for part A, per band: only the bands computed)
        parts = [term_exact[:, ::share, :, :nw]] + ([term_sink] if s > 0 else [])
        shape = torch.broadcast_shapes(*[t.shape[:3] for t in parts])
        self.term_a = torch.cat([t.expand(*shape, t.shape[-1]) for t in parts], dim=-1)
        self.aug_a = tri is not None and shape[0] * shape[1] > 1 and not softcap
        term_b = term_exact[..., nw:]
        if s > 0:
            term_b = torch.where(kpos[..., nw:] < s, NEG, term_b)
        shape = torch.broadcast_shapes(term_b.shape[:3], term_summary.shape[:3])
        self.term_b = torch.cat([term_b.expand(*shape, term_b.shape[-1]),
                                 term_summary.to(term_b.dtype).expand(*shape, term_summary.shape[-1])], dim=-1)
        self.tri, self.scale, self.offsets, self.softcap = tri, scale, offsets, softcap

    def band(self, lo: int, hi: int, ns: int):
        """Query chunks lo … hi − 1 with the first ``ns`` summaries → (out [B, H0, share, nb, c, d],
        log-sum-exp [B, H0, share, nb, c])."""
        B, H0, share, c, d, s, nw = self.B, self.H0, self.share, self.c, self.d, self.s, self.nw
        nb, dt, dev = hi - lo, self.kc.dtype, self.kc.device
        e = d + 1 if self.aug_a else d
        k_a = torch.empty(B, H0, nb, nw + s, e, dtype=dt, device=dev)
        v_a = torch.empty(B, H0, nb, nw + s, e, dtype=dt, device=dev)
        _window_into(k_a[..., :nw, :d], v_a[..., :nw, :d], self.kc, self.vc, self.offsets, lo, hi)
        if s > 0:
            k_a[..., nw:, :d] = self.k[:, :, :s].view(B, H0, 1, s, d)
            v_a[..., nw:, :d] = self.v[:, :, :s].view(B, H0, 1, s, d)
        q_a = self.q_a[:, :, :, lo:hi].transpose(2, 3).reshape(B * H0, nb, share * c, d)
        o_a, l_a = _attend(q_a, k_a, v_a, self.term_a[:, :, lo:hi], self.tri, None, self.scale, self.aug_a,
                           self.softcap)
        ke = self.term_b.shape[-1] - self.nc  # (the exact columns of part B: K·c and non-uniform chunks)
        k_b = torch.empty(B, H0 * share, nb, ke + ns, d, dtype=dt, device=dev)
        v_b = torch.empty(B, H0 * share, nb, ke + ns, d, dtype=dt, device=dev)
        _gather_chunks_into(k_b[..., :ke, :], self.kc, self.idx[:, :, lo:hi, self.n_win:])
        _gather_chunks_into(v_b[..., :ke, :], self.vc, self.idx[:, :, lo:hi, self.n_win:])
        k_b[..., ke:, :] = self.kbar[:, :, None, :ns]
        v_b[..., ke:, :] = self.vbar[:, :, None, :ns]
        o_b, l_b = _attend(self.q_b(lo, hi), k_b, v_b, self.term_b[:, :, lo:hi, :ke + ns], None, None, self.scale,
                           False, self.softcap)
        o_a = o_a.view(B, H0, nb, share, c, d).transpose(2, 3)
        l_a = l_a.view(B, H0, nb, share, c).transpose(2, 3)
        o_b, l_b = o_b.view(B, H0, share, nb, c, d), l_b.view(B, H0, share, nb, c)
        return _merge_by_lse(o_a, l_a, o_b, l_b)


def exact_block_fraction(attn_mask: torch.Tensor | None, B: int, Hq: int, n: int, *, chunk_size: int,
                         causal: bool = False, local_chunks: int = 1, sinks: int = 0) -> float:
    """Of the (query chunk, key chunk) blocks outside the window that hold keys, the fraction the
    op attends exactly because the mask's allowed keys or its bias vary inside the block (0 for no
    mask, key padding, or a mask that is the causal triangle ∧ key padding by its values; 1 for an
    ALiBi bias, linear in the key position). The cost model counts those blocks as c exact keys
    instead of one summary (``calibration.cost``)."""
    from .masks import simplify_mask

    attn_mask, causal = simplify_mask(attn_mask, B, Hq, n, causal)
    mask = normalize_mask(attn_mask, B, Hq, n)
    if mask is None or (not mask.per_query and mask.bias is None):
        return 0.0  # key padding at most: every block is uniform
    c = min(chunk_size, n)
    cdt = torch.float32 if mask.bias is None else _compute_dtype(mask.bias.dtype)
    mb = _MaskBlocks(mask, n, c, min(sinks, n), cdt, attn_mask.device)
    if mb.uniform is None:
        return 0.0
    outside = _outside_window(mb.nc, min(local_chunks, mb.nc), causal, attn_mask.device)
    summarised = outside & mb.w.any(-1)  # the blocks the op would summarise, were they uniform
    summarised, uniform = torch.broadcast_tensors(summarised, mb.uniform)
    total = int(summarised.sum())
    return 0.0 if total == 0 else int((summarised & ~uniform).sum()) / total


def mta_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    chunk_size: int,
    causal: bool = False,
    scale: float | None = None,
    local_chunks: int = 1,
    sinks: int = 0,
    top_k: int = 0,
    summary_weight: torch.Tensor | None = None,
    rows_from: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """MTA attention (MTA_SPEC.md), differentiable in q, k, v and ``summary_weight`` [Hkv, d]
    (learned summaries: chunk j's keys weighted by softmax_s(k_s·w) instead of 1/n_j). See the
    module docstring. ``rows_from``: the caller reads the output's rows from this query on only;
    the query chunks wholly before it are not computed (their rows are zeros). ``softcap`` > 0:
    every logit's product term soft-capped, softcap·tanh(scale·q·k / softcap), before its additive
    terms (docs/op.md); it runs outside the fused kernel, one key set per band."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    q_in = q
    cdt = _compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    dev = q.device
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    c = min(chunk_size, n)
    nc = -(-n // c)
    npad = nc * c
    L = min(local_chunks, nc)
    s = min(sinks, n)
    K = min(top_k, nc)
    first = min(max(rows_from, 0) // c, nc)  # the first query chunk computed (rows_from)

    mask: NormalizedMask | None = normalize_mask(attn_mask, B, Hq, n)
    G = Hq // Hkv
    share = 1  # query heads per key/value head of k and v as given, when each has its own key set
    if G > 1 and mask is not None and mask.per_head:
        # The mask (so the summaries) differs between the query heads of a group: give every
        # query head its own key set, at the cost of G copies of k and v.
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
        if summary_weight is not None:
            summary_weight = summary_weight.repeat_interleave(G, dim=0)
        Hkv, G = Hq, 1
    elif G > 1 and K > 0:
        # Selection differs between the query heads of a group: every query head gets its own key
        # set, read from its key/value head (broadcast, gathered by head // share): k and v are
        # not copied, the summaries are computed per key/value head and repeated.
        share, Hkv, G = G, Hq, 1
    T = G * c

    ar_c = torch.arange(c, device=dev)
    ii = torch.arange(nc, device=dev).view(nc, 1)
    pos = torch.arange(npad, device=dev)
    key_real = pos < n

    qp = _pad_tokens(q, npad, 2)  # (a view when n is a multiple of c)
    kc = _pad_tokens(k, npad, 2).view(B, Hkv // share, nc, c, d)
    vc = _pad_tokens(v, npad, 2).view(B, Hkv // share, nc, c, d)
    if K > 0:
        # top-k gathers chunks by id from kc and vc flattened to [B·H·nc, c, d] (_gather_chunks_into),
        # which copies a strided k or v whole at every gather (per band, each of k and v): a model's
        # [B, n, H, d] projections viewed as [B, H, n, d] (transformers' v; diffusers' q, k and v)
        # made a non-causal call at 16K tokens 6.8× slower. One copy here instead (none if contiguous).
        kc, vc = kc.contiguous(), vc.contiguous()

    # ---- the mask in chunk blocks ------------------------------------------------------------
    mb = _MaskBlocks(mask, n, c, s, cdt, dev)
    allowed, bias, Iq, blocks = mb.allowed, mb.bias, mb.Iq, mb.blocks
    w, uniform, summary_bias = mb.w, mb.uniform, mb.summary_bias

    # ---- chunk summaries: masked means (or learned weighted means), [B, Hkv, Iq, nc, d] -----
    n_j = w.to(cdt).sum(-1)  # [Bm|1, Hm|1, Iq, nc]: shared by heads unless the mask is not
    if summary_weight is None:
        inv = (1.0 / n_j.clamp(min=1.0)).unsqueeze(-1)
        kbar, vbar = _chunk_sums(kc, w, cdt) * inv, _chunk_sums(vc, w, cdt) * inv  # [B, Hkv, Iq, nc, d]
    else:
        kbar, vbar = _learned_summaries(kc, vc, w, summary_weight.to(cdt))
    if share > 1:  # (the mask is the same for every head here: the summaries are the key/value head's)
        kbar, vbar = kbar.repeat_interleave(share, dim=1), vbar.repeat_interleave(share, dim=1)

    # ---- which chunks each query chunk summarises --------------------------------------------
    not_window = _outside_window(nc, L, causal, dev)  # [nc, nc]
    summarised = not_window & (n_j > 0)  # [Bm|1, Hm|1, nc, nc]
    nonuniform_list = None
    if uniform is not None:
        summarised = summarised & uniform
        nonuni = not_window & ~uniform  # [Bm, Hm, nc|1, nc]
        nonuni = nonuni.expand(-1, -1, nc, -1)
        kx = int(nonuni.sum(-1).max())
        if kx > 0:
            nonuniform_list = _top_index_lists(nonuni, kx)

    select_list = None
    if K > 0:
        # top_k: per query chunk, the summarised chunks with the largest scale·q̄_i·k̄_j move
        # into the exact set; stable sort breaks ties towards the lower chunk index.
        # (K > 0 implies G = 1 here.) q̄_i: mean over the real queries of chunk i, times scale.
        # (zeros for the query chunks before rows_from, which are not computed)
        counts = key_real.view(nc, c).sum(-1).to(cdt).view(nc, 1)
        qbar = qp.new_zeros(B, Hkv, nc, d)
        qbar[:, :, first:] = qp.view(B, Hkv, nc, c, d)[:, :, first:].sum(3) * (scale / counts[first:])
        if Iq == 1:
            score = torch.einsum("bhid,bhjd->bhij", qbar, kbar[:, :, 0])
        else:
            score = torch.einsum("bhid,bhijd->bhij", qbar, kbar)
        summarised = summarised.expand(B, Hkv, nc, nc)
        score = score.masked_fill(~summarised, float("-inf"))
        top = torch.sort(score, dim=-1, descending=True, stable=True)
        chosen = top.values[..., :K] > float("-inf")
        select_list = torch.where(chosen, top.indices[..., :K], torch.full_like(top.indices[..., :K], -1))
        picked = torch.zeros_like(summarised).scatter_(-1, top.indices[..., :K], chosen)
        summarised = summarised & ~picked

    # ---- the exact chunk list per query chunk: window, selected, non-uniform ----------------
    offsets = torch.tensor(_window_offsets(L, causal), device=dev)
    win = ii + offsets.view(1, -1)
    win = torch.where((win >= 0) & (win < nc), win, torch.full_like(win, -1)).view(1, 1, nc, -1)
    parts = [win] + [x for x in (select_list, nonuniform_list) if x is not None]
    shape = torch.broadcast_shapes(*[p.shape[:3] for p in parts])
    exact = torch.cat([p.expand(*shape, p.shape[-1]) for p in parts], dim=-1)  # [Bl, Hl, nc, Ke]
    exact_idx = exact.clamp(min=0)
    kpos = (exact_idx.unsqueeze(-1) * c + ar_c).flatten(-2)  # [Bl, Hl, nc, Ke·c]
    kvalid = (exact >= 0).repeat_interleave(c, dim=-1) & (kpos < n)

    # per-chunk additive terms: [exact keys | sinks | summaries] (see "where the terms go")
    term_exact = torch.where(kvalid, 0.0, NEG).to(cdt)
    if allowed is not None and not mask.per_query:
        key_ok = allowed[:, :, 0]  # [Bm, Hm, npad]
        bm, hm = key_ok.shape[:2]
        flat = kpos.expand(max(bm, kpos.shape[0]), max(hm, kpos.shape[1]), nc, -1)
        ok = torch.gather(key_ok.expand(flat.shape[0], flat.shape[1], -1), -1, flat.flatten(2)).view(flat.shape)
        term_exact = torch.where(ok, term_exact, NEG)
        if bias is not None:
            kb = torch.gather(bias[:, :, 0].expand(flat.shape[0], flat.shape[1], -1), -1, flat.flatten(2))
            term_exact = term_exact + torch.where(ok, kb.view(flat.shape), 0.0)

    def sink_terms(attended: torch.Tensor) -> torch.Tensor:
        """[.., nc, s]: the sinks' terms for query chunks that attend the chunks ``attended``
        [.., nc, Ka] exactly (a sink in one of them is excluded from the sink columns)."""
        sink_chunk = torch.arange(s, device=dev) // c
        dup = (attended.unsqueeze(-1) == sink_chunk).any(-2)  # [.., nc, s]: already exact
        terms = torch.where(dup, NEG, 0.0).to(cdt)
        if causal:  # a sink in a later chunk than the query chunk is in the future
            terms = torch.where(sink_chunk.view(1, 1, 1, s) > ii.view(1, 1, nc, 1), NEG, terms)
        if allowed is not None and not mask.per_query:
            ok = allowed[:, :, 0, :s].unsqueeze(2)
            terms = torch.where(ok, terms, NEG)
            if bias is not None:
                terms = terms + torch.where(ok, bias[:, :, 0, :s].unsqueeze(2), 0.0)
        return terms

    term_sink = sink_terms(exact) if s > 0 else None

    log_n = torch.log(n_j.clamp(min=1.0))
    if summary_bias is not None:
        log_n = log_n + summary_bias
    term_summary = torch.where(summarised, log_n, NEG)

    # ---- where the per-chunk terms go ------------------------------------------------------
    # Normally into the additive mask, as a row that every query of a chunk shares (stride 0 in
    # the kernel: nothing n×X is built). With causality the diagonal triangle makes the mask
    # per row; if the terms also differ per head (top-k, per-batch key padding) that mask would
    # be B·H·n·X floats. Then the terms ride in one extra head dimension instead:
    # q' = [q, 1/scale], k' = [k, term] gives scale·q'·k' = scale·q·k + term, and the mask is
    # only the triangle, [T, X], shared by all.
    term_parts = [term_exact] + ([term_sink] if s > 0 else []) + [term_summary]
    tshape = torch.broadcast_shapes(*[t.shape[:3] for t in term_parts])
    per_query_user = allowed is not None and mask.per_query
    aug = causal and tshape[0] * tshape[1] > 1 and not per_query_user and scale != 0.0 and not softcap
    e = d + 1 if aug else d
    Ke_c = kpos.shape[-1]
    X = Ke_c + s + nc
    n_win = win.shape[-1]

    # ---- per-query mask terms, shared by every band: the causal triangle of the diagonal chunk
    # (the last window entry, offset 0, at columns (L-1)·c .. L·c) and a per-query user mask ---
    def triangle(rows: int, width: int) -> torch.Tensor:
        """[rows·c, width] bool: the future keys of the diagonal chunk for ``rows`` query heads' rows."""
        t = torch.zeros(rows * c, width, dtype=torch.bool, device=dev)
        t[:, (L - 1) * c:L * c] = ar_c.view(1, c) > ar_c.repeat(rows).view(-1, 1)
        return t

    user = None
    if per_query_user:
        ab = blocks(allowed)  # [Bm, Hm, nc, c, nc, c]
        bm, hm = ab.shape[:2]
        bi = torch.arange(bm, device=dev).view(bm, 1, 1, 1)
        hi = torch.arange(hm, device=dev).view(1, hm, 1, 1)
        ci = torch.arange(nc, device=dev).view(1, 1, nc, 1)
        abt = ab.permute(0, 1, 2, 4, 3, 5)  # [Bm, Hm, nc_i, nc_j, cq, ck]
        ex_ok = abt[bi, hi, ci, exact_idx].permute(0, 1, 2, 4, 3, 5).flatten(-2)  # [.., nc, cq, Ke·c]
        cols_ok = [ex_ok]
        if s > 0:
            cols_ok.append(allowed[:, :, :, :s].view(bm, hm, nc, c, s).expand(*ex_ok.shape[:4], s))
        ok = torch.cat(cols_ok, dim=-1)  # [Bx, Hx, nc, c, Ke·c + s]
        user = torch.where(ok, 0.0, NEG).to(cdt)
        if bias is not None:
            bbt = blocks(bias).permute(0, 1, 2, 4, 3, 5)
            ex_b = bbt[bi, hi, ci, exact_idx].permute(0, 1, 2, 4, 3, 5).flatten(-2)
            cols_b = [ex_b]
            if s > 0:
                cols_b.append(bias[:, :, :, :s].view(bm, hm, nc, c, s).expand(*ex_b.shape[:4], s))
            user = user + torch.where(ok, torch.cat(cols_b, dim=-1), 0.0)
        user = F.pad(user, (0, X - user.shape[-1]))  # summaries: uniform blocks, no per-query term
        user = user.unsqueeze(3).expand(-1, -1, -1, G, -1, -1).reshape(user.shape[0], user.shape[1], nc, T, X)

    # ---- queries, band by band: [B·Hkv, nb, T, d] ----------------------------------------------
    q_by_chunk = qp.view(B, Hkv, G, nc, c, d)

    def q_rows(lo: int, hi: int) -> torch.Tensor:
        """The rows of query chunks lo … hi − 1, [B·Hkv, hi − lo, T, d]: a view where the layout
        allows (no head group, heads and batch mergeable), else one band's copy, which stays in
        cache on its way to the kernel (a copy of all of q would not)."""
        return q_by_chunk[:, :, :, lo:hi].transpose(2, 3).reshape(B * Hkv, hi - lo, T, d)

    # ---- top-k: two key sets merged by their log-sum-exps ---------------------------------------
    # With top-k every query head has its own selected chunks, so the key set above is built per
    # query head: the window and sinks copied to each of a group's query heads (GQA) and, when
    # causal, the terms in the extra head column (aug). Where no gradient is wanted (the op's
    # forward: the kernel's log-sum-exp has none) the two parts run apart instead: the window and
    # sinks once per key/value head of k, the rows of its query heads together, with the triangle
    # (terms that differ per batch, or per head of a per-head mask, in the extra column); the
    # selected (and non-uniform) chunks and the summaries per query head, all outside the window,
    # so no triangle: one term row per chunk.
    # Their softmaxes merge exactly by their log-sum-exps: out = oA·σ(lA − lB) + oB·σ(lB − lA).
    split = None
    grad = _wants_grad(q, k, v, summary_weight)
    if K > 0 and not per_query_user and scale != 0.0 and (share > 1 or aug) and not grad:
        split = _TopKSplit(q_rows, qp, k, v, kc, vc, kbar, vbar, term_exact, sink_terms(win) if s > 0 else None,
                           term_summary, kpos, exact_idx, n_win, share, s, scale,
                           triangle(share, n_win * c + s) if causal else None, _window_offsets(L, causal), softcap)
    else:  # the one key set's terms and triangle (the two key sets build their own)
        term = torch.cat([t.to(cdt).expand(*tshape, t.shape[-1]) for t in term_parts], dim=-1)
        tri = triangle(G, X) if causal else None

    # ---- fused attention, band by band ---------------------------------------------------------
    # A band is a run of query chunks whose key sets [B, Hkv, nb, X', e] are built, used and
    # freed before the next band's: each band's buffers stay under _BAND_BYTES, so the allocator
    # reuses the same memory band after band (and call after call) instead of mapping fresh
    # pages for a whole-sequence key set (glibc maps anything over 32 MiB anew each time; the
    # page faults were a third of the op's time). Causal bands also bound the summary columns:
    # query chunk i summarises only chunks j < i − L + 1, so a band [lo, hi) needs the first
    # hi − L of them, which cuts the summary work towards half.
    # (with a soft-cap a band's scores and probabilities, T per row each, are materialised too)
    row_bytes = B * Hkv * X * (e + (2 * T if softcap else 0)) * cdt.itemsize
    bands = _bands(nc, causal, row_bytes, dev, first)
    # The output: in q's layout when it has no pad rows, so that the bands write the caller's
    # layout (a model's transposed [B, n, H, d]) directly and no copy into it is left for the end
    # (one of the whole output, a sixth of the op at 16K tokens); out is its [B, Hkv, G, nc, c, d] view.
    if npad == n and q_in.dtype == cdt:
        out_flat = torch.empty_like(q_in)
    else:
        out_flat = torch.empty(B, Hkv * G, npad, d, dtype=cdt, device=dev)
    out = out_flat.view(B, Hkv, G, nc, c, d)
    lse = torch.empty(B * Hkv, nc, T, dtype=cdt, device=dev) if mask is not None else None
    if first:
        out[:, :, :, :first] = 0.0
        if lse is not None:
            lse[:, :first] = 0.0
    for lo_c, hi_c in bands:
        nb = hi_c - lo_c
        ns = max(0, hi_c - L) if causal else nc
        if split is not None:
            o, l = split.band(lo_c, hi_c, ns)
            out_flat.view(B, Hkv // share, share, nc, c, d)[:, :, :, lo_c:hi_c] = o
            if lse is not None:
                lse.view(B, Hkv // share, share, nc, c)[:, :, :, lo_c:hi_c] = l
            continue
        width = Ke_c + s + ns
        # key/value sets [B, Hkv, nb, width, e], written in place (one pass per part; torch.cat
        # of the parts would add another)
        k_set = torch.empty(B, Hkv, nb, width, e, dtype=cdt, device=dev)
        v_set = torch.empty(B, Hkv, nb, width, e, dtype=cdt, device=dev)
        _window_into(k_set[:, :, :, :n_win * c, :d].unflatten(1, (Hkv // share, share)),
                     v_set[:, :, :, :n_win * c, :d].unflatten(1, (Hkv // share, share)), kc.unsqueeze(2),
                     vc.unsqueeze(2), _window_offsets(L, causal), lo_c, hi_c)
        # selected and non-uniform chunks: gathered by chunk id
        if exact.shape[-1] > n_win:
            _gather_chunks_into(k_set[:, :, :, n_win * c:Ke_c, :d], kc, exact_idx[:, :, lo_c:hi_c, n_win:])
            _gather_chunks_into(v_set[:, :, :, n_win * c:Ke_c, :d], vc, exact_idx[:, :, lo_c:hi_c, n_win:])
        if s > 0:
            k_set[:, :, :, Ke_c:Ke_c + s, :d].unflatten(1, (Hkv // share, share))[:] = k[:, :, :s].view(
                B, Hkv // share, 1, 1, s, d)
            v_set[:, :, :, Ke_c:Ke_c + s, :d].unflatten(1, (Hkv // share, share))[:] = v[:, :, :s].view(
                B, Hkv // share, 1, 1, s, d)
        k_set[:, :, :, Ke_c + s:, :d] = kbar[:, :, lo_c:hi_c, :ns] if Iq > 1 else kbar[:, :, :, :ns]
        v_set[:, :, :, Ke_c + s:, :d] = vbar[:, :, lo_c:hi_c, :ns] if Iq > 1 else vbar[:, :, :, :ns]
        o, l = _attend(q_rows(lo_c, hi_c), k_set, v_set, term[:, :, lo_c:hi_c, :width],
                       None if tri is None else tri[:, :width],
                       None if user is None else user[:, :, lo_c:hi_c, :, :width], scale, aug, softcap)
        out[:, :, :, lo_c:hi_c] = o.view(B, Hkv, nb, G, c, d).transpose(2, 3)
        if lse is not None:
            lse[:, lo_c:hi_c] = l
    if mask is not None:
        # a query with nothing to attend to outputs zeros (the kernel would average the NEG
        # columns). Without a mask every query attends at least to itself.
        empty = (lse <= EMPTY_ROW_LSE).view(B, Hkv, nc, G, c).transpose(2, 3).reshape(B, Hkv * G, npad, 1)
        out_flat.masked_fill_(empty, 0.0)
    return in_layout_of(q_in, out_flat if npad == n else out_flat[:, :, :n])
