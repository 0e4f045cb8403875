"""Boundary chunks (MTA_SPEC.md "Grouping strategies": boundary): the op's ``segment_ids`` [B, n]
against the float64 reference, which chunks them literally (``chunk_lists``), the identities they
keep, their gradient and export."""

from __future__ import annotations

import pytest
import torch

import mta_rewrite  # noqa: F401  (registers torch.ops.mta.attention)
from mta_rewrite.ops import mta_attention_reference
from mta_rewrite.ops.reference import chunk_lists
from mta_rewrite.ops.segments import chunk_starts, padded_length, segment_layout

from .test_attention import CONFIGS, make_mask, qkv

mta = torch.ops.mta.attention
F64 = torch.float64


def segments(B, n, rate=0.2, seed=4):
    """[B, n] ids of runs of random lengths (each sequence its own), as a sentence id would be."""
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum((torch.rand(B, n, generator=g) < rate).long(), dim=1) * 3 + 7


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("c,sinks", [(1, 0), (3, 0), (4, 2), (5, 7), (16, 3)])
def test_chunk_starts_follow_the_rules(seed, c, sinks):
    """The vectorised chunking equals the reference's token-by-token rules."""
    ids = segments(3, 29, rate=0.1 + 0.1 * seed, seed=seed)
    starts = chunk_starts(ids, c, sinks)
    for b in range(3):
        want = [chunk[0] for chunk in chunk_lists(29, c, sinks, ids[b].tolist())]
        assert starts[b].nonzero().flatten().tolist() == want


def test_chunk_rules_by_example():
    ids = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 3, 3]
    assert chunk_lists(13, 3, 0, ids) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9], [10], [11, 12]]
    # sinks are chunked on their own (fixed, the last ending at the sinks); id changes inside ignored
    assert chunk_lists(13, 3, 4, ids) == [[0, 1, 2], [3], [4, 5, 6], [7, 8, 9], [10], [11, 12]]
    assert chunk_lists(13, 4, 0, None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12]]


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "causal_padding_4d_min", "random_bool_per_head",
                                       "alibi_bias", "per_head_key_padding", "some_rows_fully_masked",
                                       "block_diagonal_2d", "causal_padding_key_bias"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(mask_kind, causal):
    """GQA, every configuration of the op tests (windows, sinks inside and beyond the first chunk,
    top-k, c = 1, c > n), each sequence of the batch chunked differently."""
    B, Hq, Hkv, n = 2, 4, 2, 13
    q, k, v = qkv(B, Hq, Hkv, n)
    mask = make_mask(mask_kind, B, Hq, n)
    ids = segments(B, n, rate=0.3)
    for c, L, s, top_k in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        out = mta(q, k, v, mask, None, ids, **kw)
        ref = mta_attention_reference(q, k, v, mask, segment_ids=ids, **kw)
        assert not out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kw}: {m}")


