"""Fused MTA forward for NVIDIA GPUs (Triton): kernels → launcher → dispatch.

Two launches per call (three with top-k selection):

1. ``_chunk_mean_kernel`` pools every chunk j of k and v into its summary
   k̄_j = Σ_s w_s·k_s / n_j, v̄_j likewise, with w_s = 1 for keys of chunk j that are real
   (s < n), not sinks and not padded, and n_j = Σ w_s; it writes log2 n_j (−inf for an empty
   chunk), the summary logit's bias in base 2. With top-k it also pools q̄_i = scale·mean of the
   real queries of chunk i.
2. ``_mta_fwd_kernel``: one program per ``BLOCK_M`` query rows of one query chunk i and one
   (batch, query head). It streams one online softmax (m, l, acc in fp32, base-2 exponentials)
   over

   a. the sink tokens 0 … sinks−1 not already in an exact chunk of i;
   b. the local window chunks as one contiguous key range (causal: i−L+1 … i, cut at the block's
      last row; otherwise |j−i| ≤ L−1). Tiles wholly below the block's first row need no causal
      mask and take the unmasked path; the diagonal tiles are masked;
   c. the top-k selected chunks of i (indices from the selection step);
   d. the summaries of every other chunk causality allows, logit scale·q·k̄_j + log n_j.

   b–d run as separate loops, each with compile-time masks (the default, measured on an H100),
   or with ``LaunchConfig(one_loop=True)`` as one software-pipelined stream of tiles whose
   masks and bias are data (``_stream_tile``): one pipeline fill per block instead of three.

Other opt-in variants (``LaunchConfig``): ``fused`` pools the summaries inside the main launch
instead of step 1 (``chunk_major`` orders its work chunk by chunk), ``tma`` reads tiles through
tensor descriptors, ``max_registers`` caps registers per thread. Tensors that span 2^31 elements
or more take 64-bit batch and head offsets (``WIDE``); smaller ones compile exactly as before.
``CLUSTERED``: clustered summaries (``clusters.py`` pools them), each query chunk its own K.
q, k and v are read through their batch, head and token strides (the head dimension
contiguous), so a model's transposed [B, n, H, d] buffers need no copy; the output takes q's
layout.

For query t and key s the logit is scale·q_t·k_s (−inf where forbidden); the output is
Σ p·v / Σ p, zero for a row that attended nothing. GQA reads key/value head h // (Hq/Hkv): k and v
are never copied to Hq heads. The selection (MTA_SPEC.md step 3: the largest scale·q̄_i·k̄_j,
ties to the lower index) is a [nc × nc] product and a sort per head, done with torch.

Masks handled natively: none, and key padding (a bool or 0/−inf mask with one value per key,
[B, 1, 1, n]). Any other mask goes through the portable implementation (``ops/chunked.py``),
which is correct for every mask on every device.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..ops.masks import normalize_mask

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional (gpu/test) dependency
    triton = None

NEG_INF = float("-inf")
# Tests (and the GPU benchmark) set this to check every fused launch's tickets and waits.
CHECK_SYNC = os.environ.get("MTA_CHECK_SYNC") == "1"
LOG2E = 1.4426950408889634


if triton is not None:

    @triton.jit
    def _batch_and_head(pid_bh, H, WIDE: tl.constexpr):
        """(b, h) of a program on a grid whose axis 1 is B × H; in 64 bits with WIDE (tensors of
        2^31 elements or more: batch and head offsets past 32 bits)."""
        b = pid_bh // H
        h = pid_bh % H
        if WIDE:
            b = b.to(tl.int64)
            h = h.to(tl.int64)
        return b, h

    @triton.jit
    def _chunk_bounds(starts_row, j, c, n, VARLEN: tl.constexpr):
        """Tokens [start, end) of chunk j: fixed chunks (j·c … min(j·c + c, n)), or with VARLEN
        boundary chunks, whose starts ``starts_row`` lists (M + 1 entries, n past the last chunk)."""
        if VARLEN:
            return tl.load(starts_row + j), tl.load(starts_row + j + 1)
        else:
            return j * c, tl.minimum(j * c + c, n)

    @triton.jit
    def _pooled_tokens(keyok_row, start, end, sinks, s0, HAS_KEYMASK: tl.constexpr, BLOCK_C: tl.constexpr):
        """(pos, w) for the tile at s0 of the chunk of tokens [start, end): the token positions and
        which of them a summary pools, w_s = [s in the chunk][s ≥ sinks][key s kept]."""
        pos = start + s0 + tl.arange(0, BLOCK_C)
        w = (pos < end) & (pos >= sinks)
        if HAS_KEYMASK:
            w = w & (tl.load(keyok_row + pos, mask=pos < end, other=0) != 0)
        return pos, w

    @triton.jit
    def _pool_chunk(x_base, y_base, keyok_row, start, end, c, sinks, stride_xn, stride_yn, dims, dim_ok,
                    HAS_Y: tl.constexpr, HAS_KEYMASK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """Σ_s w_s·x_s and Σ_s w_s·y_s (fp32) and n_j = Σ_s w_s over the tokens s of the chunk
        [start, end) of at most c tokens (w_s: _pooled_tokens)."""
        acc_x = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_y = tl.zeros([BLOCK_D], dtype=tl.float32)
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(0, c, BLOCK_C):
            pos, w = _pooled_tokens(keyok_row, start, end, sinks, s0, HAS_KEYMASK, BLOCK_C)
            count += w.to(tl.float32)
            x = tl.load(x_base + pos[:, None] * stride_xn + dims[None, :], mask=w[:, None] & dim_ok[None, :], other=0.0)
            acc_x += tl.sum(x.to(tl.float32), 0)
            if HAS_Y:
                y = tl.load(y_base + pos[:, None] * stride_yn + dims[None, :], mask=w[:, None] & dim_ok[None, :], other=0.0)
                acc_y += tl.sum(y.to(tl.float32), 0)
        return acc_x, acc_y, tl.sum(count, 0)

    @triton.jit
    def _pool_chunk_learned(x_base, y_base, keyok_row, sw_row, start, end, c, sinks, stride_xn, stride_yn, dims, dim_ok,
                            HAS_KEYMASK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        """Learned summaries: Σ_s a_s·x_s and Σ_s a_s·y_s with a_s ∝ exp(x_s·w) over the tokens s
        of the chunk [start, end) that _pool_chunk would count (w: the head's ``summary_weight`` row), as one
        online softmax over the chunk's tiles: (acc_x, acc_y, n_j, den) with the weights
        unnormalised (divide by den, ≥ 1 unless the chunk is empty)."""
        wv = tl.load(sw_row + dims, mask=dim_ok, other=0.0).to(tl.float32)
        acc_x = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_y = tl.zeros([BLOCK_D], dtype=tl.float32)
        count = tl.zeros([BLOCK_C], dtype=tl.float32)
        m = tl.max(tl.full([BLOCK_C], float("-inf"), dtype=tl.float32), 0)
        den = tl.sum(tl.zeros([BLOCK_C], dtype=tl.float32), 0)
        for s0 in range(0, c, BLOCK_C):
            pos, w = _pooled_tokens(keyok_row, start, end, sinks, s0, HAS_KEYMASK, BLOCK_C)
            count += w.to(tl.float32)
            x = tl.load(x_base + pos[:, None] * stride_xn + dims[None, :], mask=w[:, None] & dim_ok[None, :],
                        other=0.0).to(tl.float32)
            y = tl.load(y_base + pos[:, None] * stride_yn + dims[None, :], mask=w[:, None] & dim_ok[None, :],
                        other=0.0).to(tl.float32)
            logit = tl.where(w, tl.sum(x * wv[None, :], 1), float("-inf"))
            m_new = tl.maximum(m, tl.max(logit, 0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing kept yet: every weight is 0
            alpha = tl.exp(m - m_ref)
            p = tl.exp(logit - m_ref)
            acc_x = acc_x * alpha + tl.sum(p[:, None] * x, 0)
            acc_y = acc_y * alpha + tl.sum(p[:, None] * y, 0)
            den = den * alpha + tl.sum(p, 0)
            m = m_new
        return acc_x, acc_y, tl.sum(count, 0), den

    @triton.jit
    def _store_summary(xbar_at, ybar_at, logn_at, acc_x, acc_y, n_j, norm, scale, dims, dim_ok,
                       HAS_Y: tl.constexpr, WRITE_LOGN: tl.constexpr):
        """xbar = scale·acc_x / max(norm, 1) (ybar likewise; norm: n_j for means, the weights'
        sum for learned summaries) and log2 n_j, the bias of the summary's logit in base 2 (−inf:
        an empty chunk, nothing to summarise)."""
        inv = scale / tl.maximum(norm, 1.0)
        tl.store(xbar_at + dims, (acc_x * inv).to(xbar_at.dtype.element_ty), mask=dim_ok)
        if HAS_Y:
            tl.store(ybar_at + dims, (acc_y * inv).to(ybar_at.dtype.element_ty), mask=dim_ok)
        if WRITE_LOGN:
            tl.store(logn_at, tl.where(n_j > 0, tl.log2(tl.maximum(n_j, 1.0)), float("-inf")))

    @triton.jit
    def _chunk_mean_kernel(
        x_ptr, y_ptr, keyok_ptr, xbar_ptr, ybar_ptr, logn_ptr, sw_ptr,
        stride_xb, stride_xh, stride_xn,
        stride_yb, stride_yh, stride_yn,
        stride_ob, stride_oh, stride_oj,  # xbar / ybar [B, H, nc, d] (same layout)
        stride_lb, stride_lh,  # log2 n_j [B, H, nc]
        stride_swh,  # summary_weight [H, d]
        n, c, sinks, H, scale, starts_ptr, stride_csb,  # boundary chunks' starts [B, M + 1] (VARLEN)
        HAS_Y: tl.constexpr, HAS_KEYMASK: tl.constexpr, WRITE_LOGN: tl.constexpr, LEARNED: tl.constexpr,
        HEAD_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr, VARLEN: tl.constexpr,
    ):
        """xbar[b, h, j] = scale · Σ_s w_s x[b, h, s] / max(n_j, 1) over the tokens s of chunk j
        (see _pool_chunk); ybar likewise; logn[b, h, j] = log2 n_j (see _store_summary). With
        LEARNED (and y): the weights are softmax_s(x_s·sw[h]) over those tokens instead
        (_pool_chunk_learned)."""
        j = tl.program_id(0)
        b, h = _batch_and_head(tl.program_id(1), H, WIDE)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_D
        start, end = _chunk_bounds(starts_ptr + b * stride_csb, j, c, n, VARLEN)
        if LEARNED:
            acc_x, acc_y, n_j, norm = _pool_chunk_learned(
                x_ptr + b * stride_xb + h * stride_xh, y_ptr + b * stride_yb + h * stride_yh, keyok_ptr + b * n,
                sw_ptr + h * stride_swh, start, end, c, sinks, stride_xn, stride_yn, dims, dim_ok, HAS_KEYMASK,
                BLOCK_C, BLOCK_D)
        else:
            acc_x, acc_y, n_j = _pool_chunk(x_ptr + b * stride_xb + h * stride_xh, y_ptr + b * stride_yb + h * stride_yh,
                                            keyok_ptr + b * n, start, end, c, sinks, stride_xn, stride_yn, dims, dim_ok,
                                            HAS_Y, HAS_KEYMASK, BLOCK_C, BLOCK_D)
            norm = n_j
        out_off = b * stride_ob + h * stride_oh + j * stride_oj
        _store_summary(xbar_ptr + out_off, ybar_ptr + out_off, logn_ptr + b * stride_lb + h * stride_lh + j,
                       acc_x, acc_y, n_j, norm, scale, dims, dim_ok, HAS_Y, WRITE_LOGN)

    @triton.jit
    def _online_update(acc, m_i, l_i, logits, vals, PRECISION: tl.constexpr):
        """One online-softmax step (base 2) over logits [BLOCK_M, BLOCK_N] and values [BLOCK_N, BLOCK_D]."""
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(logits - m_safe[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals, input_precision=PRECISION, out_dtype=tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        return acc, m_new, l_i

    @triton.jit
    def _scores(q, kt, qk_scale, cap2, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
        """The logits scale·q·kᵀ in base 2 (``qk_scale`` = scale·log2 e) of a tile; SOFTCAP:
        soft-capped, cap2·tanh(x / cap2) with cap2 = softcap·log2 e (the cap in base 2: the same
        as log2 e · softcap·tanh(scale·q·k / softcap)), tanh(y) as 1 − 2 / (1 + e^2y)."""
        x = tl.dot(q, kt, input_precision=PRECISION, out_dtype=tl.float32) * qk_scale
        if SOFTCAP:
            x = cap2 * (1.0 - 2.0 / (1.0 + tl.exp2(x * (2.0 * 1.4426950408889634) / cap2)))
        return x

    @triton.jit
    def _query_block(Hq, G, blocks_per_chunk, first_block):
        """(batch, query head, key/value head, chunk, sub-block) of this program on the grid
        (chunks × sub-blocks from the query block ``first_block`` on, B × Hq), heaviest blocks
        (late chunks: most summaries under causality) first, for load balance."""
        pid_m = first_block + tl.num_programs(0) - 1 - tl.program_id(0)
        pid_bh = tl.program_id(1)
        h = pid_bh % Hq
        return pid_bh // Hq, h, h // G, pid_m // blocks_per_chunk, pid_m % blocks_per_chunk

    @triton.jit
    def _sinks_left(keys, sinks, n, c, w_lo, w_hi, sel, HAS_TOPK: tl.constexpr):
        """Which of ``keys`` are sinks that no exact chunk of the query chunk already covers (its
        window w_lo … w_hi, or a selected chunk in ``sel``): those are attended as sinks."""
        kchunk = keys // c
        ok = (keys < sinks) & (keys < n) & ((kchunk < w_lo) | (kchunk > w_hi))
        if HAS_TOPK:
            ok = ok & (tl.sum((kchunk[:, None] == sel[None, :]).to(tl.int32), 1) == 0)
        return ok

    @triton.jit
    def _key_tile(acc, m_i, l_i, q, k_base, v_base, keyok_row, keys, ok, rows, dims, dim_ok,
                  stride_kn, stride_vn, qk_scale, cap2, SOFTCAP: tl.constexpr, kd, vd, kv_row, start,
                  MASKED: tl.constexpr, CAUSAL_TILE: tl.constexpr, HAS_KEYMASK: tl.constexpr,
                  PRECISION: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
        """Exact attention of the block's rows to the tokens ``keys`` (= start + 0 … BLOCK_N−1).
        MASKED: ``ok`` flags the usable keys (else all are real and usable); CAUSAL_TILE: some keys
        lie after some rows. TMA: whole tiles through the tensor descriptors kd, vd over the
        [B·Hkv·n, d] rows (this head's first row: kv_row); rows past the usable keys are read
        (the next tokens, or zeros past the tensor) and weigh nothing: their logits are masked."""
        if TMA:
            kt = kd.load([kv_row + start, 0]).T
            vt = vd.load([kv_row + start, 0])
        elif MASKED:
            kt = tl.load(k_base + keys[None, :] * stride_kn + dims[:, None], mask=ok[None, :] & dim_ok[:, None], other=0.0)
            vt = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
        elif HEAD_D == BLOCK_D:  # the hot path: whole tiles, no masks at all
            kt = tl.load(k_base + keys[None, :] * stride_kn + dims[:, None])
            vt = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :])
        else:
            kt = tl.load(k_base + keys[None, :] * stride_kn + dims[:, None], mask=dim_ok[:, None], other=0.0)
            vt = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=dim_ok[None, :], other=0.0)
        logits = _scores(q, kt, qk_scale, cap2, PRECISION, SOFTCAP)
        if HAS_KEYMASK:
            if MASKED:
                ok = ok & (tl.load(keyok_row + keys, mask=ok, other=0) != 0)
            else:
                ok = tl.load(keyok_row + keys) != 0
        if MASKED or HAS_KEYMASK:
            allowed = ok[None, :]
            if CAUSAL_TILE:
                allowed = allowed & (keys[None, :] <= rows[:, None])
            logits = tl.where(allowed, logits, float("-inf"))
        elif CAUSAL_TILE:
            logits = tl.where(keys[None, :] <= rows[:, None], logits, float("-inf"))
        return _online_update(acc, m_i, l_i, logits, vt, PRECISION)

    @triton.jit
    def _selected_tiles(acc, m_i, l_i, q, k_base, v_base, keyok_row, sel_row, top_k, c, n, rows, dims, dim_ok,
                        stride_kn, stride_vn, qk_scale, cap2, SOFTCAP: tl.constexpr, kd, vd, kv_row, starts_row,
                        HAS_KEYMASK: tl.constexpr,
                        PRECISION: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        TMA: tl.constexpr, VARLEN: tl.constexpr):
        """Exact attention to the tokens of the top-k selected chunks ``sel_row[0 … top_k−1]`` (−1:
        none). They are summarised chunks, so always before the window under causality: no causal
        mask."""
        for e in range(0, top_k):
            j = tl.load(sel_row + e)
            if j >= 0:
                if VARLEN:
                    j_start, j_end = _chunk_bounds(starts_row, j, c, n, VARLEN)
                else:
                    j_end = tl.minimum(j * c + c, n)
                    j_start = j * c
                for start in range(j_start, j_end, BLOCK_N):
                    keys = start + tl.arange(0, BLOCK_N)
                    acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_base, v_base, keyok_row, keys, keys < j_end, rows,
                                              dims, dim_ok, stride_kn, stride_vn, qk_scale, cap2, SOFTCAP, kd, vd,
                                              kv_row, start,
                                              True, False, HAS_KEYMASK, PRECISION, HEAD_D, BLOCK_D, TMA)
        return acc, m_i, l_i

    @triton.jit
    def _wait_flags(flag_row, status_ptr, js, inside, MAX_SPIN: tl.constexpr):
        """Acquire: wait until every flag ``flag_row[js]`` (``inside``) is set (1) by its producer's
        release. Bounded: a wait that gives up reports through ``status_ptr`` instead of hanging."""
        ready = tl.min(tl.where(inside, tl.atomic_add(flag_row + js, 0, mask=inside, sem="acquire"), 1), 0)
        spins = 0
        while (ready == 0) & (spins < MAX_SPIN):
            ready = tl.min(tl.where(inside, tl.atomic_add(flag_row + js, 0, mask=inside, sem="acquire"), 1), 0)
            spins += 1
        if ready == 0:  # never expected (tickets order producers first): report, do not hang
            tl.atomic_xchg(status_ptr, 1)
        tl.debug_barrier()

    @triton.jit
    def _summary_tiles(acc, m_i, l_i, q, sk_base, sv_base, logn_row, stride_lj, flag_row, status_ptr, sel, j_lo, j_hi,
                       dims, dim_ok, stride_sj, qk_scale, cap2, SOFTCAP: tl.constexpr, skd, svd, s_row,
                       PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                       WAIT: tl.constexpr, CG: tl.constexpr, MAX_SPIN: tl.constexpr, HAS_TOPK: tl.constexpr,
                       TMA: tl.constexpr):
        """Attention to the summaries of chunks j_lo … j_hi−1 (those with n_j > 0 and not selected);
        the logit of a summary is scale·q·k̄_j + log n_j (log2 n_j in base 2). CG: the summaries
        are written by other programs of this launch: read them past L1, which may hold lines
        loaded before they were written. WAIT: wait for each tile's flags before reading it (the
        loop then runs without software pipelining: a load must not move above its wait)."""
        for j0 in range(j_lo, j_hi, BLOCK_N):
            js = j0 + tl.arange(0, BLOCK_N)
            inside = js < j_hi
            if WAIT:
                _wait_flags(flag_row, status_ptr, js, inside, MAX_SPIN)
            if CG:
                bias = tl.load(logn_row + js * stride_lj, mask=inside, other=float("-inf"), cache_modifier=".cg")
            else:
                bias = tl.load(logn_row + js * stride_lj, mask=inside, other=float("-inf"))
            if HAS_TOPK:  # a selected chunk is attended exactly, not through its summary
                bias = tl.where(tl.sum((js[:, None] == sel[None, :]).to(tl.int32), 1) == 0, bias, float("-inf"))
            if TMA:  # summary rows past j_hi are read and masked by their −inf bias
                kt = skd.load([s_row + j0, 0]).T
                vt = svd.load([s_row + j0, 0])
            elif CG:
                kt = tl.load(sk_base + js[None, :] * stride_sj + dims[:, None], mask=inside[None, :] & dim_ok[:, None],
                             other=0.0, cache_modifier=".cg")
                vt = tl.load(sv_base + js[:, None] * stride_sj + dims[None, :], mask=inside[:, None] & dim_ok[None, :],
                             other=0.0, cache_modifier=".cg")
            else:
                kt = tl.load(sk_base + js[None, :] * stride_sj + dims[:, None], mask=inside[None, :] & dim_ok[:, None],
                             other=0.0)
                vt = tl.load(sv_base + js[:, None] * stride_sj + dims[None, :], mask=inside[:, None] & dim_ok[None, :],
                             other=0.0)
            logits = _scores(q, kt, qk_scale, cap2, PRECISION, SOFTCAP)
            logits = logits + bias[None, :]  # log2 n_j; −inf for chunks outside, empty or selected
            acc, m_i, l_i = _online_update(acc, m_i, l_i, logits, vt, PRECISION)
        return acc, m_i, l_i

    @triton.jit
    def _stream_tile(acc, m_i, l_i, q, k_base, v_base, sk_base, sv_base, logn_row, keyok_row, sel, t, n_win, lo, hi,
                     j_end, w_lo, w_hi, rows, dims, dim_ok, stride_kn, stride_vn, stride_sj, qk_scale, cap2,
                     SOFTCAP: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_KEYMASK: tl.constexpr, HAS_TOPK: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
        """Tile t of the block's single stream: window keys lo … hi−1 (tiles 0 … n_win−1), then the
        summaries of chunks 0 … j_end−1. Which one is a run-time choice of base pointer, stride and
        bias, so that one software-pipelined loop covers both (no pipeline drain between them); the
        price is a mask on every tile. Summaries inside the window (non-causal) or selected are
        masked out; a window key is masked when past ``hi``, after the row (causal) or padded."""
        is_sum = t >= n_win  # scalar: selects base pointer, stride and range
        start = tl.where(is_sum, (t - n_win) * BLOCK_N, lo + t * BLOCK_N)
        idx = start + tl.arange(0, BLOCK_N)
        # the same flag as a vector for the masks (Triton's interpreter mistypes scalar & vector)
        sum_v = tl.zeros([BLOCK_N], dtype=tl.int32) + t >= n_win
        win_v = tl.zeros([BLOCK_N], dtype=tl.int32) + t < n_win
        inside = idx < tl.where(is_sum, j_end, hi)
        kb = tl.where(is_sum, sk_base, k_base)
        vb = tl.where(is_sum, sv_base, v_base)
        skn = tl.where(is_sum, stride_sj, stride_kn)
        svn = tl.where(is_sum, stride_sj, stride_vn)
        kt = tl.load(kb + idx[None, :] * skn + dims[:, None], mask=inside[None, :] & dim_ok[:, None], other=0.0)
        vt = tl.load(vb + idx[:, None] * svn + dims[None, :], mask=inside[:, None] & dim_ok[None, :], other=0.0)
        # summary: log2 n_j (−inf: empty chunk); window key: 0
        bias = tl.load(logn_row + idx, mask=inside & sum_v, other=0.0)
        ok = inside
        if not CAUSAL:  # the window's own chunks are attended exactly, not through summaries
            ok = ok & ((idx < w_lo) | (idx > w_hi) | win_v)
        if HAS_TOPK:  # a selected chunk is attended exactly, not through its summary
            ok = ok & ((tl.sum((idx[:, None] == sel[None, :]).to(tl.int32), 1) == 0) | win_v)
        if HAS_KEYMASK:
            ok = ok & ((tl.load(keyok_row + idx, mask=inside & win_v, other=0) != 0) | sum_v)
        allowed = ok[None, :]
        if CAUSAL:
            allowed = allowed & ((idx[None, :] <= rows[:, None]) | sum_v[None, :])
        logits = _scores(q, kt, qk_scale, cap2, PRECISION, SOFTCAP)
        logits = tl.where(allowed, logits + bias[None, :], float("-inf"))
        return _online_update(acc, m_i, l_i, logits, vt, PRECISION)

    @triton.jit
    def _mta_fwd_kernel(
        q_ptr, k_ptr, v_ptr, kbar_ptr, vbar_ptr, logn_ptr, sel_ptr, keyok_ptr, out_ptr, sync_ptr,
        kd, vd, skd, svd,  # TMA descriptors of k, v [B·Hkv·n, d] and kbar, vbar [B·Hkv·nc, d], or None
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_sb, stride_sh, stride_sj,  # kbar / vbar [B, Hkv, nc, d] (same layout)
        stride_lb, stride_lh, stride_lj,  # log2 n_j [B, Hkv, nc] (stride_lj: 1, or 8 for the chunk-major launch)
        stride_selb, stride_selh, stride_seli,  # selected chunks [B, Hq, nc, K]
        stride_ob, stride_oh, stride_on,
        n, nc, c, L, sinks, top_k, Hq, Hkv, G, qk_scale, cap2, clusters, first_block,
        starts_ptr, stride_csb,  # VARLEN: each sequence's chunk starts [B, nc + 1] (n past its last chunk)
        CAUSAL: tl.constexpr, HAS_KEYMASK: tl.constexpr, PRECISION: tl.constexpr,
        HEAD_D: tl.constexpr, HAS_TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, FUSED: tl.constexpr,
        MAX_SPIN: tl.constexpr, ONE_LOOP: tl.constexpr, CHUNK_MAJOR: tl.constexpr, TMA: tl.constexpr,
        WIDE: tl.constexpr, CLUSTERED: tl.constexpr, VARLEN: tl.constexpr, SOFTCAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[b, h, t] = softmax over {sinks, window, selected chunks, summaries} · values.

        FUSED (causal, no top-k): no pre-pass. Work items are taken in ticket order (an atomic
        counter, sync_ptr[0]) sorted by (b, kv head, chunk, head in group, sub-block), or with
        CHUNK_MAJOR by (b, chunk, kv head, head in group, sub-block); the first
        item of each (b, kv head, chunk) pools that chunk's summary while its keys stream in
        anyway, writes it and sets its flag (release). Consumers wait (acquire) for the flags of
        the summaries they read, all of chunks before theirs: every wait is on a lower ticket,
        i.e. on a program already running, so the launch cannot deadlock (the decoupled look-back
        argument); k and v are read from memory once instead of twice.

        CLUSTERED (non-causal, no top-k, three loops): the summaries are clustered ones
        (``clusters.py``), each query chunk its own ``clusters`` = K of them, rows i·K … i·K+K−1
        of kbar / vbar / logn, all of them read (log2 of its count as the bias; −inf: empty).

        VARLEN (boundary chunks, ``ops/segments.py``): chunk i of sequence b holds the tokens
        starts[b, i] … starts[b, i+1]−1 (at most c; nc: the most chunks of any sequence, the
        others' trailing chunks empty), the window is the tokens from the start of chunk i−L+1 to
        the end of chunk i (or i+L−1), a selected chunk its own tokens; sub-blocks past the end of
        their chunk return at once. Sinks are fixed chunks of c from token 0 (the segments start
        after them), so a sink's chunk is s // c as without VARLEN."""
        blocks_per_chunk = tl.cdiv(c, BLOCK_M)
        if FUSED:
            t = tl.atomic_add(sync_ptr, 1)  # this program's ticket (one atomic per program)
            sub = t % blocks_per_chunk
            t = t // blocks_per_chunk
            g = t % G
            t = t // G
            if CHUNK_MAJOR:  # (b, chunk, kv head, ...): a chunk's producers run long before its consumers
                hk = t % Hkv
                t = t // Hkv
                i = t % nc
                b = t // nc
            else:  # (b, kv head, chunk, ...)
                i = t % nc
                t = t // nc
                hk = t % Hkv
                b = t // Hkv
            h = hk * G + g
        else:
            b, h, hk, i, sub = _query_block(Hq, G, blocks_per_chunk, first_block)
        if WIDE:  # tensors of 2^31 elements or more: batch and head offsets in 64 bits
            b = b.to(tl.int64)
            h = h.to(tl.int64)
            hk = hk.to(tl.int64)
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

        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        k_base = k_ptr + b * stride_kb + hk * stride_kh
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        keyok_row = keyok_ptr + b * n
        sk_base = kbar_ptr + b * stride_sb + hk * stride_sh
        sv_base = vbar_ptr + b * stride_sb + hk * stride_sh
        logn_row = logn_ptr + b * stride_lb + hk * stride_lh
        flag_row = sync_ptr + 2 + (b * Hkv + hk) * nc
        # this head's first row in the TMA descriptors' [B·Hkv·n, d] views (TMA coordinates are 32-bit)
        kv_row = ((b * Hkv + hk) * n).to(tl.int32)
        if CLUSTERED:
            s_row = ((b * Hkv + hk) * nc * clusters).to(tl.int32)
        else:
            s_row = ((b * Hkv + hk) * nc).to(tl.int32)
        if FUSED:
            if (hk * G == h) & (sub == 0):  # the producer of chunk i's summary for (b, hk)
                sum_k, sum_v, n_i = _pool_chunk(k_base, v_base, keyok_row, i * c, tl.minimum(i * c + c, n), c, sinks,
                                                stride_kn, stride_vn, dims, dim_ok, True, HAS_KEYMASK, BLOCK_N, BLOCK_D)
                _store_summary(sk_base + i * stride_sj, sv_base + i * stride_sj, logn_row + i * stride_lj, sum_k, sum_v,
                               n_i, n_i, 1.0,
                               dims, dim_ok, True, True)
                tl.debug_barrier()  # every thread's stores before the flag
                tl.atomic_xchg(flag_row + i, 1, sem="release")
        sel_offs = tl.arange(0, TOPK_PAD)
        sel = tl.load(sel_ptr + b * stride_selb + h * stride_selh + i * stride_seli + sel_offs,
                      mask=sel_offs < top_k, other=-1)

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        w_lo = tl.maximum(i - L + 1, 0)
        if CAUSAL:
            w_hi = i
        else:
            w_hi = tl.minimum(i + L - 1, nc - 1)

        # a. sinks not covered by an exact chunk of this query chunk (window or selected)
        for s0 in range(0, sinks, BLOCK_N):
            keys = s0 + tl.arange(0, BLOCK_N)
            ok = _sinks_left(keys, sinks, n, c, w_lo, w_hi, sel, HAS_TOPK)
            acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_base, v_base, keyok_row, keys, ok, rows, dims, dim_ok,
                                      stride_kn, stride_vn, qk_scale, cap2, SOFTCAP, kd, vd, kv_row, s0, True, CAUSAL,
                                      HAS_KEYMASK,
                                      PRECISION, HEAD_D, BLOCK_D, TMA)

        # b. the window: keys [lo, hi)
        if VARLEN:
            lo = tl.load(starts_row + w_lo)
            hi = tl.load(starts_row + w_hi + 1)
        else:
            lo = w_lo * c
            hi = tl.minimum((w_hi + 1) * c, n)
        if CAUSAL:
            hi = tl.minimum(hi, row0 + BLOCK_M)
        if ONE_LOOP:
            # b–d as one stream: window tiles, then summary tiles (c. the selected chunks, rare, first)
            acc, m_i, l_i = _selected_tiles(acc, m_i, l_i, q, k_base, v_base, keyok_row, sel_ptr + b * stride_selb +
                                            h * stride_selh + i * stride_seli, top_k, c, n, rows, dims, dim_ok,
                                            stride_kn, stride_vn, qk_scale, cap2, SOFTCAP, kd, vd, kv_row, starts_row,
                                            HAS_KEYMASK,
                                            PRECISION, HEAD_D, BLOCK_N, BLOCK_D, TMA, VARLEN)
            n_win = tl.cdiv(hi - lo, BLOCK_N)
            if CAUSAL:
                j_end = w_lo
            else:
                j_end = nc
            for t in range(0, n_win + tl.cdiv(j_end, BLOCK_N)):
                acc, m_i, l_i = _stream_tile(acc, m_i, l_i, q, k_base, v_base, sk_base, sv_base, logn_row, keyok_row,
                                             sel, t, n_win, lo, hi, j_end, w_lo, w_hi, rows, dims, dim_ok, stride_kn,
                                             stride_vn, stride_sj, qk_scale, cap2, SOFTCAP, CAUSAL, HAS_KEYMASK,
                                             HAS_TOPK, PRECISION,
                                             BLOCK_N)
        else:
            # [lo, mid) whole tiles with every key before every row (causal) or simply whole tiles
            # (not causal), [mid, hi) the masked remainder
            if CAUSAL:
                mid = lo + ((tl.minimum(row0, hi) - lo) // BLOCK_N) * BLOCK_N
            else:
                mid = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
            for start in range(lo, mid, BLOCK_N):
                keys = start + tl.arange(0, BLOCK_N)
                acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_base, v_base, keyok_row, keys, keys < hi, rows, dims,
                                          dim_ok, stride_kn, stride_vn, qk_scale, cap2, SOFTCAP, kd, vd, kv_row,
                                          start, False, False,
                                          HAS_KEYMASK, PRECISION, HEAD_D, BLOCK_D, TMA)
            for start in range(mid, hi, BLOCK_N):
                keys = start + tl.arange(0, BLOCK_N)
                acc, m_i, l_i = _key_tile(acc, m_i, l_i, q, k_base, v_base, keyok_row, keys, keys < hi, rows, dims,
                                          dim_ok, stride_kn, stride_vn, qk_scale, cap2, SOFTCAP, kd, vd, kv_row,
                                          start, True, CAUSAL,
                                          HAS_KEYMASK, PRECISION, HEAD_D, BLOCK_D, TMA)

            # c. the selected chunks (always before the window under causality: no causal mask)
            acc, m_i, l_i = _selected_tiles(acc, m_i, l_i, q, k_base, v_base, keyok_row, sel_ptr + b * stride_selb +
                                            h * stride_selh + i * stride_seli, top_k, c, n, rows, dims, dim_ok,
                                            stride_kn, stride_vn, qk_scale, cap2, SOFTCAP, kd, vd, kv_row, starts_row,
                                            HAS_KEYMASK,
                                            PRECISION, HEAD_D, BLOCK_N, BLOCK_D, TMA, VARLEN)

            # d. summaries of the chunks outside the window (under causality: only those before it).
            #    Fused head by head: wait tile by tile; chunk by chunk: every flag once, up front (their
            #    producers ran long before), then a software-pipelined stream of summary tiles.
            if CLUSTERED:  # this query chunk's own K summaries (rows i·K …), every one outside its window
                acc, m_i, l_i = _summary_tiles(acc, m_i, l_i, q, sk_base, sv_base, logn_row, stride_lj, flag_row,
                                               sync_ptr + 1, sel, i * clusters, i * clusters + clusters, dims, dim_ok,
                                               stride_sj, qk_scale, cap2, SOFTCAP, skd, svd, s_row, PRECISION,
                                               BLOCK_N, False, False,
                                               MAX_SPIN, False, TMA)
            else:
                if FUSED and CHUNK_MAJOR:
                    for j0 in range(0, w_lo, BLOCK_N):
                        js = j0 + tl.arange(0, BLOCK_N)
                        _wait_flags(flag_row, sync_ptr + 1, js, js < w_lo, MAX_SPIN)
                acc, m_i, l_i = _summary_tiles(acc, m_i, l_i, q, sk_base, sv_base, logn_row, stride_lj, flag_row,
                                               sync_ptr + 1, sel, 0, w_lo, dims, dim_ok, stride_sj, qk_scale, cap2,
                                               SOFTCAP, skd, svd,
                                               s_row, PRECISION, BLOCK_N, FUSED and not CHUNK_MAJOR, FUSED, MAX_SPIN,
                                               HAS_TOPK, TMA)
                if not CAUSAL:
                    acc, m_i, l_i = _summary_tiles(acc, m_i, l_i, q, sk_base, sv_base, logn_row, stride_lj, flag_row,
                                                   sync_ptr + 1, sel, w_hi + 1, nc, dims, dim_ok, stride_sj, qk_scale,
                                                   cap2, SOFTCAP,
                                                   skd, svd, s_row, PRECISION, BLOCK_N, FUSED and not CHUNK_MAJOR,
                                                   FUSED, MAX_SPIN, HAS_TOPK, TMA)

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def key_padding(attn_mask: torch.Tensor | None, B: int, Hq: int, n: int) -> torch.Tensor | None | bool:
    """The mask as [B, n] keep-flags if it is None or a key-padding mask (one allow/forbid per
    key, no bias); False if the kernel cannot take it (the caller then uses the portable
    implementation). Mask conventions are those of ``ops/masks.py``."""
    mask = normalize_mask(attn_mask, B, Hq, n)
    if mask is None:
        return None
    if mask.per_query or mask.per_head or mask.bias is not None:
        return False
    return mask.allowed[:, 0, 0, :].expand(B, n).contiguous()


