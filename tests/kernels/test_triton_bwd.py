"""The Triton backward (kernels/mta_bwd.py) against float64 autograd, on every branch.

The reference is autograd through the portable implementation in float64 (itself gradchecked in
tests/ops). Without a GPU the kernels run in Triton's interpreter on small shapes; with CUDA, at
real sizes and through the op's own autograd.
"""

from __future__ import annotations

import pytest
import torch

from .common import CUDA, DEVICE, inputs, padding, strided

triton = pytest.importorskip("triton")

import mta_rewrite  # noqa: E402,F401
from mta_rewrite.kernels import backward_cuda  # noqa: E402
from mta_rewrite.kernels.mta_bwd import mta_backward_triton  # noqa: E402
from mta_rewrite.kernels.mta_fwd import LaunchConfig, key_padding  # noqa: E402
from mta_rewrite.ops.chunked import mta_attention_chunked  # noqa: E402


def reference_grads(q, k, v, mask, grad_out, **kw):
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    mask = mask.cpu() if mask is not None else None
    mta_attention_chunked(*leaves, mask, **kw).backward(grad_out.cpu().double())
    return [x.grad for x in leaves]


# (chunk_size, local_chunks, sinks, top_k): partial last chunk, L > 1 with sinks in the first chunk
# and selected chunks, sinks past the first chunk (some inside selected chunks), one chunk wider than n
CONFIGS = [(8, 1, 0, 0), (5, 2, 3, 2), (16, 1, 10, 1), (64, 1, 0, 0), (4, 1, 6, 3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fp32_every_branch_matches_autograd(causal, masked):
    B, Hq, Hkv, n, d = 2, 2, 1, 37, 16  # GQA: the key kernel loops over the group's heads
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, torch.float32, grad=True)
    mask = padding(B, n) if masked else None
    for c, L, s, top_k in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        want = reference_grads(q, k, v, mask, grad_out, **kw)
        # tiles narrower than the chunks: several row and key blocks per chunk; the summaries'
        # gradients by atomics, or by their own kernel
        for cfg, atomics in ((LaunchConfig(16, 16, 4, 1), True), (LaunchConfig(16, 32, 4, 1), True),
                             (LaunchConfig(16, 16, 4, 1), False)):
            got = mta_backward_triton(q, k, v, key_padding(mask, B, Hq, n), grad_out, launch=cfg,
                                      summary_atomics=atomics, **kw)
            for name, g, w in zip("qkv", got, want):
                torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-4,
                                           msg=lambda m: f"d{name} {kw} {cfg} atomics={atomics}: {m}")


@pytest.mark.parametrize("layout", ["transposed", "fused_slice"])
def test_strided_inputs_equal_contiguous(layout):
    """A model's layouts (and an output gradient in another layout than q's): the gradients equal
    those of contiguous inputs bit for bit, q and k read in place where dense."""
    from mta_rewrite.kernels.mta_bwd import _dense_rows

    B, Hq, Hkv, n, d = 2, 2, 2, 37, 16
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, torch.float32, seed=4, grad=True)
    qs, ks, vs = (strided(x, layout) for x in (q, k, v))
    assert (_dense_rows(qs) is qs) == (layout == "transposed")
    mask = padding(B, n)
    for c, L, s, top_k in CONFIGS[:3]:
        kw = dict(chunk_size=c, causal=True, local_chunks=L, sinks=s, top_k=top_k)
        want = mta_backward_triton(q, k, v, key_padding(mask, B, Hq, n), grad_out, **kw)
        got = mta_backward_triton(qs, ks, vs, key_padding(mask, B, Hq, n), strided(grad_out, "transposed"), **kw)
        for name, g, w in zip("qkv", got, want):
            assert torch.equal(g, w), f"d{name} {kw}"


def test_fp16_and_padded_keys_get_no_gradient():
    B, Hq, Hkv, n, d = 2, 2, 2, 40, 16
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, torch.float16, seed=1, grad=True)
    mask = padding(B, n)
    kw = dict(chunk_size=8, causal=True, local_chunks=2, sinks=2)
    dq, dk, dv = mta_backward_triton(q, k, v, key_padding(mask, B, Hq, n), grad_out, **kw)
    want = reference_grads(q.float(), k.float(), v.float(), mask, grad_out.float(), **kw)
    for g, w in zip((dq, dk, dv), want):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g.double().cpu(), w, rtol=2e-2, atol=2e-2)
    assert dk[0, :, :5].abs().max() == 0 and dv[-1, :, n - 7:].abs().max() == 0


