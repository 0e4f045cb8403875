"""Boundary chunks without padding slots (``ops/varlen.py``): against the float64 reference, which
chunks token by token, against the padded-slot path on the same inputs, and the op's choice
between them."""

from __future__ import annotations

import importlib

import pytest
import torch

import mta_rewrite  # noqa: F401  (registers torch.ops.mta.attention)
from mta_rewrite.ops import mta_attention_reference
from mta_rewrite.ops.chunked import mta_attention_chunked
from mta_rewrite.ops.segments import segmented
from mta_rewrite.ops.varlen import mta_attention_varlen

from .test_attention import make_mask, qkv
from .test_segments import segments

mta = torch.ops.mta.attention
attention_module = importlib.import_module("mta_rewrite.ops.attention")  # the package exports the op under that name
F64 = torch.float64
# (c, L, sinks): c = 1, sinks beyond the first chunk, windows of 2–3 chunks, c > n
CONFIGS = [(4, 1, 0), (3, 2, 2), (5, 1, 7), (1, 1, 0), (100, 1, 0), (2, 3, 1), (6, 2, 12)]


def key_padding(B, n, empty_row=False):
    pad = make_mask("key_padding_bool", B, 1, n)
    if empty_row:
        pad = pad.clone()
        pad[-1] = False  # a sequence with no key at all: its rows give zeros
    return pad


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "empty_sequence", "causal_padding_4d_min"])
@pytest.mark.parametrize("block", [1, 3, 16, None])
def test_matches_reference(causal, mask_kind, block):
    """GQA, three sequences chunked differently, every block size against chunks of 1–100 tokens."""
    B, Hq, Hkv, n = 3, 4, 2, 31
    q, k, v = qkv(B, Hq, Hkv, n)
    if mask_kind == "causal_padding_4d_min":
        mask = make_mask(mask_kind, B, Hq, n)  # the op reads it as key padding ∧ causality
    else:
        mask = None if mask_kind == "none" else key_padding(B, n, mask_kind == "empty_sequence")
    ids = segments(B, n, rate=0.25)
    for c, L, s in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s)
        ref = mta_attention_reference(q, k, v, mask, segment_ids=ids, **kw)
        if mask_kind != "causal_padding_4d_min":
            out = mta_attention_varlen(q, k, v, mask, ids, block=block, **kw)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kw}: {m}")
        torch.testing.assert_close(mta(q, k, v, mask, None, ids, **kw), ref, rtol=1e-10, atol=1e-10)
    if mask_kind == "empty_sequence":
        assert mta(q, k, v, mask, None, ids, chunk_size=4, causal=causal)[-1].abs().max() == 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "empty_sequence"])