def test_longer_sequences_and_learned_summaries():
    B, Hq, Hkv, n = 2, 2, 1, 75
    q, k, v = qkv(B, Hq, Hkv, n, seed=3)
    ids = segments(B, n, rate=0.08)
    w = torch.randn(Hkv, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    for causal in (False, True):
        kw = dict(chunk_size=8, causal=causal, local_chunks=2, sinks=4, top_k=2)
        out = mta(q, k, v, None, w, ids, **kw)
        ref = mta_attention_reference(q, k, v, summary_weight=w, segment_ids=ids, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_the_chunks_change_the_output():
    """Boundaries matter: the same tokens under fixed and boundary chunks differ."""
    q, k, v = qkv(1, 2, 2, 40)
    kw = dict(chunk_size=6, causal=True)
    fixed = mta(q, k, v, **kw)
    boundary = mta(q, k, v, None, None, segments(1, 40), **kw)
    assert (fixed - boundary).abs().max() > 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_one_segment_is_fixed_chunks(causal):
    """Constant ids (no sinks, or sinks a multiple of c) chunk exactly as fixed chunks."""
    q, k, v = qkv(2, 4, 2, 23)
    ids = torch.zeros(2, 23, dtype=torch.long)
    for s in (0, 8):
        kw = dict(chunk_size=4, causal=causal, local_chunks=2, sinks=s, top_k=1)
        torch.testing.assert_close(mta(q, k, v, None, None, ids, **kw), mta(q, k, v, **kw), rtol=1e-12, atol=1e-12)
    assert padded_length(ids, 4) == 24


@pytest.mark.parametrize("causal", [False, True])
def test_one_chunk_per_segment_window_covering_all_is_exact(causal):
    """A window that covers every chunk leaves nothing to summarise: exact attention."""
    q, k, v = qkv(1, 2, 2, 20)
    ids = segments(1, 20, rate=0.3)
    out = mta(q, k, v, None, None, ids, chunk_size=4, causal=causal, local_chunks=20)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_causality_includes_the_future_ids():
    """out[t] depends on neither later tokens nor later segment ids (a chunk boundary is decided
    by the ids up to it). Up to rounding: later ids change the number of chunk slots, so the
    bands' key sets get more (excluded) summary columns, and the flash kernel's sums over a row
    of another width round differently (a few 1e-16 in float64, before the two top-k key sets
    too, at other t)."""
    B, Hq, Hkv, n, t = 1, 2, 1, 30, 17
    q, k, v = qkv(B, Hq, Hkv, n)
    ids = segments(B, n, rate=0.25)
    kw = dict(chunk_size=4, causal=True, sinks=2, top_k=1)
    out = mta(q, k, v, None, None, ids, **kw)
    q2, k2, v2, ids2 = q.clone(), k.clone(), v.clone(), ids.clone()
    for x in (q2, k2, v2):
        x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:])
    ids2[:, t + 1:] = torch.arange(n - t - 1) * 5 + 1000
    out2 = mta(q2, k2, v2, None, None, ids2, **kw)
    torch.testing.assert_close(out2[:, :, :t + 1], out[:, :, :t + 1], rtol=0, atol=1e-13)
    assert (out2[:, :, t + 1:] - out[:, :, t + 1:]).abs().max() > 1e-3


def test_gqa_equals_repeated_heads():
    q, k, v = qkv(2, 4, 2, 19)
    ids = segments(2, 19, rate=0.3)
    kw = dict(chunk_size=3, causal=True, sinks=1, top_k=1)
    grouped = mta(q, k, v, None, None, ids, **kw)
    repeated = mta(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None, None, ids, **kw)
    torch.testing.assert_close(grouped, repeated, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_dtypes_and_layout(dtype, tol):
    q, k, v = qkv(2, 4, 2, 21, dtype=dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # a model's transposed [B, n, H, d] buffer
    ids = segments(2, 21, rate=0.3)
    kw = dict(chunk_size=4, causal=True, sinks=2)
    out = mta(q, k, v, None, None, ids, **kw)
    assert out.dtype == dtype and out.stride() == torch.empty_like(q).stride()
    ref = mta_attention_reference(q, k, v, segment_ids=ids, **kw)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kw,mask_kind", [
    (dict(chunk_size=3), "none"),
    (dict(chunk_size=2, causal=True, sinks=1, top_k=1, local_chunks=2), "none"),
    (dict(chunk_size=3, causal=True), "causal_padding_4d_min"),
    (dict(chunk_size=2, sinks=2), "alibi_bias"),
])
def test_gradcheck(kw, mask_kind):
    B, Hq, Hkv, n = 2, 2, 1, 9
    q, k, v = (x.requires_grad_() for x in qkv(B, Hq, Hkv, n, d=4))
    mask = make_mask(mask_kind, B, Hq, n)
    ids = segments(B, n, rate=0.3)
    assert torch.autograd.gradcheck(lambda q, k, v: mta(q, k, v, mask, None, ids, **kw), (q, k, v))