def test_backward_dispatch_rules(monkeypatch):
    """Where the Triton backward does not apply, backward_cuda says so (None)."""
    q, k, v, grad_out = inputs(1, 2, 2, 40, 16, torch.float32, grad=True)
    kw = dict(causal=True, scale=None, local_chunks=1, sinks=0)
    assert backward_cuda(q, k, v, None, grad_out, chunk_size=64, top_k=0, **kw) is None  # one chunk: exact
    per_query = torch.ones(40, 40, dtype=torch.bool, device=DEVICE).tril()
    assert backward_cuda(q, k, v, per_query, grad_out, chunk_size=8, top_k=0, **kw) is None  # not key padding
    assert backward_cuda(q.double(), k.double(), v.double(), None, grad_out.double(), chunk_size=8, top_k=0, **kw) is None
    from mta_rewrite.kernels import mta_fwd

    with monkeypatch.context() as patch:  # tensors counted as 2^31 elements or more: 32-bit offsets overflow
        patch.setattr(mta_fwd, "WIDE_OFFSETS_FROM", 0)
        assert backward_cuda(q, k, v, None, grad_out, chunk_size=8, top_k=0, **kw) is None
        with pytest.raises(ValueError, match="fewer than 2"):
            mta_backward_triton(q, k, v, None, grad_out, chunk_size=8)
    got = backward_cuda(q, k, v, None, grad_out, chunk_size=8, top_k=2, **kw)
    for g, w in zip(got, reference_grads(q, k, v, None, grad_out, chunk_size=8, causal=True, top_k=2)):
        torch.testing.assert_close(g.double().cpu(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 3e-2)])
def test_gpu_op_gradients_through_triton_backward(causal, dtype, tol):
    """Through the op's autograd on the GPU (the Triton backward), at sizes with many blocks, GQA,
    key padding, sinks and top-k, against float64 autograd on the CPU."""
    B, Hq, Hkv, n, d = 2, 8, 2, 1500, 64
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, dtype, seed=2, grad=True)
    mask = padding(B, n)
    kw = dict(chunk_size=128, causal=causal, local_chunks=2, sinks=4, top_k=2)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    torch.ops.mta.attention(*leaves, mask, **kw).backward(grad_out)
    want = reference_grads(q.float(), k.float(), v.float(), mask, grad_out.float(), **kw)
    for leaf, w in zip(leaves, want):
        assert leaf.grad.is_cuda and leaf.grad.dtype == dtype
        torch.testing.assert_close(leaf.grad.double().cpu(), w, rtol=tol, atol=tol)