def test_pieces_of_one_block_match_reference(one_chunk_bands, causal, mask_kind):
    """Each band's key sets built one query block at a time (the CPU's memory bound): the window
    tokens, sinks, summaries and mask of every piece, and the gradients."""
    B, Hq, Hkv, n = 3, 4, 2, 31
    q, k, v = qkv(B, Hq, Hkv, n, seed=4)
    mask = None if mask_kind == "none" else key_padding(B, n, mask_kind == "empty_sequence")
    ids = segments(B, n, rate=0.25)
    for c, L, s in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s)
        ref = mta_attention_reference(q, k, v, mask, segment_ids=ids, **kw)
        for block in (3, None):
            out = mta_attention_varlen(q, k, v, mask, ids, block=block, **kw)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kw}: {m}")
    q, k, v = (x[:2, :2, :11, :4].detach().clone().requires_grad_() for x in (q, k, v))
    w = torch.randn(Hkv, 4, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    mask = None if mask is None else mask[:2, ..., :11]
    kw = dict(chunk_size=3, causal=causal, local_chunks=2, sinks=2, block=3)
    assert torch.autograd.gradcheck(lambda q, k, v, w: mta_attention_varlen(q, k, v, mask, ids[:2, :11], summary_weight=w,
                                                                             **kw), (q, k, v, w))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding"])
def test_rows_from_leaves_the_blocks_before_it_uncomputed(causal, mask_kind):
    """``rows_from=r`` (use_mta's prompts continued over a cache, boundary chunks on the CPU): the
    rows of the query block holding r and after are the reference's, the blocks wholly before it
    zeros (not computed, though the reference's rows there are not); through the op's boundary
    implementation too (``attention_autograd``), and for many small fixed chunks in query blocks."""
    from mta_rewrite.ops.attention import attention_autograd

    B, Hq, Hkv, n = 3, 4, 2, 31
    q, k, v = qkv(B, Hq, Hkv, n)
    mask = None if mask_kind == "none" else key_padding(B, n)
    ids = segments(B, n, rate=0.25)
    kw = dict(chunk_size=3, causal=causal, local_chunks=2, sinks=2)
    ref = mta_attention_reference(q, k, v, mask, segment_ids=ids, **kw)
    for block, rows_from in ((4, 1), (4, 13), (5, 30), (16, 16)):
        out = mta_attention_varlen(q, k, v, mask, ids, block=block, rows_from=rows_from, **kw)
        first = rows_from // block * block
        torch.testing.assert_close(out[:, :, first:], ref[:, :, first:], rtol=1e-10, atol=1e-10)
        assert torch.all(out[:, :, :first] == 0) and (first == 0 or ref[:, :, :first].abs().max() > 0)
    n = 200  # through the op's implementation: blocks of 64 for c = 3
    q, k, v = qkv(B, Hq, Hkv, n)
    mask = None if mask_kind == "none" else key_padding(B, n)
    ids = segments(B, n, rate=0.25)
    got = attention_autograd(q, k, v, mask, None, ids, rows_from=150, **kw)
    ref = mta_attention_reference(q, k, v, mask, segment_ids=ids, **kw)
    torch.testing.assert_close(got[:, :, 128:], ref[:, :, 128:], rtol=1e-10, atol=1e-10)
    assert torch.all(got[:, :, :128] == 0)
    n = 600  # c = 2 over 600 tokens: fixed chunks run in query blocks of 64 (blocks_beat_chunks)
    q, k, v = qkv(1, 2, 1, n)
    kw = dict(chunk_size=2, causal=causal, local_chunks=2, sinks=1)
    got = attention_autograd(q, k, v, rows_from=300, **kw)
    ref = mta_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(got[:, :, 256:], ref[:, :, 256:], rtol=1e-10, atol=1e-10)
    assert torch.all(got[:, :, :256] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_learned_summaries_shared_ids_and_fp32(causal):
    """Learned summaries, one [1, n] id row for the whole batch, fp32 inputs (the fused CPU kernel)."""
    B, Hq, Hkv, n = 2, 6, 2, 45
    q, k, v = qkv(B, Hq, Hkv, n, seed=2)
    w = torch.randn(Hkv, 8, dtype=F64, generator=torch.Generator().manual_seed(3))
    ids = segments(1, n, rate=0.15)
    mask = key_padding(B, n)
    for c, L, s in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s)
        ref = mta_attention_reference(q, k, v, mask, summary_weight=w, segment_ids=ids, **kw)
        out = mta_attention_varlen(q, k, v, mask, ids, summary_weight=w, block=8, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        q32, k32, v32, w32 = (x.float() for x in (q, k, v, w))
        out32 = mta(q32, k32, v32, mask, w32, ids, **kw)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)


def test_agrees_with_the_padded_slots():
    """The same function as the slots compute it (they remain the path of the CUDA kernels), top-k included."""
    B, Hq, Hkv, n = 2, 4, 1, 150
    q, k, v = qkv(B, Hq, Hkv, n, d=16, dtype=torch.float32, seed=7)
    ids = segments(B, n, rate=0.1)
    for causal in (False, True):
        for c, L, s, top_k in [(8, 1, 4, 0), (16, 2, 0, 0), (32, 1, 16, 0), (8, 1, 4, 2), (16, 2, 0, 1)]:
            kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
            slots = segmented(mta_attention_chunked, q, k, v, key_padding(B, n), ids, summary_weight=None, **kw)
            torch.testing.assert_close(mta(q, k, v, key_padding(B, n), None, ids, **kw), slots, rtol=2e-5, atol=2e-5)


def test_the_op_chooses_by_mask(monkeypatch):
    """On the CPU, no mask or key padding runs here, with top-k or not (since 2026-12-05 top-k too);
    other masks take the slots."""
    q, k, v = qkv(2, 4, 2, 20)
    ids = segments(2, 20, rate=0.3)

    def no_slots(*args, **kwargs):
        raise AssertionError("padded slots used")

    monkeypatch.setattr(attention_module, "segmented", no_slots)
    for mask_kind in ("none", "key_padding_bool", "key_padding_min", "causal_padding_4d_min"):
        for top_k in (0, 2):
            mta(q, k, v, make_mask(mask_kind, 2, 4, 20), None, ids, chunk_size=4, causal=True, top_k=top_k)
    for mask, top_k in ((make_mask("alibi_bias", 2, 4, 20), 0), (make_mask("per_head_key_padding", 2, 4, 20), 1)):
        with pytest.raises(AssertionError, match="padded slots"):
            mta(q, k, v, mask, None, ids, chunk_size=4, top_k=top_k)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients(causal):
    """q, k, v and the learned summary weights, by finite differences, through the op's backward."""
    B, Hq, Hkv, n = 2, 2, 1, 11
    q, k, v = (x.requires_grad_() for x in qkv(B, Hq, Hkv, n, d=4))
    w = torch.randn(Hkv, 4, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    ids = segments(B, n, rate=0.3)
    mask = key_padding(B, n)
    kw = dict(chunk_size=3, causal=causal, local_chunks=1, sinks=2)
    assert torch.autograd.gradcheck(lambda q, k, v, w: mta(q, k, v, mask, w, ids, **kw), (q, k, v, w))


def test_refuses_what_it_does_not_compute():
    q, k, v = qkv(1, 2, 2, 10)
    ids = segments(1, 10)
    with pytest.raises(ValueError, match="key padding"):
        mta_attention_varlen(q, k, v, make_mask("alibi_bias", 1, 2, 10), ids, chunk_size=4)


@pytest.mark.parametrize("causal", [False, True])
def test_key_columns_count_what_the_op_computes(causal, monkeypatch):
    """The cost model's columns per query and key-set rows are the ones the op hands the kernel."""
    import mta_rewrite.ops.varlen as varlen

    seen = []
    real = varlen._attention_with_lse

    def counting(q, k, v, mask, scale, softcap=0.0):
        seen.append((q.shape[1] * q.shape[2] // 2, k.shape[1], k.shape[2]))  # (rows per head group, blocks, columns)
        return real(q, k, v, mask, scale, softcap)

    monkeypatch.setattr(varlen, "_attention_with_lse", counting)
    n = 700
    q, k, v = qkv(1, 2, 1, n, dtype=torch.float32)
    ids = segments(1, n, rate=0.05)
    for c, L, s in [(16, 1, 4), (64, 2, 0), (200, 1, 16)]:
        seen.clear()
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s)
        mta_attention_varlen(q, k, v, None, ids, **kw)
        columns, rows, _ = varlen.key_columns(ids, **kw)
        assert columns * n == pytest.approx(sum(r * x for r, _, x in seen))
        plan = varlen.plan_blocks(ids, 1, **kw)
        assert rows == plan.qpos.shape[0] * (plan.width + s + plan.chunks)
        assert rows >= sum(b * x for _, b, x in seen)  # the bands use a prefix of the summaries
        assert plan.width < plan.block + (1 if causal else 2) * L * c  # the window range's bound (docs)
    seen.clear()  # fixed chunks (segment_ids None) likewise
    kw = dict(chunk_size=8, causal=causal, local_chunks=2, sinks=4)
    mta_attention_varlen(q, k, v, None, None, **kw)
    assert varlen.key_columns(None, n=n, **kw)[0] * n == pytest.approx(sum(r * x for r, _, x in seen))


def test_many_small_fixed_chunks_run_in_query_blocks(monkeypatch):
    """Fixed chunks with c < 8 and at least 256 of them run in query blocks (``blocks_beat_chunks``):
    the same values and gradients as chunk by chunk (itself tested against the reference), GQA, key
    padding and learned summaries included; fewer chunks, or top-k, stay chunk by chunk."""
    B, Hq, Hkv, n, c = 2, 4, 2, 1100, 4  # 275 chunks
    q, k, v = (x.requires_grad_() for x in qkv(B, Hq, Hkv, n, d=8, seed=9))
    w = torch.randn(Hkv, 8, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    mask = key_padding(B, n)
    kw = dict(chunk_size=c, causal=True, local_chunks=2, sinks=6)
    want = mta_attention_chunked(q, k, v, mask, summary_weight=w, **kw)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v, w), g)

    def no_chunks(*args, **kwargs):
        raise AssertionError("chunk by chunk")

    monkeypatch.setattr(attention_module, "mta_attention_chunked", no_chunks)
    out = mta(q, k, v, mask, w, None, **kw)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for got, ref in zip(torch.autograd.grad(out, (q, k, v, w), g), want_grads):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        for n_short, top_k in ((1020, 0), (n, 1)):  # 255 chunks; top-k
            with pytest.raises(AssertionError, match="chunk by chunk"):
                mta(q[:, :, :n_short], k[:, :, :n_short], v[:, :, :n_short], None, None, None, chunk_size=c,
                    top_k=top_k)


@pytest.mark.parametrize("causal", [False, True])
def test_fixed_chunks_in_query_blocks_match_reference(causal):
    """``segment_ids`` None: fixed chunks (t // c, the sinks inside the first chunks), every block size."""
    B, Hq, Hkv, n = 2, 4, 2, 31
    q, k, v = qkv(B, Hq, Hkv, n, seed=4)
    for mask in (None, key_padding(B, n, empty_row=True)):
        for c, L, s in CONFIGS:
            kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s)
            ref = mta_attention_reference(q, k, v, mask, **kw)
            for block in (1, 5, None):
                out = mta_attention_varlen(q, k, v, mask, None, block=block, **kw)
                torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kw} {block}: {m}")


