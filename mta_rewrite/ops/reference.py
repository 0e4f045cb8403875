"""A float64 implementation of MTA that follows MTA_SPEC.md literally, for tests only.

It loops over batches, heads, query chunks, key chunks and queries, and writes down each rule
of the spec where it applies (for each query, the keys it attends exactly are listed one by one
by step 1's rules; their logits are then one product). Python loops: small shapes only. It
shares no code with the efficient implementation beyond the mask convention in ``masks.py``.
"""

from __future__ import annotations

import math

import torch

from .masks import forbidden_threshold


def _dense_mask(attn_mask, B, Hq, n):
    """(allowed, bias) as dense float64/bool [B, Hq, n, n] tensors."""
    allowed = torch.ones(B, Hq, n, n, dtype=torch.bool)
    bias = torch.zeros(B, Hq, n, n, dtype=torch.float64)
    if attn_mask is None:
        return allowed, bias
    m = attn_mask.cpu()
    if m.dtype == torch.bool:
        return allowed & m.expand(B, Hq, n, n), bias
    ok = m > forbidden_threshold(m.dtype)
    allowed = allowed & ok.expand(B, Hq, n, n)
    bias = torch.where(ok, m.double(), torch.zeros((), dtype=torch.float64)).expand(B, Hq, n, n)
    return allowed, bias


def chunk_lists(n, c, sinks=0, segment_ids=None) -> list[list[int]]:
    """The chunks of one sequence as token lists. Fixed: c tokens each. Boundary (``segment_ids``,
    a list of n ids): the first ``sinks`` tokens in fixed chunks of c, the last ending at ``sinks``;
    after them a chunk ends where the id changes or when it holds c tokens."""
    s = min(sinks, n)
    chunks, cur = [], []
    for t in range(n):
        if segment_ids is None or t < s:
            new = t % c == 0
        elif t == s:
            new = True
        else:
            new = segment_ids[t] != segment_ids[t - 1] or len(cur) == c
        if new and cur:
            chunks.append(cur)
            cur = []
        cur.append(t)
    chunks.append(cur)
    return chunks


