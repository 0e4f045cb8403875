"""Soft-capped logits (the op's ``softcap``, Gemma-2) on the Triton forward: every tile path caps
its logits (``mta_fwd._scores``) before the bias and the masks, against the float64 reference; the
CUDA implementations hand the cap to the kernel (or to the op's own exact path for one chunk);
gradients are recomputed through the portable implementation (the Triton backward has no cap).

Without a GPU the kernels run in Triton's interpreter on CPU tensors (conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from .common import CUDA, DEVICE, inputs, padding

triton = pytest.importorskip("triton")

import mta_rewrite  # noqa: E402,F401
from mta_rewrite.kernels.mta_fwd import LaunchConfig, key_padding, mta_forward_triton  # noqa: E402
from mta_rewrite.ops import mta_attention_reference  # noqa: E402
from mta_rewrite.ops.segments import chunk_bounds  # noqa: E402

from .test_triton_fwd import CONFIGS, FUSED, boundary_ids  # noqa: E402

CAP = 1.2  # below these logits' spread: the cap changes every output


def capped_inputs(B, Hq, Hkv, n, d, seed=0):
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=seed)
    return 2 * q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_every_branch_matches_reference(causal, masked):
    """Window, sinks inside and beyond the first chunk, top-k, summaries, GQA, key padding, partial
    last chunk; and the one-loop and tensor-descriptor variants, and the fused launch (causal,
    no top-k)."""
    B, Hq, Hkv, n, d = 2, 4, 2, 37, 16
    q, k, v = capped_inputs(B, Hq, Hkv, n, d)
    mask = padding(B, n) if masked else None
    keep = key_padding(mask, B, Hq, n)
    for c, L, s, top_k in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        ref = mta_attention_reference(q, k, v, mask, softcap=CAP, **kw)
        assert (ref - mta_attention_reference(q, k, v, mask, **kw)).abs().max() > 1e-2
        variants = [None, LaunchConfig(16, 16, 4, 1, one_loop=True), LaunchConfig(16, 16, 4, 1, tma=True)]
        for cfg in variants + (FUSED[:1] if causal and top_k == 0 else []):
            out = mta_forward_triton(q, k, v, keep, launch=cfg, softcap=CAP, **kw)
            torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw} {cfg}: {m}")


def test_learned_boundary_and_clustered_summaries():
    B, Hq, Hkv, n, d = 2, 4, 2, 45, 16
    q, k, v = capped_inputs(B, Hq, Hkv, n, d, seed=3)
    mask = padding(B, n)
    keep = key_padding(mask, B, Hq, n)
    w = torch.randn(Hkv, d, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kw = dict(chunk_size=8, causal=True, local_chunks=2, sinks=3, top_k=1)
    out = mta_forward_triton(q, k, v, keep, summary_weight=w, softcap=CAP, **kw)
    want = mta_attention_reference(q, k, v, mask, summary_weight=w, softcap=CAP, **kw)
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-5)
    ids = boundary_ids(B, n)
    out = mta_forward_triton(q, k, v, keep, chunk_starts=chunk_bounds(ids, B, 8, 3), softcap=CAP, **kw)
    want = mta_attention_reference(q, k, v, mask, segment_ids=ids, softcap=CAP, **kw)
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-5)
    mu = torch.randn(Hkv, 3, d, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    kw = dict(chunk_size=8, local_chunks=1, sinks=2)
    out = mta_forward_triton(q, k, v, keep, centroids=mu, softcap=CAP, **kw)
    want = mta_attention_reference(q, k, v, mask, centroids=mu, softcap=CAP, **kw)
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_the_cuda_implementations_pass_the_cap_on(monkeypatch):
    """``kernels.CUDA`` (what the op runs on CUDA tensors): the kernel gets the cap (fixed chunks,
    boundary chunks, clustered summaries), one chunk runs the op's own soft-capped exact path, a
    mask the kernel does not take the portable implementation with the cap."""
    from mta_rewrite.kernels import CUDA as CUDA_IMPLEMENTATIONS
    from mta_rewrite.kernels import mta_fwd
    from mta_rewrite.ops.attention import _checked

    B, Hq, Hkv, n, d = 2, 4, 2, 40, 16
    q, k, v = capped_inputs(B, Hq, Hkv, n, d, seed=8)
    mask = padding(B, n)
    caps = []
    launch = mta_fwd.mta_forward_triton
    monkeypatch.setattr(mta_fwd, "mta_forward_triton", lambda *a, **kw: caps.append(kw["softcap"]) or launch(*a, **kw))
    ids = boundary_ids(B, n)
    mu = torch.randn(Hkv, 3, d, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    per_query = (torch.rand(B, 1, n, n, generator=torch.Generator().manual_seed(3)) > 0.3).to(DEVICE)
    cases = [(mask, None, None, dict(chunk_size=8, causal=True, sinks=3, top_k=1), 1),
             (mask, ids, None, dict(chunk_size=8, causal=True, sinks=3, top_k=1), 1),
             (mask, None, mu, dict(chunk_size=8, sinks=2), 1),
             (mask, None, None, dict(chunk_size=64, causal=True), 0),  # one chunk: no launch
             (per_query, None, None, dict(chunk_size=8, causal=True, sinks=3, top_k=1), 0)]  # portable
    for m, seg, cent, kw, launches in cases:
        caps.clear()
        kw = dict(dict(scale=None, local_chunks=2, sinks=0, top_k=0, causal=False), **kw)
        out = _checked(CUDA_IMPLEMENTATIONS, q, k, v, m, None, seg, cent, softcap=CAP, **kw)
        want = mta_attention_reference(q, k, v, m, segment_ids=seg, centroids=cent, softcap=CAP, **kw)
        torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-5, msg=lambda e: f"{kw}: {e}")
        assert caps == [CAP] * launches, (kw, caps)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_op_forward_on_the_kernel_and_gradients_recomputed():
    q, k, v, g = inputs(1, 8, 4, 3000, 64, torch.float32, seed=1, grad=True)
    q = (2 * q).requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    kw = dict(chunk_size=128, causal=True, local_chunks=2, sinks=4, top_k=2, softcap=CAP)
    out = torch.ops.mta.attention(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), g)
    cpu = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    want = torch.ops.mta.attention(*cpu, **kw)
    want_grads = torch.autograd.grad(want, cpu, g.cpu().double())
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-4, atol=1e-4)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-3, atol=1e-3)