TOP_K_CONFIGS = [(4, 1, 0, 1), (3, 2, 2, 2), (5, 1, 7, 3), (1, 1, 0, 2), (2, 3, 1, 5), (6, 2, 12, 1), (100, 1, 0, 2)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "empty_sequence", "causal_padding_4d_min"])
def test_top_k_matches_reference(causal, mask_kind, monkeypatch):
    """Top-k in query blocks: per query head (GQA: the two heads of a group select apart), chunks of
    1–100 tokens, K up to more chunks than there are, blocks of 3 and the default, fixed chunks too;
    the forward's two key sets (no gradient; its (head, block) pairs in the groups the cost picks,
    and in as many as there may be) and the one key set under autograd alike."""
    import mta_rewrite.ops.varlen as varlen

    B, Hq, Hkv, n = 3, 4, 2, 31
    q, k, v = qkv(B, Hq, Hkv, n, seed=6)
    if mask_kind == "causal_padding_4d_min":
        mask = make_mask(mask_kind, B, Hq, n)  # the op reads it as key padding ∧ causality
    else:
        mask = None if mask_kind == "none" else key_padding(B, n, mask_kind == "empty_sequence")
    ids = segments(B, n, rate=0.25)
    for c, L, s, top_k in TOP_K_CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        ref = mta_attention_reference(q, k, v, mask, segment_ids=ids, **kw)
        torch.testing.assert_close(mta(q, k, v, mask, None, ids, **kw), ref, rtol=1e-10, atol=1e-10)
        if mask_kind == "causal_padding_4d_min":
            continue
        fixed = mta_attention_reference(q, k, v, mask, **kw)
        for block in (3, None):
            for overhead in (varlen._GROUP_OVERHEAD, 0):
                monkeypatch.setattr(varlen, "_GROUP_OVERHEAD", overhead)
                with torch.no_grad():
                    out = mta_attention_varlen(q, k, v, mask, ids, block=block, **kw)
                    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10,
                                               msg=lambda m: f"{kw} {block} {overhead}: {m}")
                    out = mta_attention_varlen(q, k, v, mask, None, block=block, **kw)
                    torch.testing.assert_close(out, fixed, rtol=1e-10, atol=1e-10,
                                               msg=lambda m: f"fixed {kw} {block} {overhead}: {m}")
            monkeypatch.undo()
            qg = q.clone().requires_grad_()
            out = mta_attention_varlen(qg, k, v, mask, ids, block=block, **kw)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"autograd {kw} {block}: {m}")


