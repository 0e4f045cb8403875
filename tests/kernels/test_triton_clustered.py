"""Clustered summaries on the Triton kernels (``kernels/clusters.py`` and the main kernel's
CLUSTERED path) against the float64 reference of the spec, and the CUDA dispatch that takes them;
their Triton backward (``mta_bwd.py``'s CLUSTERED path) against float64 autograd through the
portable implementation.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest.py); with CUDA, on
the GPU, larger shapes against the portable implementation (itself tested against the reference
in tests/ops/test_clustered.py).
"""

from __future__ import annotations

import pytest
import torch

from .common import CUDA, DEVICE, inputs, padding

triton = pytest.importorskip("triton")

import mta_rewrite  # noqa: E402,F401
from mta_rewrite.kernels import backward_cuda, dispatch_cuda_clustered  # noqa: E402
from mta_rewrite.kernels.mta_bwd import mta_backward_triton  # noqa: E402
from mta_rewrite.kernels.clusters import nearest_clusters  # noqa: E402
from mta_rewrite.kernels.mta_fwd import LaunchConfig, key_padding, mta_forward_triton  # noqa: E402
from mta_rewrite.ops import mta_attention_reference  # noqa: E402
from mta_rewrite.ops.clustered import assign_clusters, mta_attention_clustered  # noqa: E402

# (chunk_size, local_chunks, sinks): partial last chunk, a non-power-of-two chunk with a wider
# window and sinks in the first chunk, sinks beyond the first chunk
CONFIGS = [(8, 1, 0), (5, 2, 3), (16, 1, 10)]


def centroids(Hkv, K, d, seed=4):
    return torch.randn(Hkv, K, d, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("K", [1, 3, 40])  # 40: two tiles of clusters in both pre-pass kernels, more than nc
def test_clustered_summaries_match_reference(masked, K):
    B, Hq, Hkv, n, d = 2, 4, 2, 37, 16  # GQA, n not a multiple of any chunk size
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=3)
    mask = padding(B, n) if masked else None
    mu = centroids(Hkv, K, d)
    for c, L, s in CONFIGS:
        kw = dict(chunk_size=c, local_chunks=L, sinks=s)
        ref = mta_attention_reference(q, k, v, mask, centroids=mu, **kw)
        out = mta_forward_triton(q, k, v, key_padding(mask, B, Hq, n), centroids=mu, **kw)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw}: {m}")


def test_tiles_and_tma_match_reference():
    """Small tiles (several window and summary tiles per block, partial sub-blocks) and the
    summaries read through tensor descriptors: rows i·K + m of the per-query-chunk summaries."""
    B, Hq, Hkv, n, d = 1, 2, 1, 90, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=1)
    mu = k[0, :, ::6].clone()  # [1, 15, d]: centroids drawn from the keys, as k-means starts
    mask = padding(B, n)
    for cfg in (LaunchConfig(16, 16, 4, 1), LaunchConfig(32, 16, 4, 1), LaunchConfig(16, 16, 4, 1, tma=True)):
        for c, L, s in [(24, 2, 3), (33, 1, 0)]:
            kw = dict(chunk_size=c, local_chunks=L, sinks=s)
            ref = mta_attention_reference(q, k, v, mask, centroids=mu, **kw)
            out = mta_forward_triton(q, k, v, key_padding(mask, B, Hq, n), centroids=mu, launch=cfg, **kw)
            torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw} {cfg}: {m}")


def test_nearest_clusters_are_the_portable_choice():
    """The kernel's assignment (fp32, centroids in tiles, ties to the lower index) is the portable
    implementation's, key for key; duplicated centroids tie, and the lower index wins."""
    k = inputs(2, 3, 3, 150, 24, torch.float32, seed=9)[1]
    mu = centroids(3, 45, 24)
    mu[:, 40] = mu[:, 7]  # a tie across two tiles of 32 centroids
    ids = nearest_clusters(k, mu)
    assert ids.dtype == torch.int32
    assert torch.equal(ids.long().cpu(), assign_clusters(k, mu).cpu())
    assert not (ids == 40).any() and (ids == 7).any()


def test_half_precision_and_the_dispatch(monkeypatch):
    """fp16 through the kernels, and ``dispatch_cuda_clustered``'s routes: no mask or key padding
    → the kernels, key padding that differs per head → the portable implementation, one chunk →
    SDPA; the reference's output on every route."""
    from mta_rewrite.kernels import mta_fwd

    B, Hq, Hkv, n, d = 2, 4, 2, 40, 32
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float16, seed=5)
    mu = centroids(Hkv, 6, d)
    kw = dict(chunk_size=8, local_chunks=2, sinks=2)
    out = mta_forward_triton(q, k, v, None, centroids=mu, **kw)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double().cpu(), mta_attention_reference(q, k, v, centroids=mu, **kw), rtol=2e-3,
                               atol=2e-3)

    q, k, v = inputs(B, Hq, Hkv, n, 16, torch.float32, seed=6)
    mu = centroids(Hkv, 6, 16)
    launched = []
    launch = mta_fwd.mta_forward_triton
    monkeypatch.setattr(mta_fwd, "mta_forward_triton",
                        lambda *a, **kws: launched.append(kws["centroids"] is not None) or launch(*a, **kws))
    per_head = padding(B, n).expand(B, Hq, 1, n).clone()
    per_head[:, 1, :, 10:14] = False
    for mask, kernel, config in ((None, True, kw), (padding(B, n), True, kw), (per_head, False, kw),
                                 (padding(B, n), False, dict(chunk_size=n, local_chunks=1, sinks=0))):
        launched.clear()
        got = dispatch_cuda_clustered(q, k, v, mask, scale=None, centroids=mu, **config)
        assert launched == ([True] if kernel else []), (mask, config)
        torch.testing.assert_close(got.double().cpu(), mta_attention_reference(q, k, v, mask, centroids=mu, **config),
                                   rtol=1e-5, atol=1e-5)


