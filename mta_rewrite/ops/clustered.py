"""Clustered summaries (MTA_SPEC.md, "Grouping strategies": learned clustering of keys).

Non-causal attention only. ``centroids`` [Hkv, K, d]: per key/value head, K centroids fitted on
calibration keys (``calibration/cluster.py``). Every key belongs to its nearest centroid
(squared Euclidean distance; ties to the lower index). A query in chunk i (fixed chunks of c)
attends exactly to its window (chunks j with |j − i| ≤ L−1) and the first ``sinks`` tokens, as in
the spec; everything else is summarised **by cluster instead of by position**: for each centroid
m, the keys of cluster m outside the window (not sinks, allowed by the key-padding mask) form one
summary, their mean key and value with logit scale·q·k̄ + log n (n: their count; an empty cluster
is left out). So a distant region that holds several topics gives one summary per topic, and
one topic spread over the sequence gives one summary, not one per chunk.

How it runs: each key's one-hot cluster membership, summed per chunk ([nc, K] sums of keys,
values and counts), the sequence's totals minus the window's chunks give every query chunk's K
summaries; then one key set per chunk, [window keys | sinks | K summaries], through the same
fused attention call as the chunked implementation, band by band like it (each band's key sets
under ``chunked._BAND_BYTES`` on the CPU). Cost per query: (2L−1)·c + sinks + K keys; memory
O(nc·K·d) and one band's key sets. Masks: none or key padding (a mask that varies per query, or carries a bias,
is refused: which keys a summary holds would differ per query); no top-k; no boundary chunks or
learned weights with it. On CUDA, for no mask or key padding in fp16/bf16/fp32, the Triton kernels
run instead (``kernels/clusters.py``: the same assignment and summaries, then the fused forward;
``kernels/mta_bwd.py`` for the gradients).
"""

from __future__ import annotations

import math

import torch

from .chunked import (EMPTY_ROW_LSE, NEG, _attention_with_lse, _compute_dtype, _memory_bands, _pad_tokens,
                      _window_into, _window_offsets)
from .layout import in_layout_of
from .masks import normalize_mask


def check_clustered(centroids, q, k, attn_mask, causal, top_k, summary_weight, segment_ids) -> None:
    """One-line errors for what clustered summaries do not take."""
    Hkv, d = k.shape[1], k.shape[3]
    if centroids.dim() != 3 or centroids.shape[0] != Hkv or centroids.shape[2] != d or centroids.shape[1] < 1:
        raise ValueError(f"centroids must be [Hkv, K, d] = [{Hkv}, K ≥ 1, {d}]; got {tuple(centroids.shape)}")
    if not centroids.is_floating_point() or centroids.device != q.device:
        raise ValueError(f"centroids must be a float tensor on {q.device}; got {centroids.dtype} on {centroids.device}")
    if causal:
        raise ValueError("clustered summaries (centroids) are for non-causal attention: a cluster's summary would "
                         "mix past and future keys")
    if top_k or summary_weight is not None or segment_ids is not None:
        raise ValueError("clustered summaries (centroids) take no top_k, summary_weight or segment_ids")
    mask = normalize_mask(attn_mask, q.shape[0], q.shape[1], q.shape[2])
    if mask is not None and (mask.per_query or mask.bias is not None):
        raise ValueError("clustered summaries (centroids) take no mask or a key-padding mask (one that is the same "
                         "for every query and carries no bias)")


# Keys are assigned in blocks of this many rows: each block's [rows, K] scores stay in cache
# between the product and the argmax (8192 keys, 12 heads, K = 128, d = 32 on this CPU: 16 ms
# instead of 30 for all rows at once).
ASSIGN_ROWS = 256


def assign_clusters(k: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, n] index of each key's nearest centroid (squared distance, ties to the lower index)."""
    B, H, n, d = k.shape
    c = centroids.to(k.dtype)
    # argmin ‖k − μ‖² = argmax k·μ − ‖μ‖²/2 (‖k‖² is the same for every μ): one fused product
    half = (-0.5 * (c * c).sum(-1)).unsqueeze(1).repeat(B, 1, 1)  # [B·H, 1, K]
    ct = c.transpose(1, 2).repeat(B, 1, 1)  # [B·H, d, K]
    keys = k.reshape(B * H, n, d)
    out = torch.empty(B * H, n, dtype=torch.long, device=k.device)
    for start in range(0, n, ASSIGN_ROWS):
        rows = slice(start, start + ASSIGN_ROWS)
        out[:, rows] = torch.baddbmm(half, keys[:, rows], ct).argmax(-1)
    return out.view(B, H, n)