def test_pair_groups(monkeypatch):
    """The forward's (query head, block, sequence) pairs with top-k: every pair of a block from
    ``first`` on with a column (its block's summaries, its union's tokens) in exactly one group,
    each group padded to its own most; with no cost per call, fewer columns than padding every
    pair to the most."""
    import mta_rewrite.ops.varlen as varlen

    monkeypatch.setattr(varlen, "_GROUP_OVERHEAD", 0)
    B, Hq, Hkv, n = 2, 4, 2, 31
    q, k, v = qkv(B, Hq, Hkv, n, seed=6)
    ids = segments(B, n, rate=0.25)
    plan = varlen.plan_blocks(ids, B, chunk_size=4, causal=True, local_chunks=1, sinks=0, block=3)
    selected = varlen._selection_of(q, k, None, plan, causal=True, local_chunks=1, sinks=0, scale=None, top_k=2)
    widths = varlen.summary_widths(plan, causal=True, local_chunks=1)
    nb = plan.qpos.shape[0]
    cost = widths.view(1, nb, 1) + selected.total.permute(1, 2, 0)  # [H, nb, B]: pair h·nb·B + block·B + b
    for first in (0, 4):
        groups = varlen.pair_groups(selected, widths, first)
        seen = torch.cat([pairs for pairs, _ in groups])
        live = cost.clone()
        live[:, :first] = 0
        assert sorted(seen.tolist()) == (live.reshape(-1) > 0).nonzero().flatten().tolist()
        assert all(C == int(cost.reshape(-1)[pairs].max()) for pairs, C in groups)
        assert sum(len(p) * C for p, C in groups) < len(seen) * int(cost.max())
    assert 1 < len(varlen.pair_groups(selected, widths)) <= varlen._MAX_GROUPS


