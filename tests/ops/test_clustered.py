"""Clustered summaries (MTA_SPEC.md, learned clustering of keys): the op's ``centroids``
[Hkv, K, d] against the float64 reference, the identities they keep, their gradient, export and
the inputs they refuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mta_rewrite  # noqa: F401  (registers torch.ops.mta.attention)
from mta_rewrite.ops import mta_attention_reference

from .test_attention import make_mask, qkv

mta = torch.ops.mta.attention
F64 = torch.float64


def centroids(Hkv=2, K=3, d=8, seed=5):
    return torch.randn(Hkv, K, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


# (chunk_size, local_chunks, sinks): partial last chunk, wider windows, sinks inside and beyond
# the first chunk, c = 1, c > n (one chunk: exact)
CONFIGS = [(4, 1, 0), (3, 2, 2), (5, 1, 7), (1, 1, 0), (100, 1, 0), (2, 3, 1)]


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "key_padding_min", "key_padding_4d_materialised",
                                       "per_head_key_padding"])
@pytest.mark.parametrize("K", [1, 3, 7])
def test_matches_reference(mask_kind, K):
    B, Hq, Hkv, n = 2, 4, 2, 13
    q, k, v = qkv(B, Hq, Hkv, n)
    mask = make_mask(mask_kind, B, Hq, n)
    mu = centroids(Hkv, K)
    for c, L, s in CONFIGS:
        kw = dict(chunk_size=c, local_chunks=L, sinks=s)
        out = mta(q, k, v, mask, None, None, mu, **kw)
        ref = mta_attention_reference(q, k, v, mask, centroids=mu, **kw)
        assert not out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kw}: {m}")


def test_longer_sequence_and_clusters_from_the_keys():
    """Centroids drawn from the keys themselves (as k-means gives them), several clusters per
    chunk and chunks spread over clusters."""
    q, k, v = qkv(1, 2, 1, 90, seed=2)
    mu = k[0, :, ::9].clone()  # [1, 10, d]
    kw = dict(chunk_size=8, local_chunks=2, sinks=3)
    torch.testing.assert_close(mta(q, k, v, None, None, None, mu, **kw),
                               mta_attention_reference(q, k, v, centroids=mu, **kw), rtol=1e-10, atol=1e-10)


def test_keys_identical_within_clusters_are_exact():
    """Every key equal to its cluster's centroid (and values equal per cluster): a summary of n
    identical keys weighs what its n tokens would (log n), so MTA equals exact attention."""
    B, Hq, Hkv, n, d, K = 2, 4, 2, 30, 8, 4
    g = torch.Generator().manual_seed(3)
    protos_k = torch.randn(Hkv, K, d, generator=g, dtype=F64)
    protos_v = torch.randn(Hkv, K, d, generator=g, dtype=F64)
    which = torch.randint(0, K, (B, Hkv, n), generator=g)
    heads = torch.arange(Hkv).view(1, Hkv, 1)
    k, v = protos_k[heads, which], protos_v[heads, which]
    q = torch.randn(B, Hq, n, d, generator=g, dtype=F64)
    out = mta(q, k, v, None, None, None, protos_k, chunk_size=4, sinks=2)
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_the_clusters_change_the_output_and_window_covering_all_is_exact():
    q, k, v = qkv(1, 2, 2, 24)
    chunks = mta(q, k, v, chunk_size=4)
    clustered = mta(q, k, v, None, None, None, centroids(2, 6), chunk_size=4)
    assert (chunks - clustered).abs().max() > 1e-3
    everything = mta(q, k, v, None, None, None, centroids(2, 6), chunk_size=4, local_chunks=6)
    torch.testing.assert_close(everything, F.scaled_dot_product_attention(q, k, v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_dtypes(dtype, tol):
    q, k, v = qkv(2, 4, 2, 21, dtype=dtype)
    mu = centroids(2, 4).to(dtype)
    out = mta(q, k, v, None, None, None, mu, chunk_size=4, sinks=2)
    assert out.dtype == dtype
    ref = mta_attention_reference(q, k, v, centroids=mu, chunk_size=4, sinks=2)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_gradcheck():
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 1, 9, d=4))
    mu = centroids(1, 3, 4)
    mask = make_mask("key_padding_bool", 1, 2, 9)
    assert torch.autograd.gradcheck(lambda q, k, v: mta(q, k, v, mask, None, None, mu, chunk_size=2, sinks=1), (q, k, v))


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "per_head_key_padding"])
def test_bands_of_one_chunk_match_reference(one_chunk_bands, mask_kind):
    """Key sets built one query chunk at a time (the CPU's memory bound): every band edge cuts the
    window, the sinks' terms and the per-chunk summaries; and the gradients."""
    B, Hq, Hkv, n = 2, 4, 2, 13
    q, k, v = qkv(B, Hq, Hkv, n, seed=6)
    mask = make_mask(mask_kind, B, Hq, n)
    for K in (1, 3):
        mu = centroids(Hkv, K)
        for c, L, s in CONFIGS:
            kw = dict(chunk_size=c, local_chunks=L, sinks=s)
            ref = mta_attention_reference(q, k, v, mask, centroids=mu, **kw)
            torch.testing.assert_close(mta(q, k, v, mask, None, None, mu, **kw), ref, rtol=1e-10, atol=1e-10,
                                       msg=lambda m: f"{kw}: {m}")
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 1, 9, d=4))
    mu = centroids(1, 3, 4)
    assert torch.autograd.gradcheck(lambda q, k, v: mta(q, k, v, None, None, None, mu, chunk_size=2, local_chunks=2,
                                                        sinks=1), (q, k, v))


class _Site(torch.nn.Module):
    def __init__(self, mu):
        super().__init__()
        self.register_buffer("mu", mu)

    def forward(self, q, k, v):
        return torch.ops.mta.attention(q, k, v, None, None, None, self.mu, chunk_size=4, sinks=1)


def test_export_with_dynamic_length():
    q, k, v = qkv(1, 2, 2, 20, dtype=torch.float32)
    site = _Site(centroids(2, 3).float())
    n = torch.export.Dim("n", min=2, max=4096)
    ep = torch.export.export(site, (q, k, v), dynamic_shapes=({2: n}, {2: n}, {2: n}), strict=False)
    q2, k2, v2 = qkv(1, 2, 2, 33, dtype=torch.float32, seed=4)
    torch.testing.assert_close(ep.module()(q2, k2, v2), site(q2, k2, v2))


@pytest.mark.parametrize("kwargs,mask_kind,mu_shape,message", [
    (dict(causal=True), "none", (2, 3, 8), "non-causal"),
    (dict(), "causal_padding_4d_min", (2, 3, 8), "non-causal"),  # recognised as causal: refused too
    (dict(top_k=1), "none", (2, 3, 8), "no top_k"),
    (dict(), "random_bool_per_head", (2, 3, 8), "key-padding mask"),
    (dict(), "alibi_bias", (2, 3, 8), "key-padding mask"),
    (dict(), "none", (2, 3, 7), "centroids must be"),
    (dict(), "none", (1, 3, 8), "centroids must be"),
])
def test_refused_inputs_are_clear_errors(kwargs, mask_kind, mu_shape, message):
    q, k, v = qkv(2, 4, 2, 13)
    mu = torch.randn(*mu_shape, dtype=F64)
    with pytest.raises(ValueError, match=message):
        mta(q, k, v, make_mask(mask_kind, 2, 4, 13), None, None, mu, chunk_size=4, **kwargs)
