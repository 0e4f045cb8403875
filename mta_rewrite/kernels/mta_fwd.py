"""Fused MTA forward for NVIDIA GPUs (Triton): kernel → launcher → dispatch.

One program handles ``BLOCK_M`` query rows of one query chunk i, for one (batch, query head),
and streams through a single online softmax (m, l, acc in fp32):

1. the sink tokens 0 … sinks−1 that are not already in an exact chunk of i;
2. the local window chunks (causal: i−L+1 … i; otherwise |j−i| ≤ L−1), with causality and key
   padding applied per key;
3. the top-k selected chunks of i (indices from the preceding selection step);
4. the chunk summaries k̄_j, v̄_j of every other chunk causality allows, with logit
   scale·q·k̄_j + log n_j.

For query t and key s the logit is scale·q_t·k_s (−inf where forbidden); the output is
Σ p·v / Σ p, zero for a row that attended nothing. GQA reads key/value head h // (Hq/Hkv): k and v
are never copied to Hq heads. Summaries (masked means over non-sink, non-padded keys) and the
top-k selection (MTA_SPEC.md step 3: the largest scale·q̄_i·k̄_j, ties to the lower index) are
computed beforehand with torch on the same device; both are O(n·d + n²/c²) work.

Masks handled natively: none, and key padding (a bool or 0/−inf mask with one value per key,
[B, 1, 1, n]). Any other mask goes through the portable implementation (``ops/chunked.py``),
which is correct for every mask on every device.
"""

from __future__ import annotations

import math

import torch

from ..ops.masks import normalize_mask

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional (gpu/test) dependency
    triton = None

NEG_INF = float("-inf")