@pytest.mark.parametrize("overhead", [0, 5, 40, 10**6])
def test_cuts_are_the_cheapest(overhead, monkeypatch):
    """The runs the pairs are cut into: the least Σ run length × its most + the overhead per run,
    against every way of cutting (few enough ranks that every rank is a cut point)."""
    import itertools

    import mta_rewrite.ops.varlen as varlen

    monkeypatch.setattr(varlen, "_GROUP_OVERHEAD", overhead)
    g = torch.Generator().manual_seed(1)
    for size in (1, 2, 7, 12):
        ranked = sorted(torch.randint(0, 50, (size,), generator=g).tolist() + [0])
        runs = varlen._cuts(ranked)
        assert runs[0][0] == 0 and runs[-1][1] == len(ranked) and len(runs) <= varlen._MAX_GROUPS
        assert all(a < e and e == a2 for (a, e), (a2, _) in zip(runs, runs[1:]))

        def cost(cuts):
            return sum((e - a) * ranked[e - 1] + overhead for a, e in zip(cuts, cuts[1:]))

        best = min(cost((0, *inner, len(ranked))) for r in range(varlen._MAX_GROUPS)
                   for inner in itertools.combinations(range(1, len(ranked)), r))
        assert cost([a for a, _ in runs] + [len(ranked)]) == best
    assert varlen._cuts([]) == []


def test_top_k_heads_of_a_group_select_apart():
    """The test above can only fail on per-head selection if the heads of a group do select different
    chunks: here they do (and the output is not the one of a shared selection)."""
    from mta_rewrite.ops.varlen import _select, _summaries, plan_blocks

    B, Hq, Hkv, n = 1, 4, 2, 31
    q, k, v = qkv(B, Hq, Hkv, n, seed=6)
    ids = segments(B, n, rate=0.25)
    plan = plan_blocks(ids, B, chunk_size=3, causal=True, local_chunks=1, sinks=0)
    w = torch.ones(B, n, dtype=torch.bool)
    kbar, _, n_j, _ = _summaries(k, v, plan.chunk, w, plan.chunks, None, F64)
    sel = _select(q, kbar.repeat_interleave(2, dim=1), n_j, plan, local_chunks=1, causal=True, scale=0.25, top_k=2)
    assert (sel[:, 0] != sel[:, 1]).any() and (sel[:, 2] != sel[:, 3]).any()


