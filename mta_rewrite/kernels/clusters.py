"""The pre-pass of clustered summaries on NVIDIA GPUs (Triton): what ``_chunk_mean_kernel`` is to
chunk summaries (``mta_fwd.py``), for the spec's learned clustering of keys (``ops/clustered.py``).

Two launches, then torch:

1. ``_nearest_kernel``: every key's cluster, ids[b, h, s] = argmin_m ‖k_s − μ_m‖²
   = argmax_m (k_s·μ_m − ‖μ_m‖²/2), in fp32 (the portable implementation's formula and
   precision), ties to the lower index; one program per block of tokens, the centroids in tiles.
2. ``_cluster_sums_kernel``: per chunk j and cluster m, S_jm = Σ_s w_s·[id_s = m]·k_s (and v, and
   the count n_jm = Σ_s w_s·[id_s = m]) with w_s = 1 for the keys a summary may hold (real, not
   sinks, not padded: ``_pooled_tokens``), as one product onehotᵀ·k per tile of the chunk (exact
   0/1 weights, fp32 accumulation); one program per chunk, (batch, head) and tile of clusters.
3. torch (``ops.clustered.summaries_per_query_chunk``, shared with the portable implementation):
   each query chunk i's summaries k̄_im = (Σ_j S_jm − Σ_{|j−i|≤L−1} S_jm) / count_im, and
   log2 count_im (−inf: nothing left to summarise), laid out as rows i·K + m for the main kernel.

The Triton backward (``mta_bwd.py``, CLUSTERED) runs the same pre-pass again and takes each key's
cluster and the counts from it (:class:`ClusterSummaries`) to spread the summaries' gradients.

Memory: the sums and the per-query-chunk summaries are [B, Hkv, nc, K, d] (fp32 for the sums):
O(nc·K·d) per head, as in the portable implementation, e.g. 8M elements per head at nc = K = 256,
d = 128. The main kernel (``_mta_fwd_kernel`` with CLUSTERED) then streams, per block of queries,
its sinks and window exactly and its query chunk's K summaries.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops.clustered import summaries_per_query_chunk
from .mta_fwd import _batch_and_head, _cdiv, _pooled_tokens, _pow2, _wide, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _nearest_kernel(k_ptr, mu_ptr, ids_ptr, stride_kb, stride_kh, stride_kn, stride_mh, stride_mk, n, H, K,
                        HEAD_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        WIDE: tl.constexpr):
        """ids[b, h, s] = argmax_m k_s·μ_m − ‖μ_m‖²/2 over the centroids μ [H, K, d] (fp32), the
        lowest m among equals; a running maximum over tiles of BLOCK_K centroids."""
        pid_bh = tl.program_id(1)
        b, h = _batch_and_head(pid_bh, H, WIDE)
        toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        tok_ok = toks < n
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_D
        x = tl.load(k_ptr + b * stride_kb + h * stride_kh + toks[:, None] * stride_kn + dims[None, :],
                    mask=tok_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
        best = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        arg = tl.zeros([BLOCK_T], dtype=tl.int32)
        for m0 in range(0, K, BLOCK_K):
            ms = m0 + tl.arange(0, BLOCK_K)
            m_ok = ms < K
            mu = tl.load(mu_ptr + h * stride_mh + ms[:, None] * stride_mk + dims[None, :],
                         mask=m_ok[:, None] & dim_ok[None, :], other=0.0)
            score = tl.dot(x, tl.trans(mu), input_precision="ieee", out_dtype=tl.float32)
            score = tl.where(m_ok[None, :], score - 0.5 * tl.sum(mu * mu, 1)[None, :], float("-inf"))
            tile_best = tl.max(score, 1)
            tile_arg = tl.argmax(score, 1, tie_break_left=True).to(tl.int32) + m0
            better = tile_best > best  # strictly: an equal score keeps the lower index of an earlier tile
            arg = tl.where(better, tile_arg, arg)
            best = tl.where(better, tile_best, best)
        tl.store(ids_ptr + pid_bh.to(tl.int64) * n + toks, arg, mask=tok_ok)

    @triton.jit
    def _cluster_sums_kernel(k_ptr, v_ptr, ids_ptr, keyok_ptr, ck_ptr, cv_ptr, cn_ptr,
                             stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                             stride_sb, stride_sh, stride_sj, stride_sm,  # ck / cv [B, H, nc, K, d] fp32
                             stride_nb, stride_nh, stride_nj,  # cn [B, H, nc, K] fp32
                             n, c, sinks, H, K,
                             HAS_KEYMASK: tl.constexpr, PRECISION: tl.constexpr, HEAD_D: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr):
        """ck[b, h, j, m] = Σ_s w_s·[ids[b, h, s] = m]·k[b, h, s] over the tokens s of chunk j
        (w_s: _pooled_tokens), cv likewise, cn[b, h, j, m] = Σ_s w_s·[ids[b, h, s] = m]; the
        clusters m of this program's tile."""
        j = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b, h = _batch_and_head(pid_bh, H, WIDE)
        ms = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        m_ok = ms < K
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_D
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        ids_row = ids_ptr + pid_bh.to(tl.int64) * n
        acc_k = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        acc_v = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        count = tl.zeros([BLOCK_K], dtype=tl.float32)
        for s0 in range(0, c, BLOCK_C):
            pos, w = _pooled_tokens(keyok_ptr + b * n, j * c, tl.minimum(j * c + c, n), sinks, s0, HAS_KEYMASK, BLOCK_C)
            ids = tl.load(ids_row + pos, mask=w, other=-1)
            member = ids[None, :] == ms[:, None]  # [BLOCK_K, BLOCK_C]; −1 (not pooled) matches no cluster
            x = tl.load(k_base + pos[:, None] * stride_kn + dims[None, :], mask=w[:, None] & dim_ok[None, :], other=0.0)
            y = tl.load(v_base + pos[:, None] * stride_vn + dims[None, :], mask=w[:, None] & dim_ok[None, :], other=0.0)
            onehot = member.to(x.dtype)  # 0 / 1: exact in every dtype, so the products are too
            acc_k += tl.dot(onehot, x, input_precision=PRECISION, out_dtype=tl.float32)
            acc_v += tl.dot(onehot, y, input_precision=PRECISION, out_dtype=tl.float32)
            count += tl.sum(member.to(tl.float32), 1)
        at = b * stride_sb + h * stride_sh + j * stride_sj + ms[:, None] * stride_sm + dims[None, :]
        tl.store(ck_ptr + at, acc_k, mask=m_ok[:, None] & dim_ok[None, :])
        tl.store(cv_ptr + at, acc_v, mask=m_ok[:, None] & dim_ok[None, :])
        tl.store(cn_ptr + b * stride_nb + h * stride_nh + j * stride_nj + ms, count, mask=m_ok)


