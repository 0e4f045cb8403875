"""Triton backward of MTA: kernels → launcher, used by the op's autograd on CUDA.

For a query row t with logits s_tx over its set X(t) (exact keys, and summaries with bias
log n_j), P = softmax(s) and O = P·V (natural logarithms here; the kernels work in base 2 as the
forward does):

    D_t = Σ_e dO_te·O_te        dS_tx = P_tx·(dO_t·v_x − D_t)
    dq_t = scale·Σ_x dS_tx·k_x   dk_x = scale·Σ_t dS_tx·q_t   dv_x = Σ_t P_tx·dO_t

and a summary x = j, k̄_j = Σ_s w_s·k_s / n_j, passes its gradient on to the keys it pools:
dk_s += w_s·dk̄_j / n_j (v likewise); a learned summary, k̄_j = Σ_s a_s·k_s with
a_s = softmax_s(k_s·w), through its weights too (:func:`_spread_learned`, which also gives dw).
The top-k selection is piecewise constant: no gradient.

1. The forward's pre-pass (``_chunk_means``) pools k̄, v̄ and log2 n_j again, and with top-k the
   forward's selection (``_selection``) picks the same chunks.
2. ``_mta_bwd_rows_kernel``, one program per block of query rows (the forward's grid): pass 1
   recomputes the rows' log-sum-exp and O (for D), pass 2 accumulates dq. Gradients that many
   blocks share go to fp32 buffers by atomics: each summary tile's dk̄ = scale·dSᵀ·q and
   dv̄ = Pᵀ·dO, and the same for the keys of the selected chunks. Writes dq, the log-sum-exp, D.
   (Or, ``summary_atomics=False``: ``_mta_bwd_summaries_kernel``, one program per block of
   summaries over the rows that read them, computes dk̄ and dv̄ without atomics.)
3. ``_mta_bwd_keys_kernel``, one program per block of keys of one chunk and key/value head: for
   each query head of the group, the query rows that attend those keys exactly through their
   window or as sinks (all rows when the block holds sinks) → dk, dv in registers, written once.
4. torch adds the selected keys' gradients and spreads dk̄ / n_j, dv̄ / n_j over the counted keys
   of each chunk (learned summaries: through their weights, and dw; clustered ones: below).

Masks: none or key padding, as in the forward. Boundary chunks (``chunk_starts``, VARLEN) are read
where they lie, as the forward reads them: chunk i is the tokens starts[i] … starts[i+1]−1, and
the kernels that loop over the rows attending a block of keys or summaries read each row's chunk
from a [B, n] index instead of dividing by c. Clustered summaries (``centroids``, CLUSTERED,
non-causal, no top-k): the pre-pass is ``clusters.cluster_summaries``, query chunk i's rows read
its own summaries i·K … i·K+K−1 (the rows kernel; the summaries kernel: one program per tile of
one chunk's summaries over that chunk's rows); the keys kernel is unchanged (the exact keys are
the fixed chunks' window and sinks); torch spreads dk̄_im / n_im to each pooled key of chunk j in
cluster m, summed over the query chunks i whose window leaves j out (``ops.clustered.outside_window``).

Offsets are 32-bit: tensors of 2^31 elements or more are refused (the op's autograd then takes the
portable recompute). Memory: O(B·H·n) for the log-sum-exp and D, fp32 dk, dv buffers (twice with
top-k); clustered summaries O(B·Hkv·nc·K·d) as in their forward; nothing n × n.
"""

from __future__ import annotations


import torch

from ..ops.clustered import outside_window
from ..ops.layout import dense_order, in_layout_of
from .mta_fwd import LaunchConfig, _cdiv, _chunk_means, _pow2, _selection, _wide, boundary_starts, geometry

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional (gpu/test) dependency
    triton = None

LOG2E = 1.4426950408889634