def _pow2(x: int) -> int:
    """The smallest power of two ≥ x (x ≥ 1). Plain Python: triton.next_power_of_2 and
    triton.cdiv are constexpr-function wrappers that cost ~1.5 µs a call on the launch path."""
    return 1 << max(0, x - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and Triton launch options of the fused forward. ``fused``: pool the summaries
    inside the main launch (causal, no top-k only) instead of a pre-pass; None: the default.
    ``one_loop``: stream the window and the summaries through one software-pipelined loop
    (``_stream_tile``) instead of three loops that each fill and drain the pipeline; with the
    pre-pass only. ``chunk_major`` (fused only): take work items chunk by chunk across heads,
    so that a summary's producer runs long before the programs that wait for it, instead of
    head by head, and wait for all of a block's summaries once, before a software-pipelined
    summary loop (head by head, each tile waits for its own flags: no pipelining). ``tma``: read
    key, value and summary tiles through tensor descriptors (Hopper's bulk tensor copies: no
    per-element addresses) with the three loops and the pre-pass; needs a
    power-of-two head size ≥ 16. ``max_registers``: a cap on registers per thread (ptxas
    ``.maxnreg``): 8 warps × 128 rows fit in 128 registers without spills, which lets two such
    blocks share a multiprocessor instead of one (benchmarks/kernel_resources.py)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    fused: bool | None = None
    one_loop: bool = False
    chunk_major: bool = False
    tma: bool = False
    max_registers: int | None = None


@functools.lru_cache(maxsize=256)  # on the launch path of every call
def default_launch(c: int, d: int, dtype: torch.dtype) -> LaunchConfig:
    """Tile sizes by chunk size and dtype, from the tile sweep of benchmarks/gpu_bench.py on an
    H100 (bf16, d = 128, 64K tokens, causal; benchmarks/results/gpu_2026-11-27_sweep.md): 128
    query rows against 32-key tiles with one warpgroup beat 64-row blocks, 64- or 128-key tiles
    and 8 warps for c = 128 and 256 (c = 256: 2.02 ms vs 2.25, 3.31, 2.54). A block of queries
    never spans two chunks, so BLOCK_M ≤ c (rounded up to a power of two, at least 16 for
    tl.dot). fp32 tiles take twice the shared memory: 64 rows."""
    if dtype == torch.float32:
        return LaunchConfig(max(16, min(64, _pow2(c))), 32, 4, 2)
    if c >= 128:
        return LaunchConfig(128, 32, 4, 3)
    return LaunchConfig(max(16, _pow2(c)), 64, 4, 3)


# Element offsets are 32-bit products (program index × stride) unless a tensor spans this many elements.
WIDE_OFFSETS_FROM = 1 << 31


def _span(t: torch.Tensor) -> int:
    """Elements from a tensor's first to its last addressed one: numel for a contiguous tensor,
    more for a strided view (q sliced from a fused q/k/v projection spans three times its size)."""
    if t.is_contiguous():  # the common case, and a cheap one on the launch path
        return t.numel()
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _wide(*tensors) -> bool:
    return any(t is not None and _span(t) >= WIDE_OFFSETS_FROM for t in tensors)


def _token_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, n, d] as the kernels read it: rows of d contiguous elements at any batch, head and
    token strides, so a model's transposed [B, n, H, d] buffers (and slices of a fused q/k/v
    projection) are read in place, without a copy. Copied only when its last dimension is
    strided or one head's token offsets would not fit 32 bits."""
    n, d = x.shape[2], x.shape[3]
    if x.stride(3) != 1 or (n - 1) * x.stride(2) + d > WIDE_OFFSETS_FROM - 1:
        return x.contiguous()
    return x