def test_top_k_ties_go_to_the_lower_chunk():
    """MTA_SPEC.md: ties broken by the lower chunk index. Queries whose mean over each chunk is zero
    score every chunk 0 (all tie), yet attend differently to a chunk's tokens and to its summary, so
    which chunks are chosen shows in the output; and the selection helper against a stable sort."""
    from mta_rewrite.ops.varlen import _top_chunks

    B, Hq, Hkv, n, c = 2, 2, 1, 48, 4
    q, k, v = qkv(B, Hq, Hkv, n, seed=3)
    q = q.view(B, Hq, n // 2, 2, -1)
    q = torch.stack([q[:, :, :, 0], -q[:, :, :, 0]], dim=3).view(B, Hq, n, -1)  # pairs ±x: each chunk's mean 0
    ids = torch.arange(n).div(4, rounding_mode="floor").view(1, n).expand(B, n) * 5  # segments of 4 = chunks of 4
    for causal in (False, True):
        kw = dict(chunk_size=c, causal=causal, local_chunks=1, sinks=0, top_k=2)
        ref = mta_attention_reference(q, k, v, segment_ids=ids, **kw)
        with torch.no_grad():
            torch.testing.assert_close(mta(q, k, v, None, None, ids, **kw), ref, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(mta_attention_varlen(q, k, v, None, None, **kw), ref, rtol=1e-10, atol=1e-10)
        later = mta_attention_reference(q, k, v, segment_ids=ids, **dict(kw, top_k=3))
        assert (later - ref).abs().max() > 1e-3  # (a third chunk changes the output: the choice shows)
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (6, 5, 40), generator=g).double()  # many ties, at and inside the K-th place
    score[0, 0] = float("-inf")
    score[1, 1, 3:] = float("-inf")
    for K in (1, 2, 3, 7):
        top = torch.sort(score, dim=-1, descending=True, stable=True)
        want = torch.where(top.values[..., :K] > float("-inf"), top.indices[..., :K], -1)
        got = _top_chunks(score, K)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)


@pytest.mark.parametrize("causal", [False, True])
def test_top_k_gradients(causal):
    """q, k, v and learned summary weights by finite differences, GQA, key padding, through the op's
    backward (recomputed unpadded, one key set per query head)."""
    B, Hq, Hkv, n = 2, 4, 2, 13
    q, k, v = (x.requires_grad_() for x in qkv(B, Hq, Hkv, n, d=4, seed=8))
    w = torch.randn(Hkv, 4, dtype=F64, generator=torch.Generator().manual_seed(5)).requires_grad_()
    ids = segments(B, n, rate=0.3)
    mask = key_padding(B, n)
    kw = dict(chunk_size=3, causal=causal, local_chunks=1, sinks=2, top_k=1)
    # (fast mode: random directions instead of every input element, 1 s instead of 8)
    assert torch.autograd.gradcheck(lambda q, k, v, w: mta(q, k, v, mask, w, ids, **kw), (q, k, v, w), fast_mode=True)


@pytest.mark.parametrize("causal", [False, True])
def test_top_k_key_columns_count_what_the_op_computes(causal, monkeypatch):
    """With top-k the cost model's columns come from the op's own selection on the data: every
    logit the forward's calls compute (the window key set and the groups of (head, block) pairs);
    under autograd (one key set per query head, padded to the band's most) at least as many."""
    import mta_rewrite.ops.varlen as varlen

    logits = []
    real = varlen._attention_with_lse

    def counting(q, k, v, mask, scale, softcap=0.0):
        logits.append(q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
        return real(q, k, v, mask, scale, softcap)

    monkeypatch.setattr(varlen, "_attention_with_lse", counting)
    B, Hq, Hkv, n = 2, 4, 2, 500
    q, k, v = qkv(B, Hq, Hkv, n, d=8, dtype=torch.float32)
    ids = segments(B, n, rate=0.05)
    mask = key_padding(B, n)
    for c, L, s, top_k in [(16, 1, 4, 2), (64, 2, 0, 1)]:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        columns, rows, chunks = varlen.key_columns(ids, q=q, k=k, attn_mask=mask, **kw)
        plain = varlen.key_columns(ids, **dict(kw, top_k=0))
        assert columns > plain[0] and rows > plain[1] and chunks == plain[2]
        for grad in (False, True):
            logits.clear()
            with torch.set_grad_enabled(grad):
                varlen.mta_attention_varlen(q.clone().requires_grad_(grad), k, v, mask, ids, **kw)
            if grad:
                assert sum(logits) >= columns * n * Hq * B
            else:
                assert sum(logits) == pytest.approx(columns * n * Hq * B)
    with pytest.raises(ValueError, match="give q and k"):
        varlen.key_columns(ids, chunk_size=16, top_k=2)