@pytest.mark.parametrize("causal", [False, True])
def test_boundary_chunks_gradients(causal):
    """Boundary chunks: the Triton backward in the padded chunk slots, moved back, against float64
    autograd through the portable boundary MTA (what the op's backward does on CUDA)."""
    from mta_rewrite.ops.segments import from_slots, segment_layout, segmented, slot_mask, to_slots

    B, Hq, Hkv, n, d = 2, 2, 1, 41, 16
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, torch.float32, seed=5, grad=True)
    mask = padding(B, n)
    ids = torch.cumsum((torch.rand(B, n, generator=torch.Generator().manual_seed(1)) < 0.2).long(), 1).to(DEVICE)
    kw = dict(chunk_size=5, causal=causal, scale=None, local_chunks=2, sinks=3, top_k=1)
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    segmented(mta_attention_chunked, *leaves, mask.cpu(), ids.cpu(), **kw).backward(grad_out.cpu().double())
    lay = segment_layout(ids, B, kw["chunk_size"], kw["sinks"])
    got = backward_cuda(*(to_slots(x, lay) for x in (q, k, v)), slot_mask(mask, lay, B, Hq, n), to_slots(grad_out, lay), **kw)
    for name, g, leaf in zip("qkv", got, leaves):
        torch.testing.assert_close(from_slots(g, lay).double().cpu(), leaf.grad, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"d{name}: {m}")
    if CUDA:  # through the op's own autograd
        cuda_leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        torch.ops.mta.attention(*cuda_leaves, mask, None, ids, **kw).backward(grad_out)
        for leaf, want in zip(cuda_leaves, leaves):
            torch.testing.assert_close(leaf.grad.double().cpu(), want.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_boundary_chunks_gradients_without_slots(causal):
    """Boundary chunks read where they lie (``chunk_starts``, VARLEN, as the forward reads them):
    chunks of every length up to c, a second sequence with fewer chunks (its last ones empty),
    sinks inside and beyond the first chunk, L = 2, top-k, GQA, key padding; the summaries'
    gradients by atomics and by their own kernel, tiles narrower than the chunks; against float64
    autograd through the portable boundary MTA."""
    from mta_rewrite.ops.segments import chunk_bounds, segmented

    B, Hq, Hkv, n, d = 2, 4, 2, 41, 16
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, torch.float32, seed=5, grad=True)
    ids = torch.cumsum((torch.rand(B, n, generator=torch.Generator().manual_seed(1)) < 0.2).long(), 1).to(DEVICE)
    ids[0, 2:] += 1  # a first chunk of 2 tokens: chunk starts differ from multiples of c from the start
    ids[1] = 0  # one segment: fixed chunks of c, fewer than the first sequence's
    # (the interpreter is slow: the default launch twice, small tiles with the summaries' own kernel once)
    for mask, (c, L, s, top_k), cfg, atomics in (
            (padding(B, n), (5, 2, 3, 1), None, True), (padding(B, n), (4, 1, 6, 2), None, True),
            (None, (8, 1, 0, 0), LaunchConfig(16, 16, 4, 1), False)):
        kw = dict(chunk_size=c, causal=causal, scale=None, local_chunks=L, sinks=s, top_k=top_k)
        leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
        segmented(mta_attention_chunked, *leaves, None if mask is None else mask.cpu(), ids.cpu(),
                  **kw).backward(grad_out.cpu().double())
        got = mta_backward_triton(q, k, v, key_padding(mask, B, Hq, n), grad_out, launch=cfg, summary_atomics=atomics,
                                  chunk_starts=chunk_bounds(ids, B, c, s), **kw)
        for name, g, leaf in zip("qkv", got, leaves):
            torch.testing.assert_close(g.double().cpu(), leaf.grad, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"d{name} {kw} {cfg} atomics={atomics}: {m}")
    # the op's CUDA backward takes this path for key padding, and the slots for other masks
    band = torch.ones(n, n, dtype=torch.bool, device=DEVICE).triu(-20).tril(20).expand(B, 1, n, n)
    kw = dict(chunk_size=5, causal=causal, scale=None, local_chunks=2, sinks=3, top_k=1)
    assert backward_cuda(q, k, v, band, grad_out, segment_ids=ids, **kw) is None
    got = backward_cuda(q, k, v, padding(B, n), grad_out, segment_ids=ids, **kw)
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    segmented(mta_attention_chunked, *leaves, padding(B, n).cpu(), ids.cpu(), **kw).backward(grad_out.cpu().double())
    for g, leaf in zip(got, leaves):
        torch.testing.assert_close(g.double().cpu(), leaf.grad, rtol=1e-4, atol=1e-4)


def unpadded_against_slots(n, d, dtype, tol, chunk_size):
    """The boundary backward reading chunks where they lie against the fixed-chunk backward in the
    padded slots (the route before it), same dtype: GQA, key padding, L = 2, sinks, top-k."""
    from mta_rewrite.ops.segments import from_slots, segment_layout, slot_mask, to_slots

    B, Hq, Hkv = 2, 4, 2
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, dtype, seed=7, grad=True)
    g = torch.Generator().manual_seed(11)
    ids = torch.cumsum((torch.rand(B, n, generator=g) < 2.0 / chunk_size).long(), 1).to(DEVICE)
    mask = padding(B, n)
    kw = dict(chunk_size=chunk_size, causal=True, scale=None, local_chunks=2, sinks=4, top_k=2)
    got = backward_cuda(q, k, v, mask, grad_out, segment_ids=ids, **kw)
    lay = segment_layout(ids, B, chunk_size, kw["sinks"])
    want = backward_cuda(*(to_slots(x, lay) for x in (q, k, v)), slot_mask(mask, lay, B, Hq, n), to_slots(grad_out, lay),
                         **kw)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a.float(), from_slots(b, lay).float(), rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")


def test_boundary_gradients_unpadded_equal_slots():
    unpadded_against_slots(40, 16, torch.float32, 1e-4, 8)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_boundary_gradients_unpadded_equal_slots():
    """bf16 at 8K tokens, segments of ~64 tokens, c = 128: the unpadded backward against the slots'."""
    unpadded_against_slots(8192, 128, torch.bfloat16, 3e-2, 128)