def _chunk_means(x, y, keep, c, nc, sinks, scale, logn, block_c=None, num_warps=4, summary_weight=None, starts=None):
    """Pooled chunk means of x (and y) [B, H, n, d] → [B, H, nc, d] in x's dtype (fp32 if
    ``logn`` is None: the selection's q̄); ``logn`` [B, H, nc] fp32 receives log2 n_j (−inf:
    empty chunk). ``summary_weight`` [H, d] (with y): learned summaries, the tokens weighted by
    softmax_s(x_s·w_h) instead of 1/n_j. ``starts`` [B, nc + 1] int32: boundary chunks' first
    tokens (chunk j is starts[b, j] … starts[b, j+1]−1) instead of fixed chunks of c."""
    if summary_weight is not None and y is None:
        raise ValueError("learned summaries pool keys and values together")
    B, H, n, d = x.shape
    dtype = x.dtype if logn is not None else torch.float32
    xbar = torch.empty(B, H, nc, d, dtype=dtype, device=x.device)
    ybar = torch.empty_like(xbar) if y is not None else xbar
    keyok = keep if keep is not None else x  # an unused pointer when there is no mask
    sw = summary_weight.float().contiguous() if summary_weight is not None else xbar  # unused pointer: means
    _chunk_mean_kernel[(nc, B * H)](
        x, y if y is not None else x, keyok, xbar, ybar, logn if logn is not None else xbar, sw,
        *x.stride()[:3],
        *(y.stride()[:3] if y is not None else (0, 0, 0)),
        *xbar.stride()[:3],
        *(logn.stride()[:2] if logn is not None else (0, 0)),
        sw.stride(0) if summary_weight is not None else 0,
        n, c, sinks, H, scale, starts if starts is not None else xbar, starts.stride(0) if starts is not None else 0,
        HAS_Y=y is not None, HAS_KEYMASK=keep is not None, WRITE_LOGN=logn is not None,
        LEARNED=summary_weight is not None, VARLEN=starts is not None,
        HEAD_D=d, BLOCK_C=block_c or min(64, max(16, _pow2(c))),
        BLOCK_D=max(16, _pow2(d)), WIDE=_wide(x, y), num_warps=num_warps,  # xbar, ybar: smaller than x
    )
    return xbar, ybar