if triton is not None:

    @triton.jit
    def _online_update(acc, m_i, l_i, logits, vals, PRECISION: tl.constexpr):
        """One online-softmax step over a tile of logits [BLOCK_M, BLOCK_N] and values [BLOCK_N, BLOCK_D]."""
        m_new = tl.maximum(m_i, tl.max(logits, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(logits - m_safe[:, None])
        acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals, input_precision=PRECISION, out_dtype=tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        return acc, m_new, l_i

    @triton.jit
    def _exact_tile(acc, m_i, l_i, q, k_base, v_base, keyok_row, keys, ok, rows, row_ok, dims, dim_ok,
                    stride_kn, stride_vn, n, scale,
                    CAUSAL: tl.constexpr, HAS_KEYMASK: tl.constexpr, PRECISION: tl.constexpr):
        """Exact attention of a block of query rows to a tile of tokens ``keys`` (``ok``: usable)."""
        if HAS_KEYMASK:
            ok = ok & (tl.load(keyok_row + keys, mask=keys < n, other=0) != 0)
        kt = tl.load(k_base + keys[None, :] * stride_kn + dims[:, None], mask=ok[None, :] & dim_ok[:, None], other=0.0)
        logits = tl.dot(q, kt, input_precision=PRECISION, out_dtype=tl.float32) * scale
        allowed = ok[None, :] & row_ok[:, None]
        if CAUSAL:
            allowed = allowed & (keys[None, :] <= rows[:, None])
        logits = tl.where(allowed, logits, float("-inf"))
        vt = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
        return _online_update(acc, m_i, l_i, logits, vt, PRECISION)

    @triton.jit
    def _mta_fwd_kernel(
        q_ptr, k_ptr, v_ptr, kbar_ptr, vbar_ptr, logn_ptr, sel_ptr, keyok_ptr, out_ptr,
        stride_qb, stride_qh, stride_qn,
        stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn,
        stride_sb, stride_sh, stride_sj,  # kbar / vbar [B, Hkv, nc, d] (same layout)
        stride_lb, stride_lj,  # log n_j [B, nc]
        stride_selb, stride_selh, stride_seli,  # selected chunks [B, Hq, nc, K]
        stride_ob, stride_oh, stride_on,
        n, d, nc, c, L, sinks, top_k, Hq, G, scale,
        CAUSAL: tl.constexpr, HAS_KEYMASK: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[b, h, t] = softmax over {sinks, window, selected chunks, summaries} · values."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // G
        blocks_per_chunk = tl.cdiv(c, BLOCK_M)
        i = pid_m // blocks_per_chunk
        sub = pid_m % blocks_per_chunk
        rows = i * c + sub * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = (sub * BLOCK_M + tl.arange(0, BLOCK_M) < c) & (rows < n)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < d

        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        k_base = k_ptr + b * stride_kb + hk * stride_kh
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        sel_base = sel_ptr + b * stride_selb + h * stride_selh + i * stride_seli

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if CAUSAL:
            w_lo = i - L + 1
            w_hi = i
        else:
            w_lo = i - L + 1
            w_hi = i + L - 1

        # 1. sinks not covered by an exact chunk of this query chunk
        for s0 in range(0, sinks, BLOCK_N):
            keys = s0 + tl.arange(0, BLOCK_N)
            kchunk = keys // c
            ok = (keys < sinks) & (keys < n) & ((kchunk < w_lo) | (kchunk > w_hi))
            for e in range(0, top_k):
                j_sel = tl.load(sel_base + e)
                ok = ok & (kchunk != j_sel)
            acc, m_i, l_i = _exact_tile(acc, m_i, l_i, q, k_base, v_base, keyok_ptr + b * n, keys, ok, rows, row_ok, dims,
                                        dim_ok, stride_kn, stride_vn, n, scale, CAUSAL, HAS_KEYMASK, PRECISION)

        # 2. the window chunks, then 3. the selected chunks: exact attention over their keys
        n_window = w_hi - w_lo + 1
        for e in range(0, n_window + top_k):
            if e < n_window:
                j = w_lo + e
            else:
                j = tl.load(sel_base + (e - n_window))
            if (j >= 0) & (j < nc):
                for s0 in range(0, c, BLOCK_N):
                    keys = j * c + s0 + tl.arange(0, BLOCK_N)
                    ok = (s0 + tl.arange(0, BLOCK_N) < c) & (keys < n)
                    acc, m_i, l_i = _exact_tile(acc, m_i, l_i, q, k_base, v_base, keyok_ptr + b * n, keys, ok, rows, row_ok,
                                                dims, dim_ok, stride_kn, stride_vn, n, scale, CAUSAL, HAS_KEYMASK, PRECISION)

        # 4. summaries of every other chunk causality allows
        s_hi = nc
        if CAUSAL:
            s_hi = tl.maximum(w_lo, 0)
        sb = kbar_ptr + b * stride_sb + hk * stride_sh
        vb = vbar_ptr + b * stride_sb + hk * stride_sh
        for j0 in range(0, s_hi, BLOCK_N):
            js = j0 + tl.arange(0, BLOCK_N)
            logn = tl.load(logn_ptr + b * stride_lb + js * stride_lj, mask=js < s_hi, other=float("-inf"))
            ok = (js < s_hi) & ((js < w_lo) | (js > w_hi)) & (logn > float("-inf"))
            for e in range(0, top_k):
                j_sel = tl.load(sel_base + e)
                ok = ok & (js != j_sel)
            kt = tl.load(sb + js[None, :] * stride_sj + dims[:, None], mask=ok[None, :] & dim_ok[:, None], other=0.0)
            logits = tl.dot(q, kt, input_precision=PRECISION, out_dtype=tl.float32) * scale + logn[None, :]
            logits = tl.where(ok[None, :] & row_ok[:, None], logits, float("-inf"))
            vt = tl.load(vb + js[:, None] * stride_sj + dims[None, :], mask=ok[:, None] & dim_ok[None, :], other=0.0)
            acc, m_i, l_i = _online_update(acc, m_i, l_i, logits, vt, PRECISION)

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


def _summaries(k, v, keep, c, nc, sinks):
    """Masked chunk means over non-sink, non-padded keys: kbar, vbar [B, Hkv, nc, d]; log n_j [B, nc]."""
    B, Hkv, n, d = k.shape
    npad = nc * c
    pos = torch.arange(npad, device=k.device)
    w = ((pos < n) & (pos >= sinks)).view(1, npad).expand(B, npad)
    if keep is not None:
        w = w & torch.nn.functional.pad(keep, (0, npad - n))
    w = w.view(B, nc, c).to(torch.float32)
    n_j = w.sum(-1)
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, npad - n)).view(B, Hkv, nc, c, d)
    vp = torch.nn.functional.pad(v.float(), (0, 0, 0, npad - n)).view(B, Hkv, nc, c, d)
    inv = (1.0 / n_j.clamp(min=1.0)).view(B, 1, nc, 1)
    kbar = torch.einsum("bjc,bhjcd->bhjd", w, kp) * inv
    vbar = torch.einsum("bjc,bhjcd->bhjd", w, vp) * inv
    logn = torch.where(n_j > 0, torch.log(n_j.clamp(min=1.0)), torch.full_like(n_j, NEG_INF))
    return kbar.to(k.dtype).contiguous(), vbar.to(v.dtype).contiguous(), logn.contiguous()


def _selection(q, kbar, logn, c, nc, L, top_k, causal, scale, G):
    """Top-k chunks per (b, h, i) among the summarised ones: [B, Hq, nc, K] int32, −1 padded."""
    B, Hq, n, d = q.shape
    K = min(top_k, nc)
    if K == 0:
        return torch.full((B, Hq, nc, 1), -1, dtype=torch.int32, device=q.device), 0
    npad = nc * c
    qp = torch.nn.functional.pad(q.float(), (0, 0, 0, npad - n)).view(B, Hq, nc, c, d)
    counts = (torch.arange(npad, device=q.device) < n).view(nc, c).sum(-1).clamp(min=1).view(nc, 1)
    qbar = qp.sum(3) * (scale / counts)
    kb = kbar.float().repeat_interleave(G, dim=1)  # [B, Hq, nc, d] (small: one row per chunk)
    score = qbar @ kb.transpose(-1, -2)  # [B, Hq, nc_i, nc_j]
    ii = torch.arange(nc, device=q.device).view(nc, 1)
    jj = torch.arange(nc, device=q.device).view(1, nc)
    summarised = (jj < ii - L + 1) if causal else ((jj - ii).abs() > L - 1)
    summarised = summarised & (logn > NEG_INF).view(B, 1, 1, nc)
    score = score.masked_fill(~summarised, NEG_INF)
    top = torch.sort(score, dim=-1, descending=True, stable=True)
    chosen = top.values[..., :K] > NEG_INF
    sel = torch.where(chosen, top.indices[..., :K], torch.full_like(top.indices[..., :K], -1))
    return sel.to(torch.int32).contiguous(), K


def mta_forward_triton(q, k, v, keep, *, chunk_size, causal=False, scale=None, local_chunks=1, sinks=0, top_k=0,
                       block_m=None, block_n=None):
    """Launch the fused forward. ``keep``: None or [B, n] bool key-padding flags (see
    :func:`key_padding`). Tensors on CUDA, or on the CPU under ``TRITON_INTERPRET=1``."""
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton (or the 'gpu' extra)")
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    c = min(chunk_size, n)
    nc = -(-n // c)
    L = min(local_chunks, nc)
    s = min(sinks, n)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    kbar, vbar, logn = _summaries(k, v, keep, c, nc, s)
    sel, K = _selection(q, kbar, logn, c, nc, L, top_k, causal, scale, G)
    out = torch.empty_like(q)
    BLOCK_D = max(16, triton.next_power_of_2(d))
    BLOCK_M = block_m or max(16, min(64, triton.next_power_of_2(c)))
    BLOCK_N = block_n or 64
    keyok = keep.to(torch.int8).contiguous() if keep is not None else torch.empty(1, dtype=torch.int8, device=q.device)
    grid = (nc * triton.cdiv(c, BLOCK_M), B * Hq)
    _mta_fwd_kernel[grid](
        q, k, v, kbar, vbar, logn, sel, keyok, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kbar.stride(0), kbar.stride(1), kbar.stride(2),
        logn.stride(0), logn.stride(1),
        sel.stride(0), sel.stride(1), sel.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        n, d, nc, c, L, s, K, Hq, G, scale,
        CAUSAL=bool(causal), HAS_KEYMASK=keep is not None,
        # fp32 inputs: full-precision products (TF32 would cost ~1e-3 relative accuracy)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    return out
