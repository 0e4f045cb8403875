"""Soft-capped logits (``softcap``, Gemma-2's ``attn_logit_softcapping``): every implementation of
the op against the float64 reference, which caps the product term of each logit, key or summary,
before the mask's value and log n_j are added (docs/op.md)."""

from __future__ import annotations

import importlib

import pytest
import torch

import mta_rewrite  # noqa: F401  (registers torch.ops.mta.attention)
from mta_rewrite.ops import mta_attention_reference
from mta_rewrite.ops.varlen import mta_attention_varlen

from .test_attention import CONFIGS, MASKS, assert_every_config_matches_reference, make_mask, qkv
from .test_clustered import centroids
from .test_segments import segments

mta = torch.ops.mta.attention
attention_module = importlib.import_module("mta_rewrite.ops.attention")
CAP = 0.8  # below the spread of scale·q·k for these inputs: the cap changes every output


def scaled_qkv(*args, **kwargs):
    q, k, v = qkv(*args, **kwargs)
    return 3 * q, k, v  # logits of a few units, so that tanh bends them


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_every_mask_and_parameter(mask_kind, causal):
    B, Hq, Hkv, n = 2, 4, 2, 13
    q, k, v = scaled_qkv(B, Hq, Hkv, n)
    mask = make_mask(mask_kind, B, Hq, n)
    refs = assert_every_config_matches_reference(q, k, v, mask, causal, softcap=CAP)
    for (c, L, s, top_k), ref in zip(CONFIGS, refs):
        uncapped = mta_attention_reference(q, k, v, mask, chunk_size=c, causal=causal, local_chunks=L, sinks=s,
                                           top_k=top_k)
        assert (ref - uncapped).abs().max() > 1e-2, (c, L, s, top_k)  # the cap is not a no-op here


def test_the_reference_caps_what_exact_attention_caps():
    """With one chunk the reference is softmax(CAP·tanh(scale·q·kᵀ / CAP) + mask)·v, written out."""
    B, Hq, Hkv, n = 2, 4, 2, 11
    q, k, v = scaled_qkv(B, Hq, Hkv, n)
    for mask_kind in ("none", "alibi_bias", "random_bool_per_head"):
        mask = make_mask(mask_kind, B, Hq, n)
        kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = CAP * torch.tanh(q @ kr.transpose(-1, -2) * 8 ** -0.5 / CAP)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        want = torch.softmax(s, -1) @ vr
        for c in (n, 4):
            got = mta_attention_reference(q, k, v, mask, chunk_size=c, local_chunks=n if c < n else 1, softcap=CAP)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "per_head_key_padding", "causal_padding_4d_min",
                                       "alibi_bias", "some_rows_fully_masked"])
def test_one_chunk_runs_in_blocks_of_queries(monkeypatch, causal, mask_kind):
    """The exact path (c ≥ n; SDPA has no soft-cap) computes the scores block by block: with blocks
    of 4 queries it gives the reference's values, fully masked rows zeros."""
    monkeypatch.setattr(attention_module, "_EXACT_ROWS", 4)
    B, Hq, Hkv, n = 2, 6, 2, 13
    q, k, v = scaled_qkv(B, Hq, Hkv, n)
    mask = make_mask(mask_kind, B, Hq, n)
    kw = dict(chunk_size=100, causal=causal)
    out = mta(q, k, v, mask, softcap=CAP, **kw)
    torch.testing.assert_close(out, mta_attention_reference(q, k, v, mask, softcap=CAP, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_boundary_chunks_and_query_blocks(causal):
    """Boundary chunks without padding (``varlen.py``; top-k there too since 2026-12-05: its two key
    sets merged by log-sum-exp take the cap in each), and many small fixed chunks in query blocks."""
    B, Hq, Hkv, n = 3, 4, 2, 31
    q, k, v = scaled_qkv(B, Hq, Hkv, n)
    ids = segments(B, n, rate=0.25)
    pad = make_mask("key_padding_bool", B, 1, n)
    for c, L, s, top_k in [(4, 1, 0, 0), (3, 2, 2, 0), (5, 1, 7, 1), (2, 3, 1, 2)]:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        ref = mta_attention_reference(q, k, v, pad, segment_ids=ids, softcap=CAP, **kw)
        torch.testing.assert_close(mta(q, k, v, pad, None, ids, softcap=CAP, **kw), ref, rtol=1e-10, atol=1e-10)
        with torch.no_grad():  # (the two key sets: no gradient wanted)
            out = mta_attention_varlen(q, k, v, pad, ids, softcap=CAP, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        if top_k == 0:
            fixed = mta_attention_varlen(q, k, v, pad, None, block=5, softcap=CAP, **kw)
            torch.testing.assert_close(fixed, mta_attention_reference(q, k, v, pad, softcap=CAP, **kw),
                                       rtol=1e-10, atol=1e-10)


def test_learned_and_clustered_summaries():
    B, Hq, Hkv, n = 2, 4, 2, 19
    q, k, v = scaled_qkv(B, Hq, Hkv, n)
    w = torch.randn(Hkv, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pad = make_mask("key_padding_bool", B, Hq, n)
    kw = dict(chunk_size=4, causal=True, sinks=2, top_k=1, local_chunks=2)
    torch.testing.assert_close(mta(q, k, v, pad, w, softcap=CAP, **kw),
                               mta_attention_reference(q, k, v, pad, summary_weight=w, softcap=CAP, **kw),
                               rtol=1e-10, atol=1e-10)
    mu = centroids(Hkv, 3)
    kw = dict(chunk_size=4, sinks=1)
    torch.testing.assert_close(mta(q, k, v, pad, None, None, mu, softcap=CAP, **kw),
                               mta_attention_reference(q, k, v, pad, centroids=mu, softcap=CAP, **kw),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_dtypes(dtype, tol):
    q, k, v = (x.to(dtype) for x in scaled_qkv(2, 4, 2, 40))
    for c in (8, 64):
        kw = dict(chunk_size=c, causal=True, sinks=2, top_k=1)
        out = mta(q, k, v, softcap=CAP, **kw)
        assert out.dtype == dtype
        want = mta_attention_reference(q, k, v, softcap=CAP, **kw)
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("kw,mask_kind,ids", [
    (dict(chunk_size=3, causal=True, sinks=1, top_k=1), "none", False),
    (dict(chunk_size=2, local_chunks=2), "alibi_bias", False),
    (dict(chunk_size=100, causal=True), "key_padding_bool", False),  # the exact path
    (dict(chunk_size=3, causal=True, sinks=1), "key_padding_bool", True),  # boundary chunks, unpadded
])
def test_gradcheck(kw, mask_kind, ids):
    B, Hq, Hkv, n = 1, 2, 1, 9
    q, k, v = (x.requires_grad_() for x in scaled_qkv(B, Hq, Hkv, n, d=4))
    mask = make_mask(mask_kind, B, Hq, n)
    seg = segments(B, n, rate=0.3) if ids else None
    assert torch.autograd.gradcheck(lambda q, k, v: mta(q, k, v, mask, None, seg, softcap=CAP, **kw), (q, k, v))


def test_opcheck():
    q, k, v = (x.requires_grad_() for x in qkv(2, 4, 2, 16, dtype=torch.float32))
    torch.library.opcheck(mta, (q, k, v, None, None, None, None), dict(chunk_size=4, causal=True, top_k=1, softcap=5.0))


@pytest.mark.parametrize("softcap", [-1.0, float("inf"), float("nan")])
def test_bad_softcap_is_a_clear_error(softcap):
    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="softcap must be a finite number"):
        mta(q, q, q, chunk_size=2, softcap=softcap)