def nearest_clusters(k, centroids, block_t: int = 32, block_k: int = 32):
    """[B, H, n] int32 index of each key's nearest centroid (``_nearest_kernel``); ``centroids``
    [H, K, d]. The same choice as ``ops.clustered.assign_clusters`` up to the order of fp32 sums.
    32 × 32 tiles: the fp32 products (no tensor cores) of 64 tokens spill at d = 128 (255
    registers, 664 stack bytes on sm_90); 32 tokens take 80 registers and no spills."""
    B, H, n, d = k.shape
    K = centroids.shape[1]
    mu = centroids.float().contiguous()
    ids = torch.empty(B, H, n, dtype=torch.int32, device=k.device)
    block_d = max(16, _pow2(d))
    _nearest_kernel[(_cdiv(n, block_t), B * H)](
        k, mu, ids, *k.stride()[:3], *mu.stride()[:2], n, H, K,
        HEAD_D=d, BLOCK_T=block_t, BLOCK_K=min(block_k, max(16, _pow2(K))), BLOCK_D=block_d, WIDE=_wide(k),
        num_warps=4)
    return ids


class ClusterSummaries(NamedTuple):
    """What the pre-pass gives the main kernels: each query chunk's K summaries, rows i·K + m
    (``kbar``, ``vbar`` [B, H, nc·K, d] in k's dtype, ``logn`` [B, H, nc·K] fp32 log2 of their
    counts, −inf for a cluster with nothing outside chunk i's window), and for the backward each
    key's cluster (``ids`` [B, H, n] int32) and the counts (``count`` [B, H, nc, K] fp32)."""

    kbar: torch.Tensor
    vbar: torch.Tensor
    logn: torch.Tensor
    ids: torch.Tensor
    count: torch.Tensor


def cluster_summaries(k, v, keyok, centroids, c: int, nc: int, L: int, sinks: int, block_k: int = 32):
    """Each query chunk's clustered summaries (:class:`ClusterSummaries`). ``keyok``: None or
    [B, n] int8 key-padding flags."""
    B, H, n, d = k.shape
    K = centroids.shape[1]
    ids = nearest_clusters(k, centroids)
    ck = torch.empty(B, H, nc, K, d, dtype=torch.float32, device=k.device)
    cv = torch.empty_like(ck)
    cn = torch.empty(B, H, nc, K, dtype=torch.float32, device=k.device)
    block_k = min(block_k, max(16, _pow2(K)))
    _cluster_sums_kernel[(nc, B * H, _cdiv(K, block_k))](
        k, v, ids, keyok if keyok is not None else ids, ck, cv, cn,
        *k.stride()[:3], *v.stride()[:3], *ck.stride()[:4], *cn.stride()[:3],
        n, c, sinks, H, K,
        HAS_KEYMASK=keyok is not None, PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
        HEAD_D=d, BLOCK_C=min(64, max(16, _pow2(c))), BLOCK_K=block_k, BLOCK_D=max(16, _pow2(d)),
        WIDE=_wide(k, v, ck), num_warps=4)
    kbar, vbar, count = summaries_per_query_chunk(ck, cv, cn, L)
    logn = torch.where(count > 0.5, torch.log2(count.clamp(min=1.0)), float("-inf"))  # counts are integers
    return ClusterSummaries(kbar.to(k.dtype).reshape(B, H, nc * K, d).contiguous(),
                            vbar.to(v.dtype).reshape(B, H, nc * K, d).contiguous(),
                            logn.reshape(B, H, nc * K).contiguous(), ids, count)