_PLACEHOLDER: dict[torch.device, torch.Tensor] = {}
MAX_SPIN = 1 << 16  # a bound on a consumer's wait for one tile of flags (tens of ms), never reached


def _placeholder(device) -> torch.Tensor:
    """A [1, 1, 1, 1] int32 −1 that stands for an argument the kernel does not read."""
    if device not in _PLACEHOLDER:
        _PLACEHOLDER[device] = torch.full((1, 1, 1, 1), -1, dtype=torch.int32, device=device)
    return _PLACEHOLDER[device]


class Geometry(NamedTuple):
    """What a launcher derives from the inputs and the op's arguments (shared by forward and
    backward): shapes, the group size G = Hq / Hkv, the scale, and c, nc, L, sinks clipped to n."""

    B: int
    Hq: int
    Hkv: int
    G: int
    n: int
    d: int
    scale: float
    c: int
    nc: int
    L: int
    sinks: int


def geometry(q, k, chunk_size, scale, local_chunks, sinks) -> Geometry:
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    c = min(chunk_size, n)
    nc = _cdiv(n, c)
    return Geometry(B, Hq, Hkv, Hq // Hkv, n, d, 1.0 / math.sqrt(d) if scale is None else float(scale), c, nc,
                    min(local_chunks, nc), min(sinks, n))