def test_padded_length_bounds():
    """Slots as wide as the longest chunk rounded up to 16, at most c: N = M·S."""
    ids = segments(3, 200, rate=0.05)
    for c in (1, 8, 32, 128):
        lay = segment_layout(ids, 3, c, 0)
        lists = [chunk_lists(200, c, 0, ids[b].tolist()) for b in range(3)]
        longest = max(len(chunk) for chunks in lists for chunk in chunks)
        assert lay.width == min(c, -(-longest // 16) * 16) and (c < 128 or lay.width < c)
        assert lay.length == max(map(len, lists)) * lay.width == padded_length(ids, c)
        assert int(lay.real.sum()) == 3 * 200


@pytest.mark.parametrize("causal", [False, True])
def test_slots_as_wide_as_the_longest_chunk(causal):
    """c = 64 over segments of at most 10 tokens: slots of 16 positions, not 64 (4× fewer padding
    rows and columns). The op in them (top-k and a per-query mask take the slots) against the
    reference, every sequence chunked differently, sinks; and its gradient (the slots' backward
    runs the fixed-chunk op with the slots' chunk size)."""
    B, Hq, Hkv, n = 2, 4, 2, 50
    q, k, v = qkv(B, Hq, Hkv, n)
    ids = torch.stack([torch.arange(n) // 7, torch.arange(n) // 10])
    lay = segment_layout(ids, B, 64, 2)
    assert lay.width == 16
    for mask_kind, top_k in [("none", 2), ("random_bool_per_head", 0), ("key_padding_bool", 1)]:
        mask = make_mask(mask_kind, B, Hq, n)
        kw = dict(chunk_size=64, causal=causal, local_chunks=2, sinks=2, top_k=top_k)
        torch.testing.assert_close(mta(q, k, v, mask, None, ids, **kw),
                                   mta_attention_reference(q, k, v, mask, segment_ids=ids, **kw), rtol=1e-10,
                                   atol=1e-10, msg=lambda m: f"{mask_kind} {kw}: {m}")
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 1, 24, d=4))
    kw = dict(chunk_size=32, causal=causal, local_chunks=1, sinks=1, top_k=1)
    assert segment_layout(ids[:1, :24], 1, 32, 1).width == 16
    assert torch.autograd.gradcheck(lambda q, k, v: mta(q, k, v, None, None, ids[:1, :24], **kw), (q, k, v))


class Segmented(torch.nn.Module):
    def forward(self, q, k, v, ids):
        return torch.ops.mta.attention(q, k, v, None, None, ids, chunk_size=4, causal=True, sinks=1)


def test_export_with_dynamic_length(tmp_path):
    q, k, v = qkv(1, 2, 2, 20, dtype=torch.float32)
    ids = segments(1, 20)
    n = torch.export.Dim("n", min=2, max=4096)
    ep = torch.export.export(Segmented(), (q, k, v, ids), dynamic_shapes=({2: n}, {2: n}, {2: n}, {1: n}), strict=False)
    torch.export.save(ep, tmp_path / "seg.pt2")
    loaded = torch.export.load(tmp_path / "seg.pt2").module()
    q2, k2, v2 = qkv(1, 2, 2, 33, dtype=torch.float32, seed=5)
    ids2 = segments(1, 33, seed=6)
    torch.testing.assert_close(loaded(q2, k2, v2, ids2), Segmented()(q2, k2, v2, ids2))


@pytest.mark.parametrize("ids,message", [
    (torch.zeros(2, 12, dtype=torch.long), "segment_ids must be"),
    (torch.zeros(1, 2, 13, dtype=torch.long), "segment_ids must be"),
    (torch.zeros(1, 13), "integer tensor"),
    (torch.zeros(1, 13, dtype=torch.bool), "integer tensor"),
])
def test_bad_segment_ids_are_a_clear_error(ids, message):
    q, k, v = qkv(1, 2, 2, 13)
    with pytest.raises(ValueError, match=message):
        mta(q, k, v, None, None, ids, chunk_size=4)
