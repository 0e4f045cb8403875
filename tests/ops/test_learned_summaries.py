"""Learned summaries (MTA_SPEC.md, ``summary="learned"``): the op's ``summary_weight`` [Hkv, d]
against the float64 reference, the identities it must keep, and its gradient."""

from __future__ import annotations

import pytest
import torch

import mta_rewrite  # noqa: F401  (registers torch.ops.mta.attention)
from mta_rewrite.ops import mta_attention_reference

from .test_attention import CONFIGS, make_mask, qkv

mta = torch.ops.mta.attention
F64 = torch.float64


def weight(Hkv=2, d=8, seed=3, size=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(Hkv, d, generator=g, dtype=F64) * size


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "causal_padding_4d_min", "random_bool_per_head",
                                       "alibi_bias", "per_head_key_padding", "some_rows_fully_masked",
                                       "causal_padding_key_bias"])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference(mask_kind, causal):
    B, Hq, Hkv, n = 2, 4, 2, 13
    q, k, v = qkv(B, Hq, Hkv, n)
    mask = make_mask(mask_kind, B, Hq, n)
    w = weight(Hkv)
    for c, L, s, top_k in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        out = mta(q, k, v, mask, w, **kw)
        ref = mta_attention_reference(q, k, v, mask, summary_weight=w, **kw)
        assert not out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kw}: {m}")


def test_weights_change_the_output_and_zero_is_the_mean():
    q, k, v = qkv(1, 4, 2, 24)
    kw = dict(chunk_size=4, causal=True, sinks=1, top_k=1)
    mean = mta(q, k, v, **kw)
    torch.testing.assert_close(mta(q, k, v, None, torch.zeros(2, 8, dtype=F64), **kw), mean, rtol=1e-12, atol=1e-12)
    learned = mta(q, k, v, None, weight(2), **kw)
    assert (learned - mean).abs().max() > 1e-3  # the summaries (and the top-k choice they drive) moved


def test_very_large_weights_pick_one_key_per_chunk():
    """A weight far along one key direction turns a summary into that chunk's highest-scoring key."""
    B, Hq, Hkv, n, d, c = 1, 1, 1, 16, 4, 4
    q, k, v = qkv(B, Hq, Hkv, n, d)
    w = torch.zeros(1, d, dtype=F64)
    w[0, 0] = 1e4
    out = mta(q, k, v, None, w, chunk_size=c, causal=False)
    kbar = k.view(n // c, c, d)[torch.arange(n // c), k.view(n // c, c, d)[..., 0].argmax(-1)]
    vbar = v.view(n // c, c, d)[torch.arange(n // c), k.view(n // c, c, d)[..., 0].argmax(-1)]
    # query 0 (chunk 0): itself exact, chunks 1..3 as the picked keys with logit + log c
    s = torch.cat([q[0, 0, 0] @ k[0, 0, :c].T / d**0.5, q[0, 0, 0] @ kbar[1:].T / d**0.5 + torch.log(torch.tensor(float(c)))])
    want = torch.softmax(s, 0) @ torch.cat([v[0, 0, :c], vbar[1:]])
    torch.testing.assert_close(out[0, 0, 0], want, rtol=1e-8, atol=1e-8)


def test_gqa_equals_repeated_heads():
    q, k, v = qkv(2, 6, 3, 17)
    w = weight(3)
    kw = dict(chunk_size=4, causal=True, local_chunks=2, sinks=2)
    rep = mta(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), None, w.repeat_interleave(2, 0), **kw)
    torch.testing.assert_close(mta(q, k, v, None, w, **kw), rep, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "alibi_bias"])
def test_gradcheck_including_the_weight(mask_kind):
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 1, 9, d=4))
    w = weight(1, 4, size=0.5).requires_grad_()
    mask = make_mask(mask_kind, 1, 2, 9)
    kw = dict(chunk_size=2, causal=True, sinks=1)
    assert torch.autograd.gradcheck(lambda q, k, v, w: mta(q, k, v, mask, w, **kw), (q, k, v, w))


def test_bad_weight_is_a_clear_error():
    q, k, v = qkv(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"summary_weight must be \[Hkv, d\] = \[2, 8\]"):
        mta(q, k, v, None, torch.zeros(4, 8, dtype=F64), chunk_size=4)
    with pytest.raises(ValueError, match="summary_weight must be a float tensor"):
        mta(q, k, v, None, torch.zeros(2, 8, dtype=torch.long), chunk_size=4)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_autograd_equals_the_op(causal):
    """``attention_autograd`` (calibration fits learned summaries through it): on the CPU the op's
    implementation differentiated directly. Its output and its gradients in q, k, v and the
    weight equal the op's (whose backward recomputes the forward), float64, on each of the op's
    CPU routes: chunk by chunk with a bias mask and top-k, query blocks (many small chunks), one
    chunk (SDPA), boundary chunks unpadded and in padded slots (with top-k); GQA."""
    from mta_rewrite.ops.attention import attention_autograd

    from mta_rewrite.ops.varlen import blocks_beat_chunks

    B, Hq, Hkv = 2, 4, 2
    ids = torch.cumsum((torch.rand(B, 40, generator=torch.Generator().manual_seed(6)) < 0.2).long(), 1)
    routes = [(40, make_mask("alibi_bias", B, Hq, 40), None, dict(chunk_size=6, local_chunks=2, sinks=3, top_k=2)),
              (512, make_mask("key_padding_bool", B, Hq, 512), None, dict(chunk_size=2, sinks=1)),
              (40, None, None, dict(chunk_size=64)),
              (40, make_mask("key_padding_bool", B, Hq, 40), ids, dict(chunk_size=5, sinks=2)),
              (40, None, ids, dict(chunk_size=5, local_chunks=2, top_k=1))]
    assert blocks_beat_chunks(2, 512)  # the second route runs in query blocks
    for n, mask, seg, kw in routes:
        q, k, v = qkv(B, Hq, Hkv, n)
        grad_out = torch.randn(B, Hq, n, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
        results = []
        for fn in (mta, attention_autograd):
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, weight(Hkv))]
            out = fn(*leaves[:3], mask, leaves[3], seg, causal=causal, **kw)
            out.backward(grad_out)
            # (at one chunk the weight has no effect: its gradient is None directly, zeros from the op)
            results.append([out.detach()] + [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves])
        for name, got, want in zip(("out", "dq", "dk", "dv", "dw"), results[1], results[0]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} {kw} {seg is not None}: {m}")