def boundary_starts(chunk_starts, B: int, device, nc: int, L: int, local_chunks: int):
    """(starts, nc, L): ``chunk_starts`` ([B, M + 1], ``ops.segments.chunk_bounds``) as the kernels
    read it (int32, contiguous, on ``device``), its M chunks and the window it allows; fixed chunks
    (None) keep ``geometry``'s nc and L."""
    if chunk_starts is None:
        return None, nc, L
    starts = chunk_starts.to(device=device, dtype=torch.int32).contiguous()
    if starts.dim() != 2 or starts.shape[0] != B or starts.shape[1] < 2:
        raise ValueError(f"chunk_starts must be [B, M + 1] = [{B}, M + 1]; got {tuple(chunk_starts.shape)}")
    nc = starts.shape[1] - 1
    return starts, nc, min(local_chunks, nc)


def _selection(q, kbar, logn, c, nc, L, top_k, causal, scale, G, starts=None):
    """Top-k chunks per (b, h, i) among the summarised ones: [B, Hq, nc, K] int32, −1 padded."""
    B, Hq, n, d = q.shape
    K = min(top_k, nc)
    if K == 0:  # the kernel reads no index
        return _placeholder(q.device), 0
    qbar, _ = _chunk_means(q, None, None, c, nc, 0, scale, None, starts=starts)  # scale·mean over real queries
    kb = kbar.float().repeat_interleave(G, dim=1)  # [B, Hq, nc, d] (small: one row per chunk)
    score = qbar @ kb.transpose(-1, -2)  # [B, Hq, nc_i, nc_j]
    ii = torch.arange(nc, device=q.device).view(nc, 1)
    jj = torch.arange(nc, device=q.device).view(1, nc)
    summarised = (jj < ii - L + 1) if causal else ((jj - ii).abs() > L - 1)
    summarised = summarised & (logn[:, 0] > NEG_INF).view(B, 1, 1, nc)  # −inf: an empty chunk
    score = score.masked_fill(~summarised, NEG_INF)
    top = torch.sort(score, dim=-1, descending=True, stable=True)
    chosen = top.values[..., :K] > NEG_INF
    sel = torch.where(chosen, top.indices[..., :K], torch.full_like(top.indices[..., :K], -1))
    return sel.to(torch.int32).contiguous(), K