def outside_window(x: torch.Tensor, L: int) -> torch.Tensor:
    """x [B, H, nc, ...] per chunk → [B, H, nc, ...]: for each chunk i, the sum of x over the chunks
    j outside its window (|j − i| > L−1, non-causal): the whole sequence's sum minus the window's.
    The relation is symmetric, so this is also, for each chunk j, the sum over the query chunks
    whose window leaves j out: the summaries' totals in the forward, their gradients' in the
    Triton backward (``kernels/mta_bwd.py``)."""
    nc = x.shape[2]
    window = x
    if L > 1:
        window = x.clone()
        for o in _window_offsets(L, causal=False):
            if o == 0:
                continue
            dst = slice(max(0, -o), nc - max(0, o))
            src = slice(max(0, o), nc - max(0, -o))
            window[:, :, dst] += x[:, :, src]
    return x.sum(2, keepdim=True) - window


def summaries_per_query_chunk(ck, cv, cn, L: int):
    """Each query chunk's cluster summaries from per-chunk cluster sums ``ck``, ``cv`` [B, H, nc,
    K, d] and counts ``cn`` [B, H, nc, K] (non-causal): the sequence's totals minus the window's
    chunks i−L+1 … i+L−1, as (k̄, v̄ [B, H, nc, K, d], count [B, H, nc, K]); a mean over no key
    (count 0) is 0. Shared by the portable implementation and the CUDA kernels' launcher."""
    count = outside_window(cn, L)  # each query chunk's summarised keys per cluster
    inv = (1.0 / count.clamp(min=1.0)).unsqueeze(-1)
    return outside_window(ck, L).mul_(inv), outside_window(cv, L).mul_(inv), count