def learned_reference(q, k, v, w, mask, ids, grad_out, **kw):
    """dq, dk, dv, dw by float64 autograd through the op on the CPU (the portable implementation,
    gradchecked in tests/ops), learned summaries with weight w."""
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v, w)]
    out = torch.ops.mta.attention(*leaves[:3], None if mask is None else mask.cpu(), leaves[3],
                                  None if ids is None else ids.cpu(), **kw)
    out.backward(grad_out.cpu().double())
    return [x.grad for x in leaves]


@pytest.mark.parametrize("causal", [False, True])
def test_learned_summaries_gradients(causal):
    """Learned summaries (``summary_weight``) through the Triton backward: dq, dk, dv and dw,
    fixed chunks and boundary chunks read where they lie; GQA, key padding, sinks inside and
    beyond the first chunk, L = 2, top-k; against float64 autograd through the portable op."""
    from mta_rewrite.ops.segments import chunk_bounds

    B, Hq, Hkv, n, d = 2, 4, 2, 41, 16
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, torch.float32, seed=9, grad=True)
    w = (0.5 * torch.randn(Hkv, d, generator=torch.Generator().manual_seed(3))).to(DEVICE)
    ids = torch.cumsum((torch.rand(B, n, generator=torch.Generator().manual_seed(2)) < 0.2).long(), 1).to(DEVICE)
    for mask, seg, (c, L, s, top_k) in ((padding(B, n), None, (5, 2, 3, 2)), (None, None, (16, 1, 10, 1)),
                                        (padding(B, n), ids, (5, 2, 3, 1)), (None, ids, (8, 1, 0, 0))):
        kw = dict(chunk_size=c, causal=causal, scale=None, local_chunks=L, sinks=s, top_k=top_k)
        want = learned_reference(q, k, v, w, mask, seg, grad_out, **kw)
        starts = None if seg is None else chunk_bounds(seg, B, c, s)
        got = mta_backward_triton(q, k, v, key_padding(mask, B, Hq, n), grad_out, summary_weight=w, chunk_starts=starts,
                                  **kw)
        assert got[3].shape == w.shape and got[3].dtype == w.dtype
        for name, g, ref in zip(("dq", "dk", "dv", "dw"), got, want):
            torch.testing.assert_close(g.double().cpu(), ref, rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{name} {kw} boundary={seg is not None}: {m}")
    # backward_cuda passes the weight's gradient on (the op's CUDA autograd takes it from there)
    got = backward_cuda(q, k, v, padding(B, n), grad_out, summary_weight=w, segment_ids=ids, **kw)
    for g, ref in zip(got, learned_reference(q, k, v, w, padding(B, n), ids, grad_out, **kw)):
        torch.testing.assert_close(g.double().cpu(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("boundary", [False, True])
def test_gpu_learned_gradients_through_the_op(boundary):
    """bf16 at 1500 tokens through the op's autograd on the GPU (the Triton backward), learned
    summaries (an fp32 weight), key padding, sinks, L = 2; against float64 autograd on the CPU."""
    B, Hq, Hkv, n, d = 2, 8, 2, 1500, 64
    q, k, v, grad_out = inputs(B, Hq, Hkv, n, d, torch.bfloat16, seed=2, grad=True)
    w = (0.1 * torch.randn(Hkv, d, generator=torch.Generator().manual_seed(3))).to(DEVICE)
    ids = torch.cumsum((torch.rand(B, n, generator=torch.Generator().manual_seed(4)) < 0.02).long(), 1).to(DEVICE)
    ids = ids if boundary else None
    mask = padding(B, n)
    kw = dict(chunk_size=128, causal=True, local_chunks=2, sinks=4, top_k=0 if boundary else 2)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, w)]
    torch.ops.mta.attention(*leaves[:3], mask, leaves[3], ids, **kw).backward(grad_out)
    want = learned_reference(q.float(), k.float(), v.float(), w, mask, ids, grad_out.float(), **kw)
    for leaf, ref in zip(leaves, want):
        assert leaf.grad.is_cuda and leaf.grad.dtype == leaf.dtype
        torch.testing.assert_close(leaf.grad.double().cpu(), ref, rtol=3e-2, atol=3e-2)