def mta_forward_triton(q, k, v, keep, *, chunk_size, causal=False, scale=None, local_chunks=1, sinks=0, top_k=0,
                       launch: LaunchConfig | None = None, summary_weight=None, centroids=None, chunk_starts=None,
                       rows_from: int = 0, softcap: float = 0.0):
    """Launch the fused forward. ``keep``: None or [B, n] bool key-padding flags (see
    :func:`key_padding`). Tensors on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
    ``launch`` overrides the tile sizes of :func:`default_launch` (benchmarks sweep it).
    ``summary_weight`` [Hkv, d]: learned summaries (pooled by the pre-pass). ``centroids``
    [Hkv, K, d]: clustered summaries (non-causal, no top-k; pooled by ``clusters.py``).
    ``chunk_starts`` [B, M + 1] int32: boundary chunks without padding (``ops.segments.chunk_bounds``:
    chunk i of sequence b is the tokens chunk_starts[b, i] … chunk_starts[b, i+1]−1, at most
    ``chunk_size`` of them; M chunks, a shorter sequence's last ones empty). ``rows_from``: the
    caller reads the output's rows from that query on only (``use_mta`` on a prompt continued over
    a cache): the grid starts at the query block holding it, the rows before that block are zeros;
    with the pre-pass only (the fused launch's programs pool the summaries of their own chunks).
    Boundary chunks (``chunk_starts``): the grid starts at the first chunk that some sequence has
    not wholly before ``rows_from``; the rows before it are zeros or computed. ``softcap`` > 0:
    every logit's product term soft-capped (the op's ``softcap``, docs/op.md), in every tile.

    The summaries come from a pre-pass (``_chunk_mean_kernel``), or, with ``launch.fused``
    (causal, no top-k, means), from the main launch itself (see ``_mta_fwd_kernel``)."""
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton (or the 'gpu' extra)")
    B, Hq, Hkv, G, n, d, scale, c, nc, L, s = geometry(q, k, chunk_size, scale, local_chunks, sinks)
    starts, nc, L = boundary_starts(chunk_starts, B, q.device, nc, L, local_chunks)
    if n * d >= 1 << 31:  # token offsets within one head stay 32-bit
        raise ValueError(f"the Triton kernels take n·d < 2^31 per head; got n={n}, d={d}")
    q, k, v = _token_rows(q), _token_rows(k), _token_rows(v)
    keyok = keep.to(torch.int8).contiguous() if keep is not None else None
    cfg = launch or default_launch(c, d, q.dtype)
    fused = bool(cfg.fused)
    if fused and not (causal and min(top_k, nc) == 0):
        raise ValueError("summaries fused in the main launch need causal=True and top_k=0")
    if fused and starts is not None:
        raise ValueError("summaries fused in the main launch are of fixed chunks: boundary chunks need the pre-pass")
    if fused and summary_weight is not None:
        raise ValueError("summaries fused in the main launch are means: learned summaries need the pre-pass")
    if fused and cfg.one_loop:
        raise ValueError("one_loop streams summaries from the pre-pass: it cannot be combined with fused=True")
    if cfg.chunk_major and not fused:
        raise ValueError("chunk_major orders the work of the fused launch: it needs fused=True")
    if cfg.chunk_major and (d * q.element_size()) % 32:
        # k̄, v̄ rows must take 16-byte copies (cp.async.cg, past L1) and fill whole 32-byte sectors
        raise ValueError(f"chunk_major needs head rows of a multiple of 32 bytes, got d={d} × {q.element_size()} bytes")
    block_d = max(16, _pow2(d))
    if centroids is not None and (causal or top_k or summary_weight is not None or starts is not None or fused
                                  or cfg.one_loop):
        raise ValueError("clustered summaries (centroids) run non-causal, without top_k or summary_weight, on fixed "
                         "chunks, in the three-loop kernel with the pre-pass (not fused or one_loop)")
    if cfg.tma and (fused or cfg.one_loop):
        raise ValueError("tma reads the pre-pass's summaries in the three-loop kernel: not with fused or one_loop")
    if cfg.tma and d != block_d:
        raise ValueError(f"tma needs a power-of-two head size of at least 16, got {d}")
    if cfg.tma and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
        raise ValueError("tma needs tensor-memory-accelerator copies: an NVIDIA Hopper GPU (sm_90) or newer")
    clusters = 0
    if centroids is not None:  # the clustered pre-pass writes its own kbar, vbar and logn
        from .clusters import cluster_summaries

        clusters = centroids.shape[1]
        if nc * clusters * d >= 1 << 31:  # one head's summary offsets stay 32-bit
            raise ValueError(f"clustered summaries take nc·K·d < 2^31 per head; got nc={nc}, K={clusters}, d={d}")
        kbar, vbar, logn = cluster_summaries(k, v, keyok, centroids, c, nc, L, s)[:3]
        sync = _placeholder(q.device)
    else:
        if fused and cfg.chunk_major:
            # The chunk-major launch streams summaries through cp.async, which caches 4-byte copies in
            # L1: one entry per 32-byte sector, so that no sector is ever read before its entry is
            # written (an earlier program on the same multiprocessor would otherwise leave a stale
            # neighbour in L1).
            logn = torch.empty(B, Hkv, nc, 8, dtype=torch.float32, device=q.device)[..., 0]
        else:
            logn = torch.empty(B, Hkv, nc, dtype=torch.float32, device=q.device)
        if fused:
            kbar = torch.empty(B, Hkv, nc, d, dtype=k.dtype, device=q.device)
            vbar = torch.empty_like(kbar)
            sync = torch.zeros(2 + B * Hkv * nc, dtype=torch.int32, device=q.device)  # ticket, status, flags
        else:
            kbar, vbar = _chunk_means(k, v, keyok, c, nc, s, 1.0, logn, summary_weight=summary_weight, starts=starts)
            sync = _placeholder(q.device)
    sel, K = _selection(q, kbar, logn, c, nc, L, top_k, causal, scale, G, starts)
    out = torch.empty_like(q)
    descs = (None,) * 4
    if cfg.tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        def rows(x):  # [B, H, m, d] contiguous → descriptor over its B·H·m rows of d
            return TensorDescriptor(x, [x.shape[0] * x.shape[1] * x.shape[2], d], [d, 1], [cfg.block_n, block_d])

        k, v = k.contiguous(), v.contiguous()  # the descriptors address rows (b·H + h)·n + s
        descs = (rows(k), rows(v), rows(kbar), rows(vbar))
    blocks_per_chunk = _cdiv(c, cfg.block_m)
    first = 0
    if rows_from > 0 and not fused and starts is None and not clusters:
        first = min(rows_from, n) // c * blocks_per_chunk + min(rows_from, n) % c // cfg.block_m
        row0 = first // blocks_per_chunk * c + first % blocks_per_chunk * cfg.block_m
        out[:, :, :row0].zero_()
    elif rows_from > 0 and starts is not None:
        # boundary chunks: the grid starts at the first chunk that is not wholly before rows_from in
        # every sequence (one sync); the rows before rows_from are zeros where not computed
        first = int((starts[:, 1:] <= rows_from).sum(1).min()) * blocks_per_chunk
        out[:, :, :min(rows_from, n)].zero_()
    blocks = nc * blocks_per_chunk - first
    if blocks == 0:
        return out
    grid = (blocks * B * Hq,) if fused else (blocks, B * Hq)
    _mta_fwd_kernel[grid](
        q, k, v, kbar, vbar, logn, sel, keyok if keyok is not None else logn, out, sync, *descs,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *kbar.stride()[:3], *logn.stride()[:3],
        *sel.stride()[:3], *out.stride()[:3],
        n, nc, c, L, s, K, Hq, Hkv, G, scale * LOG2E, softcap * LOG2E, clusters, first,
        starts if starts is not None else sync, starts.stride(0) if starts is not None else 0,
        CAUSAL=bool(causal), HAS_KEYMASK=keep is not None,
        # fp32 inputs: full-precision products (TF32 would cost ~1e-3 relative accuracy)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HEAD_D=d, HAS_TOPK=K > 0, TOPK_PAD=max(1, _pow2(K)), FUSED=fused, MAX_SPIN=MAX_SPIN,
        ONE_LOOP=bool(cfg.one_loop), CHUNK_MAJOR=bool(cfg.chunk_major), TMA=bool(cfg.tma),
        WIDE=_wide(q, k, v, kbar if clusters else None),  # out has q's layout: it spans no more than q
        CLUSTERED=clusters > 0, VARLEN=starts is not None, SOFTCAP=softcap > 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.max_registers} if cfg.max_registers else {}),
    )
    if fused and CHECK_SYNC:
        assert int(sync[0]) == grid[0], "fused MTA launch: tickets do not cover the grid"
        assert int(sync[1]) == 0, "fused MTA launch: a consumer gave up waiting for a summary"
    return out