def test_what_clustered_summaries_refuse():
    q, k, v = inputs(1, 2, 2, 40, 16, torch.float32)
    mu = centroids(2, 4, 16)
    starts = torch.arange(0, 41, 8, dtype=torch.int32, device=DEVICE).view(1, 6)  # boundary chunks
    for kw in (dict(causal=True), dict(top_k=1), dict(launch=LaunchConfig(16, 16, 4, 1, one_loop=True)),
               dict(chunk_starts=starts)):
        with pytest.raises(ValueError, match="non-causal, without top_k"):
            mta_forward_triton(q, k, v, None, chunk_size=8, centroids=mu, **kw)


def reference_grads(q, k, v, mask, grad_out, mu, **kw):
    """dq, dk, dv of the portable clustered implementation by float64 autograd (the cluster choice
    made in float64 too: the tests' random centroids leave no key near a tie)."""
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    mask = mask.cpu() if mask is not None else None
    mta_attention_clustered(*leaves, mask, centroids=mu.cpu().double(), **kw).backward(grad_out.cpu().double())
    return [x.grad for x in leaves]


@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_autograd(masked):
    """The Triton backward of clustered summaries on every branch: GQA; a partial last chunk, a
    wider window with sinks in the first chunk, sinks beyond it; one tile of clusters and two
    (K = 40 against 32-wide tiles), an empty cluster (a centroid far from every key) and clusters
    emptied by a query chunk's window; the summaries' gradients by atomics and by their own kernel,
    with tiles narrower than the chunks."""
    B, Hq, Hkv, n, d = 2, 4, 2, 37, 16
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, torch.float32, seed=8, grad=True)
    mask = padding(B, n) if masked else None
    for (c, L, s), K, cfg, atomics in zip(CONFIGS, (3, 40, 6), (None, LaunchConfig(16, 16, 4, 1), None),
                                          (True, False, not masked)):
        mu = centroids(Hkv, K, d)
        mu[:, -1] += 100.0  # no key is nearest to it
        kw = dict(chunk_size=c, local_chunks=L, sinks=s)
        want = reference_grads(q, k, v, mask, grad_out, mu, **kw)
        got = mta_backward_triton(q, k, v, key_padding(mask, B, Hq, n), grad_out, centroids=mu, launch=cfg,
                                  summary_atomics=atomics, **kw)
        for name, g, w in zip("qkv", got, want):
            torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"d{name} {kw} K={K} {cfg} atomics={atomics}: {m}")


def test_backward_dispatch_and_refusals():
    """``backward_cuda`` takes clustered summaries for key padding (the gradients of the reference)
    and says None where the forward did not run the kernels (a mask that differs per head, one
    chunk: SDPA); the launcher refuses what the clustered forward refuses."""
    B, Hq, Hkv, n, d = 2, 2, 1, 40, 16
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, torch.float32, seed=2, grad=True)
    mu = centroids(Hkv, 4, d)
    kw = dict(causal=False, scale=None, local_chunks=2, sinks=2, top_k=0)
    mask = padding(B, n)
    got = backward_cuda(q, k, v, mask, grad_out, chunk_size=8, centroids=mu, **kw)
    want = reference_grads(q, k, v, mask, grad_out, mu, chunk_size=8, local_chunks=2, sinks=2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-4)
    per_head = mask.expand(B, Hq, 1, n).clone()
    per_head[:, 1, :, 10:14] = False
    assert backward_cuda(q, k, v, per_head, grad_out, chunk_size=8, centroids=mu, **kw) is None
    assert backward_cuda(q, k, v, None, grad_out, chunk_size=n, centroids=mu, **kw) is None
    starts = torch.arange(0, 41, 8, dtype=torch.int32, device=DEVICE).view(1, 6).expand(B, 6)
    for bad in (dict(causal=True), dict(top_k=1), dict(chunk_starts=starts)):
        with pytest.raises(ValueError, match="non-causal, without top_k"):
            mta_backward_triton(q, k, v, None, grad_out, chunk_size=8, centroids=mu, **bad)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,c,K", [(4096, 128, 32), (4096, 64, 64), (8192, 256, 32)])
def test_gpu_sizes_match_portable(n, c, K):
    """bf16 at real sizes through the op (the CUDA dispatch → the kernels) against the portable
    implementation in fp32 on the same inputs; the gradients (the op's autograd: the Triton
    backward) against fp32 autograd through the portable implementation."""
    B, Hq, Hkv, d = 1, 8, 2, 128
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.bfloat16, seed=11)
    mu = k[0, :, ::max(1, n // K)][:, :K].float().clone()
    keep = padding(B, n)
    kw = dict(chunk_size=c, local_chunks=2, sinks=4)
    out = torch.ops.mta.attention(q, k, v, keep, None, None, mu, **kw)
    want = mta_attention_clustered(q.float(), k.float(), v.float(), keep, centroids=mu, **kw)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)
    grad_out = torch.randn_like(q)
    ref = [x.float().requires_grad_() for x in (q, k, v)]
    mta_attention_clustered(*ref, keep, centroids=mu, **kw).backward(grad_out.float())
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        torch.ops.mta.attention(*leaves, keep, None, None, mu, **kw).backward(grad_out.to(dtype))
        for got, want in zip(leaves, ref):
            assert got.grad.dtype == dtype
            torch.testing.assert_close(got.grad.float(), want.grad, rtol=tol, atol=tol, msg=lambda m: f"{dtype}: {m}")
