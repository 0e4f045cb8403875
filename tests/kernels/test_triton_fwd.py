"""The fused Triton forward against the float64 reference, on every branch of the kernel.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before triton is imported) on CPU tensors at small shapes; with CUDA it runs on the GPU, larger shapes
included. bf16 is tested on the GPU only: the interpreter's tl.dot gives wrong results for bf16
inputs (triton 3.9, checked with a bare 16×16 product).
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets the interpreter without CUDA"

triton = pytest.importorskip("triton")

import mta_rewrite  # noqa: E402,F401
from mta_rewrite.kernels import dispatch_cuda  # noqa: E402
from mta_rewrite.kernels.mta_fwd import key_padding, mta_forward_triton  # noqa: E402
from mta_rewrite.ops import mta_attention_reference  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


def inputs(B, Hq, Hkv, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, d, generator=g).to(dtype).to(DEVICE) for h in (Hq, Hkv, Hkv)]


def padding(B, n):
    pad = torch.ones(B, 1, 1, n, dtype=torch.bool)
    pad[0, ..., :5] = False  # left padding
    pad[-1, ..., n - 7:] = False  # right padding
    return pad.to(DEVICE)


# (chunk_size, local_chunks, sinks, top_k): partial last chunk, non-power-of-two chunk, sinks
# inside and beyond the first chunk, selection, one chunk
CONFIGS = [(8, 1, 0, 0), (5, 2, 3, 2), (16, 1, 10, 1), (64, 1, 0, 0)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fp32_every_branch_matches_reference(causal, masked):
    B, Hq, Hkv, n, d = 2, 4, 2, 37, 16  # GQA, n not a multiple of any chunk size
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32)
    mask = padding(B, n) if masked else None
    for c, L, s, top_k in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        out = mta_forward_triton(q, k, v, key_padding(mask, B, Hq, n), **kw)
        ref = mta_attention_reference(q, k, v, mask, **kw)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw}: {m}")


DTYPES = [(torch.float16, 2e-3)] + ([(torch.bfloat16, 1e-2)] if CUDA else [])


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_half_types_match_reference(dtype, tol):
    q, k, v = inputs(1, 2, 1, 40, 32, dtype)
    kw = dict(chunk_size=8, causal=True, local_chunks=2, sinks=2, top_k=1)
    out = mta_forward_triton(q, k, v, None, **kw)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), mta_attention_reference(q, k, v, **kw), rtol=tol, atol=tol)


def test_float_key_padding_and_fully_masked_batch():
    B, n = 2, 24
    q, k, v = inputs(B, 2, 2, n, 16, torch.float32)
    mask = torch.zeros(B, 1, 1, n, device=DEVICE)
    mask[1] = float("-inf")  # the second sequence attends to nothing: zeros, never NaN
    kw = dict(chunk_size=8, causal=False, sinks=2, top_k=1)
    out = mta_forward_triton(q, k, v, key_padding(mask, B, 2, n), **kw)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    torch.testing.assert_close(out.double().cpu(), mta_attention_reference(q, k, v, mask, **kw), rtol=1e-5, atol=1e-5)


def test_mask_classification():
    B, H, n = 2, 4, 10
    assert key_padding(None, B, H, n) is None
    assert key_padding(torch.ones(B, 1, 1, n, dtype=torch.bool), B, H, n).shape == (B, n)
    assert key_padding(torch.ones(B, 1, n, n, dtype=torch.bool), B, H, n) is False  # varies per query
    assert key_padding(torch.ones(B, H, 1, n, dtype=torch.bool), B, H, n) is False  # varies per head
    assert key_padding(torch.randn(1, 1, 1, n), B, H, n) is False  # a bias, not 0/−inf


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,c,causal,top_k", [(1000, 64, True, 2), (4096, 128, False, 0), (4096, 128, True, 4)])
def test_gpu_sizes_and_dispatch(n, c, causal, top_k):
    q, k, v = inputs(1, 8, 2, n, 64, torch.bfloat16)
    kw = dict(chunk_size=c, causal=causal, local_chunks=2, sinks=4, top_k=top_k)
    out = torch.ops.mta.attention(q, k, v, **kw)
    portable = mta_rewrite.ops.mta_attention_chunked(q.float(), k.float(), v.float(), **kw)
    torch.testing.assert_close(out.float(), portable, rtol=2e-2, atol=2e-2)
    mask4d = torch.ones(1, 1, n, n, dtype=torch.bool, device=DEVICE).tril()
    torch.testing.assert_close(dispatch_cuda(q, k, v, mask4d, scale=None, **kw).float(),
                               mta_rewrite.ops.mta_attention_chunked(q.float(), k.float(), v.float(), mask4d, **kw),
                               rtol=2e-2, atol=2e-2)
    q.requires_grad_()
    torch.ops.mta.attention(q, k, v, **kw).float().sum().backward()
    assert q.grad is not None and q.grad.is_cuda and torch.isfinite(q.grad).all()