def mta_attention_reference(
    q, k, v, attn_mask=None, *, chunk_size, causal=False, scale=None, local_chunks=1, sinks=0, top_k=0,
    summary_weight=None, segment_ids=None, centroids=None, softcap=0.0,
):
    """MTA_SPEC.md, step by step, in float64. Returns a float64 tensor shaped like q.
    ``summary_weight`` [Hkv, d]: learned summaries (a summary weighs its kept keys s by
    softmax_s(k_s·w) instead of taking their mean). ``segment_ids`` [B|1, n]: boundary chunks
    (:func:`chunk_lists`). ``centroids`` [Hkv, K, d]: clustered summaries (non-causal; every key
    outside the window in one summary per nearest centroid, ``ops/clustered.py``). ``softcap`` > 0:
    the product term of every logit (key or summary) becomes softcap·tanh(term / softcap) before
    the mask's value and log n_j are added (docs/op.md); top-k ranks by the uncapped score (tanh is
    increasing: the same order)."""
    q, k, v = q.detach().double().cpu(), k.detach().double().cpu(), v.detach().double().cpu()
    sw = None if summary_weight is None else summary_weight.detach().double().cpu()
    cent = None if centroids is None else centroids.detach().double().cpu()
    B, Hq, n, d = q.shape
    G = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    c, L = chunk_size, local_chunks

    def cap(x):
        return softcap * torch.tanh(x / softcap) if softcap else x

    allowed, bias = _dense_mask(attn_mask, B, Hq, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    out = torch.zeros(B, Hq, n, d, dtype=torch.float64)
    pooled = {}

    def pool(b, hk, kept):
        """(k̄, v̄) of the keys ``kept``: their mean, or with learned summaries their average
        weighted by softmax(k_s·w). The same keys give the same summary for every query head of
        the group and every query chunk: computed once."""
        key = (b, hk, tuple(kept))
        if key not in pooled:
            if sw is None:
                pooled[key] = (k[b, hk, kept].mean(0), v[b, hk, kept].mean(0))
            else:
                a = torch.softmax(k[b, hk, kept] @ sw[hk], dim=0)
                pooled[key] = (a @ k[b, hk, kept], a @ v[b, hk, kept])
        return pooled[key]

    for b in range(B):
        seg = None if segment_ids is None else segment_ids[b if segment_ids.shape[0] > 1 else 0].tolist()
        chunks = chunk_lists(n, c, sinks, seg)
        nc = len(chunks)
        chunk_of = {t: j for j, toks in enumerate(chunks) for t in toks}.__getitem__
        for h in range(Hq):
            hk = h // G
            A, Bias = allowed[b, h], bias[b, h]
            ok, bias_ts = A.tolist(), Bias.tolist()  # ok[t][s]: may query t see key s (mask and causality)
            for i in range(nc):
                queries = chunks[i]
                window = {j for j in range(nc) if ((i - L + 1 <= j <= i) if causal else abs(j - i) <= L - 1)}
                exact_chunks = set(window)
                summaries = {}  # j -> (kbar, vbar, logit offset)
                if cent is not None:  # one summary per cluster of the keys outside the window
                    nearest = ((k[b, hk][:, None, :] - cent[hk][None]) ** 2).sum(-1).argmin(-1).tolist()
                    for m in range(cent.shape[1]):
                        kept = [s for s in range(n) if s >= sinks and chunk_of(s) not in window and nearest[s] == m
                                and ok[queries[0]][s]]
                        if kept:
                            summaries[("cluster", m)] = (k[b, hk, kept].mean(0), v[b, hk, kept].mean(0), math.log(len(kept)))
                for j in range(nc if cent is None else 0):
                    if j in window or (causal and j > i):
                        continue
                    keys = [s for s in chunks[j] if s >= sinks]
                    if not keys:
                        continue
                    block_ok = [[ok[t][s] for s in keys] for t in queries]
                    uniform = all(row == block_ok[0] for row in block_ok)
                    values = {bias_ts[t][s] for t in queries for s in keys if ok[t][s]} if uniform else None
                    if not uniform or len(values) > 1:
                        exact_chunks.add(j)  # the mask varies inside the block: exact
                        continue
                    kept = [s for s, allowed_s in zip(keys, block_ok[0]) if allowed_s]
                    if not kept:
                        continue  # n_j = 0: left out
                    kbar, vbar = pool(b, hk, kept)
                    offset = math.log(len(kept)) + (values.pop() if values else 0.0)
                    summaries[j] = (kbar, vbar, offset)
                if top_k > 0 and summaries:
                    qbar = q[b, h, queries].mean(0)
                    score = {j: float(scale * qbar @ summaries[j][0]) for j in summaries}
                    for j in sorted(summaries, key=lambda j: (-score[j], j))[:top_k]:
                        exact_chunks.add(j)
                        del summaries[j]
                # the summaries as rows: [k̄_j], [v̄_j], and each logit's offset (log n_j + the mask's value)
                kbars = torch.stack([kbar for kbar, _, _ in summaries.values()]) if summaries else k.new_zeros(0, d)
                vbars = torch.stack([vbar for _, vbar, _ in summaries.values()]) if summaries else k.new_zeros(0, d)
                offsets = torch.tensor([offset for _, _, offset in summaries.values()], dtype=torch.float64)
                for t in queries:
                    exact = [s for s in range(n) if (chunk_of(s) in exact_chunks or s < sinks) and ok[t][s]]
                    logits = torch.cat([cap(scale * (k[b, hk, exact] @ q[b, h, t])) + Bias[t, exact],
                                        cap(scale * (kbars @ q[b, h, t])) + offsets])
                    if not logits.numel():
                        continue  # nothing to attend to: zeros
                    p = torch.softmax(logits, dim=0)
                    out[b, h, t] = p @ torch.cat([v[b, hk, exact], vbars])
    return out