def mta_attention_clustered(q, k, v, attn_mask=None, *, chunk_size, scale=None, local_chunks=1, sinks=0,
                            centroids, softcap: float = 0.0) -> torch.Tensor:
    """Clustered-summary MTA (see the module docstring); ``attn_mask`` None or key padding.
    Differentiable in q, k and v (the cluster choice is piecewise constant). ``softcap``: logits
    soft-capped (``chunked.soft_capped``)."""
    B, Hq, n, d = q.shape
    Hkv = k.shape[1]
    q_in = q
    cdt = _compute_dtype(q.dtype)
    q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    mu = centroids.to(cdt)
    dev = q.device
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    c = min(chunk_size, n)
    nc = -(-n // c)
    npad = nc * c
    L = min(local_chunks, nc)
    s = min(sinks, n)
    K = mu.shape[1]

    mask = normalize_mask(attn_mask, B, Hq, n)
    G = Hq // Hkv
    if G > 1 and mask is not None and mask.per_head:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        mu = mu.repeat_interleave(G, dim=0)
        Hkv, G = Hq, 1
    T = G * c
    pos = torch.arange(npad, device=dev)
    keep = (pos < n) & (pos >= s)  # keys that may enter a summary
    allowed = None
    if mask is not None:
        allowed = _pad_tokens(mask.allowed[:, :, 0].to(dev), npad, 2)  # [Bm, Hm, npad]; pad keys forbidden
        keep = keep & allowed
    keep = keep.expand(B, Hkv, npad) if keep.dim() == 3 else keep.view(1, 1, npad).expand(B, Hkv, npad)

    kp, vp = _pad_tokens(k, npad, 2).contiguous(), _pad_tokens(v, npad, 2).contiguous()
    kc, vc = kp.view(B, Hkv, nc, c, d), vp.view(B, Hkv, nc, c, d)
    # per chunk and cluster: sums of keys and values and counts, [B, Hkv, nc, K(, d)], by one
    # index_add over the tokens (row (b, h, chunk, cluster); excluded keys go to a last, dropped row)
    rows = B * Hkv * nc * K
    bh = torch.arange(B * Hkv, device=dev).view(B, Hkv, 1)
    idx = (bh * nc + pos // c) * K + assign_clusters(kp, mu)
    idx = torch.where(keep, idx, rows).flatten()
    ck = kp.new_zeros(rows + 1, d).index_add_(0, idx, kp.view(-1, d))[:rows].view(B, Hkv, nc, K, d)
    cv = vp.new_zeros(rows + 1, d).index_add_(0, idx, vp.view(-1, d))[:rows].view(B, Hkv, nc, K, d)
    cn = torch.bincount(idx, minlength=rows + 1)[:rows].view(B, Hkv, nc, K).to(cdt)

    kbar, vbar, count = summaries_per_query_chunk(ck, cv, cn, L)
    # (a count rounds to exactly an integer: 0.5 separates empty clusters from the rest)
    term_summary = torch.where(count > 0.5, torch.log(count.clamp(min=1.0)), NEG)

    # ---- per-chunk terms [B, Hkv, nc, X] of the key sets: window chunks | sinks | K summaries ---
    offsets = _window_offsets(L, causal=False)
    W = len(offsets)
    X = W * c + s + K
    term = torch.full((B, Hkv, nc, X), NEG, dtype=cdt, device=dev)
    key_ok = (pos < n) if allowed is None else (allowed & (pos < n))  # [npad] or [Bm, Hm, npad]
    key_ok = key_ok.expand(B, Hkv, npad) if key_ok.dim() == 3 else key_ok.view(1, 1, npad).expand(B, Hkv, npad)
    key_ok = key_ok.reshape(B, Hkv, nc, c)
    ii = torch.arange(nc, device=dev)
    sink_chunk = torch.arange(s, device=dev) // c
    for slot, o in enumerate(offsets):
        dst = slice(max(0, -o), nc - max(0, o))
        src = slice(max(0, o), nc - max(0, -o))
        term[:, :, dst, slot * c:(slot + 1) * c] = torch.where(key_ok[:, :, src], 0.0, NEG).to(cdt)
    if s > 0:
        in_window = (sink_chunk.view(1, s) - ii.view(nc, 1)).abs() <= L - 1  # [nc, s]: already exact
        ok = key_ok.reshape(B, Hkv, npad)[:, :, :s].unsqueeze(2) & ~in_window
        term[:, :, :, W * c:W * c + s] = torch.where(ok, 0.0, NEG).to(cdt)
    term[:, :, :, W * c + s:] = term_summary

    if G == 1 and npad == n:
        q_rows = q.reshape(B * Hkv, nc, T, d)
    else:
        q_rows = _pad_tokens(q, npad, 2).view(B, Hkv, G, nc, c, d).transpose(2, 3).reshape(B * Hkv, nc, T, d)
    # key sets [B, Hkv, nb, X, d] band by band, under the CPU's memory bound (chunked._memory_bands)
    out = torch.empty(B * Hkv, nc, T, d, dtype=cdt, device=dev)
    lse = torch.empty(B * Hkv, nc, T, dtype=cdt, device=dev)
    for lo_c, hi_c in _memory_bands(0, nc, B * Hkv * X * (d + (2 * T if softcap else 0)) * cdt.itemsize, dev):
        nb = hi_c - lo_c
        k_set = torch.empty(B, Hkv, nb, X, d, dtype=cdt, device=dev)
        v_set = torch.empty(B, Hkv, nb, X, d, dtype=cdt, device=dev)
        _window_into(k_set[:, :, :, :W * c], v_set[:, :, :, :W * c], kc, vc, offsets, lo_c, hi_c)
        if s > 0:
            k_set[:, :, :, W * c:W * c + s] = k[:, :, :s].unsqueeze(2)
            v_set[:, :, :, W * c:W * c + s] = v[:, :, :s].unsqueeze(2)
        k_set[:, :, :, W * c + s:] = kbar[:, :, lo_c:hi_c]
        v_set[:, :, :, W * c + s:] = vbar[:, :, lo_c:hi_c]
        out[:, lo_c:hi_c], lse[:, lo_c:hi_c] = _attention_with_lse(
            q_rows[:, lo_c:hi_c], k_set.view(B * Hkv, nb, X, d), v_set.view(B * Hkv, nb, X, d),
            term.view(B * Hkv, nc, 1, X)[:, lo_c:hi_c], scale, softcap)
    out = out.view(B, Hkv, nc, G, c, d).transpose(2, 3).reshape(B, Hkv * G, npad, d)
    empty = (lse <= EMPTY_ROW_LSE).view(B, Hkv, nc, G, c).transpose(2, 3).reshape(B, Hkv * G, npad, 1)
    out = out.masked_fill(empty, 0.0)
    out = out if npad == n else out[:, :, :n]
    return in_layout_of(q_in, out)