if triton is not None:
    from .mta_fwd import _chunk_bounds, _query_block, _sinks_left  # jit functions: defined only with triton

    @triton.jit
    def _bwd_rows_tile(acc, m_i, l_i, q, do, lse, delta, x_base, y_base, bias_row, keyok_row, sel, idx, ok, rows,
                       dims, dim_ok, stride_xn, qk_scale, scale, dx_base, dy_base,
                       PASS: tl.constexpr, SUMMARY: tl.constexpr, ACCUM: tl.constexpr, CAUSAL_TILE: tl.constexpr,
                       HAS_KEYMASK: tl.constexpr, HAS_TOPK: tl.constexpr, PRECISION: tl.constexpr):
        """One tile of keys (or of summaries, SUMMARY) for the block's rows. PASS 0: online
        max / sum / O (acc). PASS 1: dq += dS·k into acc; with ACCUM also the tile's own gradients
        scale·dSᵀ·q and Pᵀ·dO, added by atomics at dx_base, dy_base (summaries: dk̄, dv̄; the
        keys of a selected chunk: dk, dv)."""
        xt = tl.load(x_base + idx[None, :] * stride_xn + dims[:, None], mask=ok[None, :] & dim_ok[:, None], other=0.0)
        yt = tl.load(y_base + idx[:, None] * stride_xn + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(q, xt, input_precision=PRECISION, out_dtype=tl.float32) * qk_scale
        allowed = ok
        if SUMMARY:
            s = s + tl.load(bias_row + idx, mask=ok, other=float("-inf"))[None, :]
            if HAS_TOPK:  # a selected chunk is attended exactly, not through its summary
                allowed = allowed & (tl.sum((idx[:, None] == sel[None, :]).to(tl.int32), 1) == 0)
        elif HAS_KEYMASK:
            allowed = allowed & (tl.load(keyok_row + idx, mask=ok, other=0) != 0)
        allowed2 = allowed[None, :]
        if CAUSAL_TILE:
            allowed2 = allowed2 & (idx[None, :] <= rows[:, None])
        s = tl.where(allowed2, s, float("-inf"))
        if PASS == 0:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            acc = acc * alpha[:, None] + tl.dot(p.to(yt.dtype), yt, input_precision=PRECISION, out_dtype=tl.float32)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        else:
            p = tl.exp2(s - lse[:, None])  # lse = +inf for a row that attends nothing: p = 0
            dp = tl.dot(do, tl.trans(yt), input_precision=PRECISION, out_dtype=tl.float32)
            ds = p * (dp - delta[:, None])
            acc += tl.dot(ds.to(xt.dtype), tl.trans(xt), input_precision=PRECISION, out_dtype=tl.float32)
            if ACCUM:
                dxb = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION, out_dtype=tl.float32) * scale
                dyb = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION, out_dtype=tl.float32)
                where = idx[:, None] * stride_xn + dims[None, :]
                tl.atomic_add(dx_base + where, dxb, mask=ok[:, None] & dim_ok[None, :])
                tl.atomic_add(dy_base + where, dyb, mask=ok[:, None] & dim_ok[None, :])
        return acc, m_i, l_i

    @triton.jit
    def _bwd_rows_pass(acc, m_i, l_i, q, do, lse, delta, k_base, v_base, sk_base, sv_base, logn_row, keyok_row,
                       dkbar_base, dvbar_base, dks_base, dvs_base, sel, sel_row, top_k, rows, dims, dim_ok, n, nc, c,
                       sinks, row0, w_lo, w_hi, stride_kn, stride_sj, qk_scale, scale, starts_row, i, clusters,
                       PASS: tl.constexpr, CAUSAL: tl.constexpr, HAS_KEYMASK: tl.constexpr, HAS_TOPK: tl.constexpr,
                       SUMMARY_ATOMICS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, VARLEN: tl.constexpr, CLUSTERED: tl.constexpr):
        """Every tile of the block's key set, as the forward visits it: sinks outside the window and
        the selected chunks, the window (causal: cut at the block's last row), the selected chunks
        (their keys' gradients by atomics), the summaries of the other chunks outside the window
        (CLUSTERED: query chunk i's own ``clusters`` summaries, rows i·K …)."""
        for s0 in range(0, sinks, BLOCK_N):
            keys = s0 + tl.arange(0, BLOCK_N)
            ok = _sinks_left(keys, sinks, n, c, w_lo, w_hi, sel, HAS_TOPK)
            acc, m_i, l_i = _bwd_rows_tile(acc, m_i, l_i, q, do, lse, delta, k_base, v_base, logn_row, keyok_row, sel,
                                           keys, ok, rows, dims, dim_ok, stride_kn, qk_scale, scale, dks_base,
                                           dvs_base, PASS, False, False, CAUSAL, HAS_KEYMASK, HAS_TOPK, PRECISION)
        if VARLEN:  # from the start of chunk w_lo to the end of chunk w_hi
            lo = tl.load(starts_row + w_lo)
            hi = tl.load(starts_row + w_hi + 1)
        else:
            lo = w_lo * c
            hi = tl.minimum((w_hi + 1) * c, n)
        if CAUSAL:
            hi = tl.minimum(hi, row0 + BLOCK_M)
        for start in range(lo, hi, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            acc, m_i, l_i = _bwd_rows_tile(acc, m_i, l_i, q, do, lse, delta, k_base, v_base, logn_row, keyok_row, sel,
                                           keys, keys < hi, rows, dims, dim_ok, stride_kn, qk_scale, scale, dks_base,
                                           dvs_base, PASS, False, False, CAUSAL, HAS_KEYMASK, HAS_TOPK, PRECISION)
        for e in range(0, top_k):  # selected chunks: always before the window under causality
            j = tl.load(sel_row + e)
            if j >= 0:
                if VARLEN:
                    sel_start, sel_end = _chunk_bounds(starts_row, j, c, n, VARLEN)
                else:  # (in this order: the fixed-chunk kernel's code as it was before VARLEN)
                    sel_end = tl.minimum(j * c + c, n)
                    sel_start = j * c
                for start in range(sel_start, sel_end, BLOCK_N):
                    keys = start + tl.arange(0, BLOCK_N)
                    acc, m_i, l_i = _bwd_rows_tile(acc, m_i, l_i, q, do, lse, delta, k_base, v_base, logn_row,
                                                   keyok_row, sel, keys, keys < sel_end, rows, dims, dim_ok, stride_kn,
                                                   qk_scale, scale, dks_base, dvs_base, PASS, False, True, False,
                                                   HAS_KEYMASK, HAS_TOPK, PRECISION)
        if CLUSTERED:  # every one of the chunk's own summaries lies outside its window
            for m0 in range(0, clusters, BLOCK_N):
                ms = m0 + tl.arange(0, BLOCK_N)
                acc, m_i, l_i = _bwd_rows_tile(acc, m_i, l_i, q, do, lse, delta, sk_base, sv_base, logn_row, keyok_row,
                                               sel, i * clusters + ms, ms < clusters, rows, dims, dim_ok, stride_sj,
                                               qk_scale, scale, dkbar_base, dvbar_base, PASS, True, SUMMARY_ATOMICS,
                                               False, HAS_KEYMASK, HAS_TOPK, PRECISION)
        else:
            if CAUSAL:
                j_end = w_lo
            else:
                j_end = nc
            for j0 in range(0, j_end, BLOCK_N):
                js = j0 + tl.arange(0, BLOCK_N)
                if CAUSAL:
                    ok = js < w_lo
                else:
                    ok = (js < nc) & ((js < w_lo) | (js > w_hi))
                acc, m_i, l_i = _bwd_rows_tile(acc, m_i, l_i, q, do, lse, delta, sk_base, sv_base, logn_row, keyok_row,
                                               sel, js, ok, rows, dims, dim_ok, stride_sj, qk_scale, scale, dkbar_base,
                                               dvbar_base, PASS, True, SUMMARY_ATOMICS, False, HAS_KEYMASK, HAS_TOPK,
                                               PRECISION)
        return acc, m_i, l_i

    @triton.jit
    def _mta_bwd_rows_kernel(
        q_ptr, k_ptr, v_ptr, kbar_ptr, vbar_ptr, logn_ptr, keyok_ptr, sel_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr,
        dkbar_ptr, dvbar_ptr, dks_ptr, dvs_ptr,
        stride_qb, stride_qh, stride_qn,  # q, do, dq [B, Hq, n, d]
        stride_kb, stride_kh, stride_kn,  # k, v, dks, dvs [B, Hkv, n, d]
        stride_sb, stride_sh, stride_sj,  # kbar, vbar, dkbar, dvbar [B, Hkv, nc, d]
        stride_lb, stride_lh,  # log2 n_j [B, Hkv, nc]
        stride_selb, stride_selh, stride_seli,  # selected chunks [B, Hq, nc, K]
        n, nc, c, L, sinks, top_k, Hq, Hkv, G, qk_scale, scale,
        starts_ptr, stride_csb,  # VARLEN: each sequence's chunk starts [B, nc + 1] (n past its last chunk)
        clusters,  # CLUSTERED: K, each query chunk's summaries rows i·K … of kbar, vbar, logn [B, Hkv, nc·K(, d)]
        CAUSAL: tl.constexpr, HAS_KEYMASK: tl.constexpr, HAS_TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
        PRECISION: tl.constexpr, HEAD_D: tl.constexpr, SUMMARY_ATOMICS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
        CLUSTERED: tl.constexpr,
    ):
        """dq for one block of query rows, its log-sum-exp (base 2) and D; by atomics, dk̄ and dv̄
        of the summaries and dk, dv of the selected chunks' keys (into dks, dvs). VARLEN: boundary
        chunks read where they lie, as the forward reads them. CLUSTERED: clustered summaries, as
        the forward's CLUSTERED path reads them."""
        blocks_per_chunk = tl.cdiv(c, BLOCK_M)
        b, h, hk, i, sub = _query_block(Hq, G, blocks_per_chunk, 0)  # the forward's grid and order
        # the rows as the forward's main kernel finds them (written out there too: as a shared jit
        # helper it reordered 80 instructions of the timed forward's default SASS)
        if VARLEN:
            starts_row = starts_ptr + b * stride_csb
            c_lo, c_hi = _chunk_bounds(starts_row, i, c, n, VARLEN)
            row0 = c_lo + sub * BLOCK_M
            if row0 >= c_hi:
                return  # a sub-block past the end of a short (or empty) chunk
            rows = row0 + tl.arange(0, BLOCK_M)
            row_ok = rows < c_hi
        else:
            starts_row = starts_ptr
            row0 = i * c + sub * BLOCK_M
            rows = row0 + tl.arange(0, BLOCK_M)
            row_ok = (sub * BLOCK_M + tl.arange(0, BLOCK_M) < c) & (rows < n)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_D
        q_off = b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        do = tl.load(do_ptr + q_off, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        k_base = k_ptr + b * stride_kb + hk * stride_kh
        v_base = v_ptr + b * stride_kb + hk * stride_kh
        s_off = b * stride_sb + hk * stride_sh
        logn_row = logn_ptr + b * stride_lb + hk * stride_lh
        keyok_row = keyok_ptr + b * n
        w_lo = tl.maximum(i - L + 1, 0)
        if CAUSAL:
            w_hi = i
        else:
            w_hi = tl.minimum(i + L - 1, nc - 1)
        zero_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
        sel_row = sel_ptr + b * stride_selb + h * stride_selh + i * stride_seli
        sel_offs = tl.arange(0, TOPK_PAD)
        sel = tl.load(sel_row + sel_offs, mask=sel_offs < top_k, other=-1)
        ks_off = b * stride_kb + hk * stride_kh

        # pass 1: log-sum-exp and O of the rows
        acc, m_i, l_i = _bwd_rows_pass(tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                                       tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), zero_rows, q, do,
                                       zero_rows, zero_rows, k_base, v_base, kbar_ptr + s_off, vbar_ptr + s_off,
                                       logn_row, keyok_row, dkbar_ptr + s_off, dvbar_ptr + s_off, dks_ptr + ks_off,
                                       dvs_ptr + ks_off, sel, sel_row, top_k, rows, dims, dim_ok, n, nc, c, sinks,
                                       row0, w_lo, w_hi, stride_kn, stride_sj, qk_scale, scale, starts_row, i,
                                       clusters, 0, CAUSAL, HAS_KEYMASK, HAS_TOPK, SUMMARY_ATOMICS, PRECISION, BLOCK_M,
                                       BLOCK_N, VARLEN, CLUSTERED)
        empty = l_i == 0
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        delta = tl.sum(do.to(tl.float32) * o, 1)
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))

        # pass 2: dq (and the summaries' gradients)
        dq, m_i, l_i = _bwd_rows_pass(tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), m_i, l_i, q, do, lse, delta,
                                      k_base, v_base, kbar_ptr + s_off, vbar_ptr + s_off, logn_row, keyok_row,
                                      dkbar_ptr + s_off, dvbar_ptr + s_off, dks_ptr + ks_off, dvs_ptr + ks_off, sel,
                                      sel_row, top_k, rows, dims, dim_ok, n, nc, c, sinks, row0, w_lo, w_hi,
                                      stride_kn, stride_sj, qk_scale, scale, starts_row, i, clusters, 1, CAUSAL,
                                      HAS_KEYMASK, HAS_TOPK, SUMMARY_ATOMICS, PRECISION, BLOCK_M, BLOCK_N, VARLEN,
                                      CLUSTERED)
        tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        r_off = (b * Hq + h) * n + rows
        tl.store(lse_ptr + r_off, lse, mask=row_ok)
        tl.store(delta_ptr + r_off, delta, mask=row_ok)

    @triton.jit
    def _load_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, rows, row_ok, dims, dim_ok, n, Hq,
                   stride_qb, stride_qh, stride_qn):
        """q, dO, the log-sum-exp (+inf past the rows: such a row weighs nothing) and D of rows."""
        q_off = b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        do = tl.load(do_ptr + q_off, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        r_off = (b * Hq + h) * n + rows
        lse = tl.load(lse_ptr + r_off, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + r_off, mask=row_ok, other=0.0)
        return q, do, lse, delta

    @triton.jit
    def _chunk_of(chunk_of_ptr, b, rows, row_ok, c, n, VARLEN: tl.constexpr):
        """The chunk of each row: rows // c, or with VARLEN read from the [B, n] chunk index."""
        if VARLEN:
            return tl.load(chunk_of_ptr + b * n + rows, mask=row_ok, other=0)
        else:
            return rows // c

    @triton.jit
    def _picked_by_rows(sel_ptr, b, h, i, row_ok, j, top_k, stride_selb, stride_selh, stride_seli,
                        TOPK_PAD: tl.constexpr):
        """[len(j), len(i)]: whether the chunk i of each row selected chunk j (a vector; one element
        for a single chunk): its tokens are then attended exactly, not through a summary or as sinks."""
        tk = tl.arange(0, TOPK_PAD)
        picked = tl.load(sel_ptr + b * stride_selb + h * stride_selh + i[:, None] * stride_seli + tk[None, :],
                         mask=row_ok[:, None] & (tk < top_k)[None, :], other=-1)  # [BM, K]
        return tl.sum((picked[None, :, :] == j[:, None, None]).to(tl.int32), 2) > 0

    @triton.jit
    def _kv_grads(dx, dy, x, y, bias, q, do, lse, delta, used, qk_scale, PRECISION: tl.constexpr):
        """One block of rows' contribution to the gradients of keys x (logit bias ``bias``) and
        values y: dy += Pᵀ·dO, dx += dSᵀ·q (scale applied by the caller); ``used``: [keys, rows]."""
        s = tl.dot(x, tl.trans(q), input_precision=PRECISION, out_dtype=tl.float32) * qk_scale + bias[:, None]
        p = tl.where(used, tl.exp2(s - lse[None, :]), 0.0)
        dy += tl.dot(p.to(do.dtype), do, input_precision=PRECISION, out_dtype=tl.float32)
        dp = tl.dot(y, tl.trans(do), input_precision=PRECISION, out_dtype=tl.float32)
        ds = p * (dp - delta[None, :])
        dx += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION, out_dtype=tl.float32)
        return dx, dy

    @triton.jit
    def _mta_bwd_keys_kernel(
        q_ptr, k_ptr, v_ptr, keyok_ptr, sel_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
        stride_qb, stride_qh, stride_qn,  # q, do [B, Hq, n, d]
        stride_kb, stride_kh, stride_kn,  # k, v, dk, dv [B, Hkv, n, d]
        stride_selb, stride_selh, stride_seli,  # selected chunks [B, Hq, nc, K]
        n, nc, c, L, sinks, top_k, Hq, Hkv, G, qk_scale, scale,
        starts_ptr, stride_csb, chunk_of_ptr,  # VARLEN: chunk starts [B, nc + 1], each token's chunk [B, n]
        CAUSAL: tl.constexpr, HAS_KEYMASK: tl.constexpr, HAS_TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
        PRECISION: tl.constexpr, HEAD_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
    ):
        """dk, dv of one block of keys of chunk j from every query row attending them exactly
        through its window or as sinks (a selected chunk's keys: the rows kernel, by atomics)."""
        blocks_per_chunk = tl.cdiv(c, BLOCK_N)
        pid = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        j = pid // blocks_per_chunk
        if VARLEN:
            starts_row = starts_ptr + b * stride_csb
            j_lo, j_hi = _chunk_bounds(starts_row, j, c, n, VARLEN)
            s0 = j_lo + (pid % blocks_per_chunk) * BLOCK_N
            if s0 >= j_hi:
                return  # past the end of a short (or empty) chunk: its tokens are another program's
            keys = s0 + tl.arange(0, BLOCK_N)
            in_chunk = keys < j_hi
        else:
            starts_row = starts_ptr
            s0 = j * c + (pid % blocks_per_chunk) * BLOCK_N
            keys = s0 + tl.arange(0, BLOCK_N)
            in_chunk = ((pid % blocks_per_chunk) * BLOCK_N + tl.arange(0, BLOCK_N) < c) & (keys < n)
        key_ok = in_chunk  # and not padded: a padded key gets no gradient (zeros are stored)
        if HAS_KEYMASK:
            key_ok = key_ok & (tl.load(keyok_ptr + b * n + keys, mask=in_chunk, other=0) != 0)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_D
        kv_off = b * stride_kb + hk * stride_kh + keys[:, None] * stride_kn + dims[None, :]
        kt = tl.load(k_ptr + kv_off, mask=in_chunk[:, None] & dim_ok[None, :], other=0.0)
        vt = tl.load(v_ptr + kv_off, mask=in_chunk[:, None] & dim_ok[None, :], other=0.0)
        # rows whose window holds chunk j; every row (after the keys, causal) when the block holds sinks
        if VARLEN:
            r_hi = tl.load(starts_row + tl.minimum(j + L, nc))
            if CAUSAL:
                r_lo = s0
            else:
                r_lo = tl.load(starts_row + tl.maximum(j - L + 1, 0))
        elif CAUSAL:
            r_lo = tl.maximum(j * c, s0)
            r_hi = tl.minimum((j + L) * c, n)
        else:
            r_lo = tl.maximum(j - L + 1, 0) * c
            r_hi = tl.minimum((j + L) * c, n)
        if s0 < sinks:
            if CAUSAL:
                r_lo = s0
            else:
                r_lo = s0 * 0
            r_hi = n + s0 * 0
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        no_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g in range(0, G):
            h = hk * G + g
            for r0 in range(r_lo, r_hi, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                row_ok = rows < r_hi
                q, do, lse, delta = _load_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, rows, row_ok, dims, dim_ok, n,
                                               Hq, stride_qb, stride_qh, stride_qn)
                i = _chunk_of(chunk_of_ptr, b, rows, row_ok, c, n, VARLEN)
                if CAUSAL:
                    exact = (j >= i - L + 1) & (keys[:, None] <= rows[None, :])
                else:
                    exact = (j - i <= L - 1) & (i - j <= L - 1)
                sink = keys[:, None] < sinks
                if HAS_TOPK:  # a sink in a chunk the row selected is attended as part of that chunk
                    one_j = j + tl.zeros([1], dtype=tl.int32)
                    sink = sink & ~_picked_by_rows(sel_ptr, b, h, i, row_ok, one_j, top_k, stride_selb, stride_selh,
                                                   stride_seli, TOPK_PAD)
                exact = exact | sink
                if CAUSAL:
                    exact = exact & (keys[:, None] <= rows[None, :])
                allowed = exact & key_ok[:, None] & row_ok[None, :]
                dk, dv = _kv_grads(dk, dv, kt, vt, no_bias, q, do, lse, delta, allowed, qk_scale, PRECISION)
        tl.store(dk_ptr + kv_off, dk * scale, mask=in_chunk[:, None] & dim_ok[None, :])
        tl.store(dv_ptr + kv_off, dv, mask=in_chunk[:, None] & dim_ok[None, :])


    @triton.jit
    def _mta_bwd_summaries_kernel(
        q_ptr, kbar_ptr, vbar_ptr, logn_ptr, sel_ptr, do_ptr, lse_ptr, delta_ptr, dkbar_ptr, dvbar_ptr,
        stride_qb, stride_qh, stride_qn,  # q, do [B, Hq, n, d]
        stride_sb, stride_sh, stride_sj,  # kbar, vbar, dkbar, dvbar [B, Hkv, nc, d]
        stride_lb, stride_lh,  # log2 n_j [B, Hkv, nc]
        stride_selb, stride_selh, stride_seli,  # selected chunks [B, Hq, nc, K]
        n, nc, c, L, top_k, Hq, Hkv, G, qk_scale, scale,
        starts_ptr, stride_csb, chunk_of_ptr,  # VARLEN: chunk starts [B, nc + 1], each token's chunk [B, n]
        clusters,  # CLUSTERED: K, each query chunk's summaries rows i·K … of kbar, vbar, logn [B, Hkv, nc·K(, d)]
        CAUSAL: tl.constexpr, HAS_TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, PRECISION: tl.constexpr,
        HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        VARLEN: tl.constexpr, CLUSTERED: tl.constexpr,
    ):
        """dk̄, dv̄ of one block of summaries from every query row that reads them (instead of the
        rows kernel's atomics): the rows after their chunks' windows (causal), or all rows outside
        them; a row whose chunk selected a chunk reads its keys instead of its summary. CLUSTERED:
        one tile of query chunk i's own summaries (grid nc·⌈K / BLOCK_N⌉), read by chunk i's rows."""
        pid_bh = tl.program_id(1)
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        if CLUSTERED:
            tiles = tl.cdiv(clusters, BLOCK_N)
            i = tl.program_id(0) // tiles
            ms = (tl.program_id(0) % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            js = i * clusters + ms
            j_ok = ms < clusters
        else:
            js = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            j_ok = js < nc
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_D
        s_off = b * stride_sb + hk * stride_sh + js[:, None] * stride_sj + dims[None, :]
        kb = tl.load(kbar_ptr + s_off, mask=j_ok[:, None] & dim_ok[None, :], other=0.0)
        vb = tl.load(vbar_ptr + s_off, mask=j_ok[:, None] & dim_ok[None, :], other=0.0)
        bias = tl.load(logn_ptr + b * stride_lb + hk * stride_lh + js, mask=j_ok, other=float("-inf"))
        r_hi = n
        if CLUSTERED:
            r_lo = i * c
            r_hi = tl.minimum(r_lo + c, n)
        elif CAUSAL and VARLEN:  # chunk j is summarised for the chunks i ≥ j + L
            r_lo = tl.load(starts_ptr + b * stride_csb + tl.minimum(tl.program_id(0) * BLOCK_N + L, nc))
        elif CAUSAL:
            r_lo = tl.minimum((tl.program_id(0) * BLOCK_N + L) * c, n)
        else:
            r_lo = n * 0
        dkb = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dvb = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, G):
            h = hk * G + g
            for r0 in range(r_lo, r_hi, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                row_ok = rows < r_hi
                q, do, lse, delta = _load_rows(q_ptr, do_ptr, lse_ptr, delta_ptr, b, h, rows, row_ok, dims, dim_ok, n,
                                               Hq, stride_qb, stride_qh, stride_qn)
                if CLUSTERED:  # the rows of chunk i read all its summaries
                    used = j_ok[:, None] & row_ok[None, :]
                else:
                    ri = _chunk_of(chunk_of_ptr, b, rows, row_ok, c, n, VARLEN)
                    if CAUSAL:
                        used = js[:, None] < ri[None, :] - L + 1
                    else:
                        used = (js[:, None] - ri[None, :] > L - 1) | (ri[None, :] - js[:, None] > L - 1)
                    if HAS_TOPK:
                        used = used & ~_picked_by_rows(sel_ptr, b, h, ri, row_ok, js, top_k, stride_selb, stride_selh,
                                                       stride_seli, TOPK_PAD)
                    used = used & j_ok[:, None] & row_ok[None, :]
                dkb, dvb = _kv_grads(dkb, dvb, kb, vb, bias, q, do, lse, delta, used, qk_scale, PRECISION)
        tl.store(dkbar_ptr + s_off, dkb * scale, mask=j_ok[:, None] & dim_ok[None, :])
        tl.store(dvbar_ptr + s_off, dvb, mask=j_ok[:, None] & dim_ok[None, :])


def _dense_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, d] in place if its layout is dense with the head dimension innermost (the
    gradients are allocated like it, and the kernels give both one set of strides), else a
    contiguous copy."""
    if x.stride(3) == 1 and dense_order(x.shape, x.stride()) is not None:
        return x
    return x.contiguous()


def _spread_learned(k, v, w, dkbar, dvbar, chunk_of, counted, dk, dv) -> torch.Tensor:
    """Learned summaries' gradients passed on to the keys and values they pool, added into dk, dv
    (fp32, [B, Hkv, n, d]); returns dw [Hkv, d] in w's dtype. Chunk j's summary is
    k̄_j = Σ_s a_s·k_s (v̄_j likewise) with a_s = softmax_s(l_s), l_s = k_s·w over its pooled
    tokens (``counted``; ``chunk_of`` [B, n]: each token's chunk). With g_s = dk̄_j·k_s + dv̄_j·v_s:

        dv_s += a_s·dv̄_j     dk_s += a_s·dk̄_j + r_s·w     dw = Σ_s r_s·k_s,
        r_s = ∂L/∂l_s = a_s·(g_s − Σ_t a_t·g_t)   (the sum over chunk j's tokens)

    in fp32 torch ops over [B, Hkv, n] and one [B, Hkv, n, d] gather per summary gradient (as the
    means' spreading); the weights a_s recomputed here as the pre-pass computes them."""
    B, H, n, d = k.shape
    kf, vf, wf = k.float(), v.float(), w.float()
    idx = chunk_of[:, None, :].expand(B, H, n)
    neg = torch.tensor(float("-inf"), device=k.device)
    logit = torch.where(counted[:, None, :], torch.einsum("bhnd,hd->bhn", kf, wf), neg)
    nc = dkbar.shape[2]
    top = torch.full((B, H, nc), float("-inf"), device=k.device).scatter_reduce(2, idx, logit, "amax")
    top = torch.where(top == neg, 0.0, top)  # an empty chunk: every weight below is 0
    e = torch.exp(logit - top.gather(2, idx))
    den = torch.zeros(B, H, nc, device=k.device).scatter_add_(2, idx, e)
    a = e / den.clamp(min=1.0).gather(2, idx)  # den ≥ 1 for a chunk with a pooled token (its largest term is 1)
    at = idx[..., None].expand(B, H, n, d)
    dkb, dvb = dkbar.gather(2, at), dvbar.gather(2, at)  # each token's chunk's summary gradients
    g = (dkb * kf).sum(-1) + (dvb * vf).sum(-1)
    g_mean = torch.zeros(B, H, nc, device=k.device).scatter_add_(2, idx, a * g)
    r = a * (g - g_mean.gather(2, idx))
    dk += a[..., None] * dkb + r[..., None] * wf[None, :, None, :]
    dv += a[..., None] * dvb
    return torch.einsum("bhn,bhnd->hd", r, kf).to(w.dtype)


def default_backward_launch(c: int, dtype: torch.dtype) -> LaunchConfig:
    """Tiles of the backward kernels: 64 query rows (at least 16, for tl.dot; a block of query
    rows never spans two chunks) against 32 keys, 4 warps, 2 stages. Not timed on a GPU yet; chosen
    offline (benchmarks/kernel_resources.py's method, triton 3.6, sm_90, d = 128): 64 × 64 tiles
    spill 336 bytes in the rows kernel and fit one block per SM; 64 × 32 spill 32 and fit two."""
    return LaunchConfig(max(16, min(64, _pow2(c))), 32, 4, 2)


def mta_backward_triton(q, k, v, keep, grad_out, *, chunk_size, causal=False, scale=None, local_chunks=1, sinks=0,
                        top_k=0, launch: LaunchConfig | None = None, summary_atomics: bool = True, chunk_starts=None,
                        centroids=None, summary_weight=None):
    """(dq, dk, dv) of MTA. ``keep``: None or [B, n] bool key-padding flags (see
    ``mta_fwd.key_padding``). Tensors on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
    ``summary_atomics``: the summaries' gradients come from the rows kernel by atomics (default),
    or, False, from ``_mta_bwd_summaries_kernel``, one program per block of summaries looping over
    the rows that read them (no atomics; a second pass over q). ``chunk_starts`` [B, M + 1]:
    boundary chunks read where they lie, as ``mta_forward_triton(chunk_starts=...)`` reads them
    (``ops.segments.chunk_bounds``). ``centroids`` [Hkv, K, d]: clustered summaries (non-causal, no
    top-k, fixed chunks), as ``mta_forward_triton(centroids=...)`` computes them.
    ``summary_weight`` [Hkv, d]: learned summaries (fixed or boundary chunks), pooled as the forward
    pools them; the result is then (dq, dk, dv, dw), dw in the weight's dtype (see
    :func:`_spread_learned`)."""
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton (or the 'gpu' extra)")
    if centroids is not None and (causal or top_k or chunk_starts is not None or summary_weight is not None):
        raise ValueError("clustered summaries (centroids) run non-causal, without top_k or summary_weight, on fixed "
                         "chunks")
    B, Hq, Hkv, G, n, d, scale, c, nc, L, s = geometry(q, k, chunk_size, scale, local_chunks, sinks)
    starts, nc, L = boundary_starts(chunk_starts, B, q.device, nc, L, local_chunks)
    if starts is not None:
        # each token's chunk: how many chunks end at or before it (an empty chunk ends where it starts)
        tokens = torch.arange(n, device=q.device, dtype=torch.int32).expand(B, n).contiguous()
        chunk_of = torch.searchsorted(starts[:, 1:].contiguous(), tokens, right=True).to(torch.int32)
    else:
        chunk_of = (torch.arange(n, device=q.device) // c).expand(B, n)
    # Read in place where the kernels can: q and k in any dense layout with the head dimension
    # innermost (a model's transposed [B, n, H, d] buffers); do and dq take q's strides, v, dk
    # and dv k's, so do and v are copied only if their layouts differ from those.
    q, k = _dense_rows(q), _dense_rows(k)
    v, do = in_layout_of(k, v), in_layout_of(q, grad_out)
    keyok = keep.to(torch.int8).contiguous() if keep is not None else None
    cfg = launch or default_backward_launch(c, q.dtype)
    clusters, sums = 0, None
    if centroids is not None:  # the forward's clustered pre-pass: rows i·K + m of each query chunk's summaries
        from .clusters import cluster_summaries

        clusters = centroids.shape[1]
        sums = cluster_summaries(k, v, keyok, centroids, c, nc, L, s)
        kbar, vbar, logn = sums.kbar, sums.vbar, sums.logn
    else:
        logn = torch.empty(B, Hkv, nc, dtype=torch.float32, device=q.device)
        kbar, vbar = _chunk_means(k, v, keyok, c, nc, s, 1.0, logn, summary_weight=summary_weight, starts=starts)
    if _wide(q, k, v, do, kbar):
        raise ValueError("the Triton backward takes tensors of fewer than 2^31 elements (32-bit offsets)")
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    lse = torch.empty(B, Hq, n, **f32)
    delta = torch.empty(B, Hq, n, **f32)
    dkbar = torch.zeros(kbar.shape, **f32)  # kbar's strides (contiguous)
    dvbar = torch.zeros(kbar.shape, **f32)
    dk = torch.empty_like(k, dtype=torch.float32)  # k's strides (dense)
    dv = torch.empty_like(k, dtype=torch.float32)
    sel, K = _selection(q, kbar, logn, c, nc, L, top_k, causal, scale, G, starts)
    # the selected chunks' keys get their gradients by atomics (zeros without top-k: never written)
    dks = torch.zeros_like(dk) if K else dkbar
    dvs = torch.zeros_like(dk) if K else dvbar
    common = dict(CAUSAL=bool(causal), HAS_TOPK=K > 0, TOPK_PAD=max(1, _pow2(K)),
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HEAD_D=d, BLOCK_M=cfg.block_m,
                  BLOCK_N=cfg.block_n, BLOCK_D=max(16, _pow2(d)), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    keyok_arg = keyok if keyok is not None else logn  # an unused pointer without a mask
    # without boundary chunks, unused pointers (and a zero stride)
    varlen = (starts, starts.stride(0), chunk_of) if starts is not None else (logn, 0, logn)
    common["VARLEN"] = starts is not None
    _mta_bwd_rows_kernel[(nc * _cdiv(c, cfg.block_m), B * Hq)](
        q, k, v, kbar, vbar, logn, keyok_arg, sel, do, dq, lse, delta, dkbar, dvbar, dks, dvs,
        *q.stride()[:3], *k.stride()[:3], *kbar.stride()[:3], *logn.stride()[:2], *sel.stride()[:3],
        n, nc, c, L, s, K, Hq, Hkv, G, scale * LOG2E, scale, *varlen[:2], clusters, HAS_KEYMASK=keep is not None,
        SUMMARY_ATOMICS=bool(summary_atomics), CLUSTERED=clusters > 0, **common)
    _mta_bwd_keys_kernel[(nc * _cdiv(c, cfg.block_n), B * Hkv)](
        q, k, v, keyok_arg, sel, do, lse, delta, dk, dv, *q.stride()[:3], *k.stride()[:3], *sel.stride()[:3],
        n, nc, c, L, s, K, Hq, Hkv, G, scale * LOG2E, scale, *varlen, HAS_KEYMASK=keep is not None, **common)
    if not summary_atomics:
        tiles = nc * _cdiv(clusters, cfg.block_n) if clusters else _cdiv(nc, cfg.block_n)
        _mta_bwd_summaries_kernel[(tiles, B * Hkv)](
            q, kbar, vbar, logn, sel, do, lse, delta, dkbar, dvbar, *q.stride()[:3], *kbar.stride()[:3],
            *logn.stride()[:2], *sel.stride()[:3], n, nc, c, L, K, Hq, Hkv, G, scale * LOG2E, scale, *varlen,
            clusters, CLUSTERED=clusters > 0, **common)
    if K:
        dk += dks
        dv += dvs
    # the summaries' gradients, spread over the keys each one pools (w_s / n_j)
    counted = torch.ones(B, n, dtype=torch.bool, device=q.device) if keep is None else keep.bool().clone()
    counted[:, :s] = False
    weight = counted[:, None, :, None]
    if summary_weight is not None:
        dw = _spread_learned(k, v, summary_weight, dkbar, dvbar, chunk_of.long(), counted, dk, dv)
        return dq, dk.to(k.dtype), dv.to(v.dtype), dw
    if sums is None:
        n_j = torch.exp2(logn).clamp(min=1.0)  # −inf (an empty chunk) → 0 → 1: its dk̄ is zero anyway
        per_key = chunk_of.long()[:, None, :, None].expand(B, Hkv, n, d)
        dk += torch.gather(dkbar / n_j[..., None], 2, per_key) * weight
        dv += torch.gather(dvbar / n_j[..., None], 2, per_key) * weight
    else:
        # summary (i, m) pools the keys of cluster m outside chunk i's window: a key of chunk j in
        # cluster m gets Σ over the query chunks i whose window leaves j out of dk̄_im / count_im
        inv = 1.0 / sums.count.clamp(min=1.0).unsqueeze(-1)  # an empty cluster's dk̄ is zero anyway
        per_key = (chunk_of.long()[:, None, :] * clusters + sums.ids.long())[..., None].expand(B, Hkv, n, d)
        for grad, summary_grad in ((dk, dkbar), (dv, dvbar)):
            spread = outside_window(summary_grad.view(B, Hkv, nc, clusters, d).mul_(inv), L)
            grad += torch.gather(spread.view(B, Hkv, nc * clusters, d), 2, per_key) * weight
    return dq, dk.to(k.dtype), dv.to(v.dtype)
