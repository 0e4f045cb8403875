"""The fused Triton forward against the float64 reference, on every branch of the kernel.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py
before triton is imported) on CPU tensors at small shapes; with CUDA it runs on the GPU, larger shapes
included. bf16 is tested on the GPU only: the interpreter's tl.dot gives wrong results for bf16
inputs (triton 3.9, checked with a bare 16×16 product).
"""

from __future__ import annotations

import pytest
import torch

from .common import CUDA, DEVICE, inputs, padding, strided

triton = pytest.importorskip("triton")

import mta_rewrite  # noqa: E402,F401
from mta_rewrite.kernels import dispatch_cuda  # noqa: E402
from mta_rewrite.kernels.mta_fwd import LaunchConfig, default_launch, key_padding, mta_forward_triton  # noqa: E402
from mta_rewrite.ops import mta_attention_reference  # noqa: E402


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


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_learned_summaries_match_reference(causal, masked):
    """The pre-pass's learned summaries (one online softmax of k_s·w over each chunk's tiles):
    chunks wider than its tiles, partial last chunk, sinks, key padding, GQA, the top-k selection
    they drive; through the op's dispatch too."""
    B, Hq, Hkv, n, d = 2, 4, 2, 110, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=2)
    w = torch.randn(Hkv, d, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    mask = padding(B, n) if masked else None
    for c, L, s, top_k in [(70, 1, 3, 1), (33, 2, 40, 1)]:  # 70, 33: several of the pre-pass's tiles of 64, 32
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        ref = mta_attention_reference(q, k, v, mask, summary_weight=w, **kw)
        out = mta_forward_triton(q, k, v, key_padding(mask, B, Hq, n), summary_weight=w, **kw)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw}: {m}")
    via_op = torch.ops.mta.attention(q, k, v, mask, w, **kw)  # the CUDA dispatch (the CPU one without CUDA)
    torch.testing.assert_close(via_op.double().cpu(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="learned summaries need the pre-pass"):
        mta_forward_triton(q, k, v, None, chunk_size=8, causal=True, summary_weight=w, launch=FUSED[0])


# Small tiles so that every path of the window loop runs at a small n: whole tiles before the
# block's first row (unmasked), diagonal tiles, a chunk that is not a multiple of BLOCK_M (a
# partial sub-block), sub-blocks wholly past n in the last chunk, key tiles wider than the rows.
# one_loop: window and summaries as one stream of tiles, every mask as data; tma: tiles through
# tensor descriptors (rows past the usable keys read and masked); a register cap goes to the launch.
LAUNCHES = [LaunchConfig(16, 16, 4, 1), LaunchConfig(32, 16, 4, 1), LaunchConfig(16, 32, 4, 1),
            LaunchConfig(16, 16, 4, 1, one_loop=True), LaunchConfig(16, 32, 4, 1, one_loop=True),
            LaunchConfig(16, 16, 4, 1, tma=True), LaunchConfig(32, 16, 4, 1, tma=True, max_registers=128)]
# Summaries pooled inside the main launch (causal, no top-k): producers and waits in ticket order,
# head by head or chunk by chunk.
FUSED = [LaunchConfig(16, 16, 4, 1, fused=True), LaunchConfig(32, 16, 4, 1, fused=True),
         LaunchConfig(16, 16, 4, 1, fused=True, chunk_major=True)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_tile_paths_match_reference(causal, masked):
    B, Hq, Hkv, n, d = 2, 2, 1, 90, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=1)
    mask = padding(B, n) if masked else None
    for c, L, s, top_k in [(40, 1, 0, 0), (24, 2, 3, 1), (33, 1, 0, 0), (16, 2, 10, 0)]:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        ref = mta_attention_reference(q, k, v, mask, **kw)
        for cfg in LAUNCHES + (FUSED if causal and top_k == 0 else []):
            out = mta_forward_triton(q, k, v, key_padding(mask, B, Hq, n), launch=cfg, **kw)
            torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw} {cfg}: {m}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_rows_from_starts_the_grid_at_its_block(causal, masked):
    """``rows_from=r`` (use_mta's prompts continued over a cache): the grid starts at the query
    block holding r, whose rows and all after are the reference's; the rows before that block are
    zeros, not computed (a launch over every block would overwrite them). Blocks narrower than
    the chunk (r inside a chunk's second sub-block), partial last chunk, sinks, top-k, GQA; the
    fused launch computes every row."""
    B, Hq, Hkv, n, d = 2, 4, 2, 90, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=7)
    mask = padding(B, n) if masked else None
    for (c, L, s, top_k), cfg in [((40, 1, 3, 1), LaunchConfig(16, 16, 4, 1)), ((24, 2, 2, 0), LaunchConfig(32, 16, 4, 1)),
                                  ((8, 2, 2, 1), None)]:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        ref = mta_attention_reference(q, k, v, mask, **kw)
        block = (cfg or default_launch(c, d, q.dtype)).block_m
        for rows_from in (1, 20, 57, 89):
            out = mta_forward_triton(q, k, v, key_padding(mask, B, Hq, n), launch=cfg, rows_from=rows_from, **kw)
            row0 = rows_from // c * c + rows_from % c // block * block
            msg = f"{kw} r={rows_from}"
            torch.testing.assert_close(out[:, :, row0:].double().cpu(), ref[:, :, row0:], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{msg}: {m}")
            assert torch.all(out[:, :, :row0] == 0), msg
    if causal:
        kw = dict(chunk_size=8, causal=True, local_chunks=2, sinks=2, top_k=0)
        out = mta_forward_triton(q, k, v, key_padding(mask, B, Hq, n), launch=FUSED[0], rows_from=57, **kw)
        torch.testing.assert_close(out.double().cpu(), mta_attention_reference(q, k, v, mask, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["padding", "per_query"])
def test_rows_from_through_the_cuda_dispatch(mask_kind, monkeypatch):
    """The CUDA implementations (``kernels.CUDA``, what ``attention_autograd(..., rows_from=r)``
    takes on CUDA without gradients) pass ``rows_from`` to the kernel, or for a mask the kernel does
    not take to the portable implementation: the rows from r's chunk on are the reference's, the
    chunks before zeros."""
    from mta_rewrite.kernels import CUDA as CUDA_IMPLEMENTATIONS
    from mta_rewrite.kernels import mta_fwd
    from mta_rewrite.ops.attention import _checked

    B, Hq, Hkv, n, d = 2, 4, 2, 45, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=8)
    if mask_kind == "padding":
        mask = padding(B, n)
    else:
        g = torch.Generator().manual_seed(3)
        mask = (torch.rand(B, 1, n, n, generator=g) > 0.3).to(DEVICE)
    launches = []
    launch = mta_fwd.mta_forward_triton
    monkeypatch.setattr(mta_fwd, "mta_forward_triton",
                        lambda *a, **kw: launches.append(kw["rows_from"]) or launch(*a, **kw))
    kw = dict(chunk_size=8, causal=True, scale=None, local_chunks=2, sinks=3, top_k=1)
    ref = mta_attention_reference(q, k, v, mask, **kw)
    out = _checked(CUDA_IMPLEMENTATIONS, q, k, v, mask, None, None, None, rows_from=30, **kw)
    assert launches == ([30] if mask_kind == "padding" else [])
    torch.testing.assert_close(out[:, :, 24:].double().cpu(), ref[:, :, 24:], rtol=1e-5, atol=1e-5)
    assert torch.all(out[:, :, :24] == 0)


def test_fused_summaries_need_causal_without_selection():
    q, k, v = inputs(1, 2, 2, 40, 16, torch.float32)
    with pytest.raises(ValueError, match="causal=True and top_k=0"):
        mta_forward_triton(q, k, v, None, chunk_size=8, causal=False, launch=FUSED[0])
    with pytest.raises(ValueError, match="causal=True and top_k=0"):
        mta_forward_triton(q, k, v, None, chunk_size=8, causal=True, top_k=1, launch=FUSED[0])
    with pytest.raises(ValueError, match="cannot be combined with fused=True"):
        mta_forward_triton(q, k, v, None, chunk_size=8, causal=True,
                           launch=LaunchConfig(16, 16, 4, 1, fused=True, one_loop=True))
    with pytest.raises(ValueError, match="needs fused=True"):
        mta_forward_triton(q, k, v, None, chunk_size=8, causal=True, launch=LaunchConfig(16, 16, 4, 1, chunk_major=True))
    with pytest.raises(ValueError, match="not with fused or one_loop"):
        mta_forward_triton(q, k, v, None, chunk_size=8, causal=True,
                           launch=LaunchConfig(16, 16, 4, 1, one_loop=True, tma=True))
    q20, k20, v20 = inputs(1, 2, 2, 40, 20, torch.float32)
    with pytest.raises(ValueError, match="power-of-two head size"):
        mta_forward_triton(q20, k20, v20, None, chunk_size=8, launch=LaunchConfig(16, 16, 4, 1, tma=True))
    with pytest.raises(ValueError, match="multiple of 32 bytes"):
        mta_forward_triton(q20, k20, v20, None, chunk_size=8, causal=True,
                           launch=LaunchConfig(16, 16, 4, 1, fused=True, chunk_major=True))


def test_64_bit_offsets_path(monkeypatch):
    """Tensors of 2^31 elements or more index with 64-bit batch and head offsets (WIDE); forced
    here on small tensors, every kernel variant, against the reference."""
    from mta_rewrite.kernels import mta_fwd

    monkeypatch.setattr(mta_fwd, "WIDE_OFFSETS_FROM", 0)
    B, Hq, Hkv, n, d = 2, 2, 1, 70, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=7)
    mask = padding(B, n)
    kw = dict(chunk_size=16, causal=True, local_chunks=2, sinks=3, top_k=1)
    ref = mta_attention_reference(q, k, v, mask, **kw)
    for cfg in (LaunchConfig(16, 16, 4, 1), LaunchConfig(16, 16, 4, 1, tma=True), LaunchConfig(16, 16, 4, 1, one_loop=True)):
        out = mta_forward_triton(q, k, v, key_padding(mask, B, Hq, n), launch=cfg, **kw)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{cfg}: {m}")
    kw["top_k"] = 0
    out = mta_forward_triton(q, k, v, None, launch=LaunchConfig(16, 16, 4, 1, fused=True, chunk_major=True), **kw)
    torch.testing.assert_close(out.double().cpu(), mta_attention_reference(q, k, v, **kw), rtol=1e-5, atol=1e-5)


def test_span_decides_wide_offsets(monkeypatch):
    """The launcher's WIDE switch follows the span a tensor addresses, not its numel: a slice of a
    fused q/k/v projection spans about three times its elements; a transposed buffer spans its
    numel; the output (q's layout) never spans more than q."""
    from mta_rewrite.kernels import mta_fwd

    B, H, n, d = 2, 3, 5, 4
    x = torch.randn(B, H, n, d)
    fused = torch.randn(B, n, 3 * H * d)[..., H * d:2 * H * d].view(B, n, H, d).transpose(1, 2)  # k's slice
    transposed = torch.randn(B, n, H, d).transpose(1, 2)
    assert mta_fwd._span(x) == x.numel() and mta_fwd._span(transposed) == x.numel()
    assert mta_fwd._span(fused) == 1 + sum((s - 1) * st for s, st in zip(fused.shape, fused.stride()))
    assert mta_fwd._span(fused) > 2 * x.numel()
    assert mta_fwd._span(torch.empty(0, 4)) == 0
    assert mta_fwd._span(torch.empty_like(fused)) <= mta_fwd._span(fused)
    monkeypatch.setattr(mta_fwd, "WIDE_OFFSETS_FROM", 2 * x.numel())
    assert mta_fwd._wide(None, x, transposed) is False and mta_fwd._wide(x, fused) is True


@pytest.mark.parametrize("layout", ["transposed", "fused_slice"])
def test_strided_inputs_are_read_in_place(layout, monkeypatch):
    """q, k, v in a model's layouts are read through their strides (no copy), for every variant;
    the output takes q's layout; a strided head dimension, or token offsets past 32 bits, are
    copied first."""
    from mta_rewrite.kernels import mta_fwd

    B, Hq, Hkv, n, d = 2, 4, 2, 45, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=3)
    qs, ks, vs = (strided(x, layout) for x in (q, k, v))
    assert not qs.is_contiguous() and all(mta_fwd._token_rows(x) is x for x in (qs, ks, vs))
    assert mta_fwd._token_rows(q.transpose(2, 3).contiguous().transpose(2, 3)).is_contiguous()  # strided d
    mask = padding(B, n)
    for causal, top_k in ((True, 0), (False, 1)):
        kw = dict(chunk_size=16, causal=causal, local_chunks=2, sinks=3, top_k=top_k)
        ref = mta_attention_reference(q, k, v, mask, **kw)
        for cfg in [LaunchConfig(16, 16, 4, 1), LaunchConfig(16, 16, 4, 1, one_loop=True),
                    LaunchConfig(16, 16, 4, 1, tma=True)] + (FUSED[-1:] if causal else []):
            out = mta_forward_triton(qs, ks, vs, key_padding(mask, B, Hq, n), launch=cfg, **kw)
            assert out.stride() == torch.empty_like(qs).stride()
            torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw} {cfg}: {m}")
            # the same arithmetic on the same values: equal to the contiguous launch, bit for bit
            assert torch.equal(out, mta_forward_triton(q, k, v, key_padding(mask, B, Hq, n), launch=cfg, **kw))
    monkeypatch.setattr(mta_fwd, "WIDE_OFFSETS_FROM", 1000)  # (n − 1)·stride_n + d no longer fits
    assert mta_fwd._token_rows(qs).is_contiguous()
    out = mta_forward_triton(qs, ks, vs, None, chunk_size=16, causal=True)
    torch.testing.assert_close(out.double().cpu(), mta_attention_reference(q, k, v, chunk_size=16, causal=True),
                               rtol=1e-5, atol=1e-5)


def test_head_size_not_a_power_of_two():
    B, n, d = 1, 70, 20  # BLOCK_D = 32: the head dimension is masked in every load
    q, k, v = inputs(B, 2, 2, n, d, torch.float32, seed=2)
    for causal in (False, True):
        kw = dict(chunk_size=24, causal=causal, local_chunks=1, sinks=3, top_k=1)
        out = mta_forward_triton(q, k, v, None, launch=LaunchConfig(16, 16, 4, 1), **kw)
        torch.testing.assert_close(out.double().cpu(), mta_attention_reference(q, k, v, **kw), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("form", ["causal_padding_min", "causal_bool", "key_padding_per_head"])
def test_transformers_style_masks_take_the_kernel(form, monkeypatch):
    """The [B, 1, n, n] masks transformers models pass (the causal triangle ∧ key padding, additive
    with the dtype's minimum or bool; nn.MultiheadAttention's key padding merged per head) run on
    the fused kernel as key padding, and give the reference's output for the mask as given."""
    from mta_rewrite.kernels import mta_fwd

    B, Hq, Hkv, n, d = 2, 4, 2, 45, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=5)
    keep = padding(B, n)
    tri = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()
    if form == "causal_padding_min":
        mask = torch.zeros(B, 1, n, n, device=DEVICE).masked_fill(~(tri & keep), torch.finfo(torch.float32).min)
    elif form == "causal_bool":
        mask = tri.expand(B, 1, n, n).contiguous()
    else:
        mask = keep.expand(B, Hq, n, n).contiguous()
    launches = []
    launch = mta_fwd.mta_forward_triton
    monkeypatch.setattr(mta_fwd, "mta_forward_triton", lambda *a, **kw: launches.append(kw["causal"]) or launch(*a, **kw))
    kw = dict(chunk_size=8, local_chunks=2, sinks=3, top_k=1)
    out = dispatch_cuda(q, k, v, mask, causal=False, scale=None, **kw)
    assert launches == [form != "key_padding_per_head"]  # the kernel ran, causal where the triangle was
    torch.testing.assert_close(out.double().cpu(), mta_attention_reference(q, k, v, mask, causal=False, **kw),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["causal_padding_min", "bias"])
def test_one_chunk_is_sdpa_with_whatever_mask_is_left(form, monkeypatch):
    """An exact configuration (c ≥ n: the exact sites of a rewritten program) runs SDPA, not the
    kernel: the triangle ∧ padding (left padding too: the first queries of that sequence see
    nothing and output zeros) or a bias as SDPA's mask; the reference's output either way."""
    from mta_rewrite.kernels import mta_fwd

    B, Hq, Hkv, n, d = 2, 4, 2, 40, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=6)
    tri = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril()
    if form == "causal_padding_min":
        mask = torch.zeros(B, 1, n, n, device=DEVICE).masked_fill(~(tri & padding(B, n)), torch.finfo(torch.float32).min)
    else:
        mask = torch.randn(1, Hq, n, n, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(2))
    monkeypatch.setattr(mta_fwd, "mta_forward_triton", lambda *a, **kw: pytest.fail("the kernel ran"))
    kw = dict(chunk_size=1 << 30, local_chunks=1, sinks=0, top_k=0)
    out = dispatch_cuda(q, k, v, mask, causal=False, scale=None, **kw)
    torch.testing.assert_close(out.double().cpu(), mta_attention_reference(q, k, v, mask, causal=False, **kw),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,c,causal,top_k", [(1000, 64, True, 2), (4096, 128, False, 0), (4096, 128, True, 4)])
def test_gpu_sizes_and_dispatch(n, c, causal, top_k):
    q, k, v = inputs(1, 8, 2, n, 64, torch.bfloat16)
    kw = dict(chunk_size=c, causal=causal, local_chunks=2, sinks=4, top_k=top_k)
    out = torch.ops.mta.attention(q, k, v, **kw)
    portable = mta_rewrite.ops.mta_attention_chunked(q.float(), k.float(), v.float(), **kw)
    torch.testing.assert_close(out.float(), portable, rtol=2e-2, atol=2e-2)
    idx = torch.arange(n, device=DEVICE)
    banded = (idx[:, None] - idx[None, :]).abs() < n // 3  # varies per query: the portable implementation
    torch.testing.assert_close(dispatch_cuda(q, k, v, banded, scale=None, **kw).float(),
                               mta_rewrite.ops.mta_attention_chunked(q.float(), k.float(), v.float(), banded, **kw),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "banded", "transformers"])
def test_gpu_gradients_match_reference(causal, mask_kind):
    """The op's gradients on the GPU: through the Triton backward (no mask; a transformers-style
    [1, 1, n, n] causal ∧ padding mask, recognised as key padding), and through the portable
    recompute (a mask that varies per query: a banded bool mask). The CPU op in float64
    (gradchecked in tests/ops) is the reference."""
    q, k, v = inputs(1, 4, 2, 200, 32, torch.float32, seed=3)
    kw = dict(chunk_size=16, causal=causal, local_chunks=2, sinks=2, top_k=1)
    idx = torch.arange(200)
    mask = {"none": None, "banded": (idx[:, None] - idx[None, :]).abs() < 150,
            "transformers": (idx[None, None, None, :] <= idx[None, None, :, None]) & (idx >= 7)}[mask_kind]
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    ref_leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    torch.ops.mta.attention(*ref_leaves, mask, **kw).backward(grad_out.double())
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    torch.ops.mta.attention(*leaves, mask.to(DEVICE) if mask is not None else None, **kw).backward(grad_out.to(DEVICE))
    for got, want in zip(leaves, ref_leaves):
        assert got.grad.is_cuda
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,c", [(1000, 64), (8192, 128), (8192, 256)])
def test_gpu_fused_summaries_match_prepass(n, c):
    """At real sizes on the GPU, where programs run concurrently and the waits are real."""
    q, k, v = inputs(2, 8, 2, n, 128, torch.bfloat16, seed=5)
    mask = padding(2, n)
    for keep in (None, key_padding(mask, 2, 8, n)):
        for L, s in ((1, 0), (2, 4)):
            kw = dict(chunk_size=c, causal=True, local_chunks=L, sinks=s)
            want = mta_forward_triton(q, k, v, keep, launch=LaunchConfig(64, 64, 4, 3, fused=False), **kw)
            for chunk_major in (False, True):
                cfg = LaunchConfig(64, 64, 4, 3, fused=True, chunk_major=chunk_major)
                got = mta_forward_triton(q, k, v, keep, launch=cfg, **kw)
                torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,c", [(1000, 64), (8192, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_variants_match_three_loops(n, c, causal):
    """The single-stream, TMA and register-capped variants against the default at real sizes, every option."""
    q, k, v = inputs(2, 8, 2, n, 128, torch.bfloat16, seed=6)
    mask = padding(2, n)
    for keep in (None, key_padding(mask, 2, 8, n)):
        for L, s, top_k in ((1, 0, 0), (2, 4, 2)):
            kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
            want = mta_forward_triton(q, k, v, keep, **kw)  # the default tiles and loops
            base = default_launch(c, 128, torch.bfloat16)
            tiles = (base.block_m, base.block_n, base.num_warps, base.num_stages)
            # one compile per variant and specialisation (the GPU run's time is scarce)
            for other in (LaunchConfig(*tiles, one_loop=True), LaunchConfig(*tiles, tma=True),
                          LaunchConfig(base.block_m, 32, 8, 3, max_registers=128),
                          LaunchConfig(base.block_m, 32, 8, 3, tma=True, max_registers=128)):
                got = mta_forward_triton(q, k, v, keep, launch=other, **kw)
                torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2,
                                           msg=lambda m: f"{kw} {other}: {m}")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_rows_from_without_gradients_only():
    """``attention_autograd(..., rows_from=r)`` on CUDA: without gradients the kernel leaves the
    blocks before r's uncomputed (zeros), the rows after are the op's (to bf16 rounding); where a
    gradient is wanted it is the op (every row, the Triton backward)."""
    from mta_rewrite.ops.attention import attention_autograd

    q, k, v = inputs(1, 8, 2, 4096, 64, torch.bfloat16, seed=9)
    kw = dict(chunk_size=128, causal=True, local_chunks=2, sinks=4, top_k=2)
    whole = torch.ops.mta.attention(q, k, v, None, **kw)
    with torch.no_grad():
        got = attention_autograd(q, k, v, rows_from=3000, **kw)
    assert torch.all(got[:, :, :2944] == 0)
    # (another specialisation of the kernel: the offset is not a multiple of 16)
    torch.testing.assert_close(got[:, :, 2944:], whole[:, :, 2944:], rtol=1.6e-2, atol=1e-2)
    leaf = q.clone().requires_grad_()
    torch.testing.assert_close(attention_autograd(leaf, k, v, rows_from=3000, **kw), whole, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["transposed", "fused_slice"])
def test_gpu_strided_inputs_equal_contiguous(layout):
    """A model's layouts at a real size, read in place: the output equals the contiguous launch's
    bit for bit (the same arithmetic on the same values), through the op as a model calls it."""
    q, k, v = inputs(1, 8, 2, 8192, 128, torch.bfloat16, seed=9)
    kw = dict(chunk_size=256, causal=True, local_chunks=2, sinks=4, top_k=2)
    want = torch.ops.mta.attention(q, k, v, **kw)
    got = torch.ops.mta.attention(*(strided(x, layout) for x in (q, k, v)), **kw)
    assert got.stride() == torch.empty_like(strided(q, layout)).stride()
    assert torch.equal(got, want)
    # and the Triton backward through the op's autograd (fp32 atomics: equal up to their order)
    grad_out = torch.randn_like(q)
    grads = []
    for xs in ((q, k, v), tuple(strided(x, layout) for x in (q, k, v))):
        leaves = [x.detach().requires_grad_() for x in xs]
        torch.ops.mta.attention(*leaves, **kw).backward(grad_out)
        grads.append([x.grad.float() for x in leaves])
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_tensors_past_2_31_elements():
    """17 heads of 2^20 tokens × 128: head 16 starts at element 2^31, past 32-bit offsets. Its
    output must match that of the same head run alone (a small tensor, 32-bit offsets)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs about 20 GB of GPU memory")
    H, n, d = 17, 1 << 20, 128
    g = torch.Generator(device="cuda").manual_seed(8)
    q, k, v = (torch.randn(1, H, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    assert q.numel() >= 2**31
    kw = dict(chunk_size=1024, causal=True)
    last = mta_forward_triton(q, k, v, None, **kw)[:, 16:]
    alone = mta_forward_triton(*(x[:, 16:].contiguous() for x in (q, k, v)), None, **kw)
    # the same arithmetic with 64-bit offsets: equal up to bf16 rounding (an overflowed offset reads
    # another head's data, or faults)
    torch.testing.assert_close(last.float(), alone.float(), rtol=1e-2, atol=1e-2)


def boundary_ids(B, n, seed=4):
    """[B, n] segment ids: runs of random lengths, each sequence its own."""
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum((torch.rand(B, n, generator=g) < 0.15).long(), dim=1).to(DEVICE)


@pytest.mark.parametrize("causal", [False, True])
def test_boundary_chunks_through_the_kernels(causal):
    """Boundary chunks (ops/segments.py): the tokens in padded chunk slots, the slots' padding and
    the user's key padding as one key-padding mask of the fused forward; GQA, sinks, top-k."""
    from mta_rewrite.ops.segments import segmented

    B, Hq, Hkv, n, d = 2, 4, 2, 45, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=3)
    mask, ids = padding(B, n), boundary_ids(B, n)
    for c, L, s, top_k in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        ref = mta_attention_reference(q, k, v, mask, segment_ids=ids, **kw)
        out = segmented(dispatch_cuda, q, k, v, mask, ids, scale=None, **kw)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw}: {m}")
    via_op = torch.ops.mta.attention(q, k, v, mask, None, ids, **kw)  # the CUDA path (the CPU one without CUDA)
    torch.testing.assert_close(via_op.double().cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_boundary_chunks_without_slots(causal, masked):
    """Boundary chunks read where they lie (``chunk_starts``, VARLEN: no padding slots): chunks of
    every length up to c, sequences with different chunk counts (the shorter one's last chunks
    empty), sub-blocks past a chunk's end, GQA, sinks inside and beyond the first chunk, top-k,
    key padding; learned summaries; with key padding also small tiles and the one-loop and
    tensor-descriptor variants."""
    from mta_rewrite.ops.segments import chunk_bounds

    B, Hq, Hkv, n, d = 2, 4, 2, 45, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=3)
    mask = padding(B, n) if masked else None
    ids = boundary_ids(B, n)
    ids[1] = 0  # one long segment: fixed chunks of c in the second sequence, fewer than in the first
    keep = key_padding(mask, B, Hq, n)
    for c, L, s, top_k in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        ref = mta_attention_reference(q, k, v, mask, segment_ids=ids, **kw)
        starts = chunk_bounds(ids, B, c, s)
        variants = (LaunchConfig(16, 16, 4, 1), LaunchConfig(16, 16, 4, 1, one_loop=True),
                    LaunchConfig(16, 16, 4, 1, tma=True)) if masked else ()  # (the interpreter is slow)
        for cfg in (None, *variants):
            out = mta_forward_triton(q, k, v, keep, chunk_starts=starts, launch=cfg, **kw)
            torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw} {cfg}: {m}")
    w = torch.randn(Hkv, d, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    kw = dict(chunk_size=8, causal=causal, local_chunks=2, sinks=3, top_k=1)
    out = mta_forward_triton(q, k, v, keep, chunk_starts=chunk_bounds(ids, B, 8, 3), summary_weight=w, **kw)
    torch.testing.assert_close(out.double().cpu(), mta_attention_reference(q, k, v, mask, segment_ids=ids,
                                                                           summary_weight=w, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_boundary_chunks_rows_from(causal):
    """Boundary chunks with ``rows_from=r``: the grid starts at the first chunk that some sequence
    has not wholly before r; the rows from r on are the reference's, the chunks before that one
    zeros (not computed), in both sequences (different chunk counts), with top-k, sinks, key
    padding; through the CUDA implementations' boundary dispatch too."""
    from mta_rewrite.kernels import CUDA as CUDA_IMPLEMENTATIONS
    from mta_rewrite.ops.attention import _checked
    from mta_rewrite.ops.segments import chunk_bounds

    B, Hq, Hkv, n, d = 2, 4, 2, 45, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=4)
    mask = padding(B, n)
    ids = boundary_ids(B, n)
    ids[1] = 0  # fixed chunks of c in the second sequence
    for c, L, s, top_k in [(8, 2, 3, 1), (5, 1, 0, 0)]:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        ref = mta_attention_reference(q, k, v, mask, segment_ids=ids, **kw)
        starts = chunk_bounds(ids, B, c, s)
        for rows_from in (3, 24, 44):
            out = mta_forward_triton(q, k, v, key_padding(mask, B, Hq, n), chunk_starts=starts, rows_from=rows_from,
                                     **kw)
            msg = f"{kw} r={rows_from}"
            torch.testing.assert_close(out[:, :, rows_from:].double().cpu(), ref[:, :, rows_from:], rtol=1e-5,
                                       atol=1e-5, msg=lambda m: f"{msg}: {m}")
            first = int((starts[:, 1:] <= rows_from).sum(1).min())  # chunks before it: not computed
            for b in range(B):
                assert torch.all(out[b, :, :int(starts[b, first])] == 0), msg
            assert first > 0 or rows_from < 8, msg
        got = _checked(CUDA_IMPLEMENTATIONS, q, k, v, mask, None, ids, None, rows_from=24, scale=None, **kw)
        torch.testing.assert_close(got[:, :, 24:].double().cpu(), ref[:, :, 24:], rtol=1e-5, atol=1e-5)
        first = int((starts[:, 1:] <= 24).sum(1).min())
        assert first > 0 and all(torch.all(got[b, :, :int(starts[b, first])] == 0) for b in range(B))


def test_boundary_dispatch_takes_the_unpadded_kernel(monkeypatch):
    """``dispatch_cuda_boundary``: key padding → the kernels with chunk starts (no slots); a mask
    that varies per query → padded slots, then the fixed-chunk dispatch; the reference's output
    either way."""
    from mta_rewrite.kernels import dispatch_cuda_boundary, mta_fwd

    B, Hq, Hkv, n, d = 2, 4, 2, 45, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=8)
    ids = boundary_ids(B, n, seed=9)
    launched = []
    launch = mta_fwd.mta_forward_triton
    monkeypatch.setattr(mta_fwd, "mta_forward_triton",
                        lambda *a, **kw: launched.append(kw.get("chunk_starts") is not None) or launch(*a, **kw))
    band = torch.ones(n, n, dtype=torch.bool, device=DEVICE).triu(-20).tril(20).expand(B, 1, n, n)
    kw = dict(chunk_size=8, local_chunks=2, sinks=3, top_k=1, scale=None)
    for mask, unpadded in ((padding(B, n), True), (band, False)):
        launched.clear()
        out = dispatch_cuda_boundary(q, k, v, mask, ids, causal=True, **kw)
        assert launched == ([True] if unpadded else []), launched  # the slots' band mask: portable
        kw_ref = {key: val for key, val in kw.items() if key != "scale"}
        torch.testing.assert_close(out.double().cpu(), mta_attention_reference(q, k, v, mask, segment_ids=ids,
                                                                               causal=True, **kw_ref),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="boundary chunks need the pre-pass"):
        mta_forward_triton(q, k, v, None, chunk_size=8, causal=True, chunk_starts=chunk_bounds_of(ids, 8),
                           launch=FUSED[0])


def chunk_bounds_of(ids, c, sinks=0):
    from mta_rewrite.ops.segments import chunk_bounds

    return chunk_bounds(ids, ids.shape[0], c, sinks)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_boundary_chunks_unpadded_equal_slots(causal):
    """bf16 at 8K tokens, segments of ~100 tokens: the op (the unpadded kernels) against the padded
    slots on the same kernels and against the CPU's unpadded path in fp32; gradients (the Triton
    backward reading the chunks where they lie) against the fp32 portable ones."""
    from mta_rewrite.kernels import dispatch_cuda
    from mta_rewrite.ops.segments import segmented
    from mta_rewrite.ops.varlen import mta_attention_varlen

    B, Hq, Hkv, n, d = 2, 8, 2, 8192, 128
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.bfloat16, seed=12)
    g = torch.Generator().manual_seed(3)
    ids = torch.cumsum((torch.rand(B, n, generator=g) < 0.01).long(), dim=1).to(DEVICE)
    keep = padding(B, n)
    kw = dict(chunk_size=128, causal=causal, local_chunks=2, sinks=4, top_k=2)
    out = torch.ops.mta.attention(q, k, v, keep, None, ids, **kw)
    slots = segmented(dispatch_cuda, q, k, v, keep, ids, scale=None, **kw)
    torch.testing.assert_close(out.float(), slots.float(), rtol=2e-2, atol=2e-2)
    kw0 = dict(kw, top_k=0)  # the portable unpadded path takes no top-k
    want = mta_attention_varlen(q.float(), k.float(), v.float(), keep, ids, **kw0)
    torch.testing.assert_close(torch.ops.mta.attention(q, k, v, keep, None, ids, **kw0).float(), want, rtol=2e-2,
                               atol=2e-2)
    qg, kg, vg = (x.float().requires_grad_() for x in (q, k, v))
    torch.ops.mta.attention(qg, kg, vg, keep, None, ids, **kw0).sum().backward()
    qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
    mta_attention_varlen(qr, kr, vr, keep, ids, **kw0).sum().backward()
    for got, ref in ((qg, qr), (kg, kr), (vg, vr)):
        torch.testing.assert_close(got.grad, ref.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_a_sink_logit_sites_operands_match_reference(causal):
    """A site with learned sink logits (GPT-OSS) reaches the kernel with one more token and one
    more dimension (``passes.lower.sink_logit_operands``): a head size that is not a power of two
    (16 + 1), so the tiles' last dimension is masked, and one more sink. Causal without a mask, or
    a key-padding mask that the extra token's column extends."""
    from mta_rewrite.passes.lower import sink_logit_operands

    B, Hq, Hkv, n, d = 2, 4, 2, 45, 16
    q, k, v = inputs(B, Hq, Hkv, n, d, torch.float32, seed=9)
    column = torch.randn(1, Hq, 1, 1, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = None if causal else padding(B, n)
    q1, k1, v1, mask1 = sink_logit_operands(q, k, v, mask, column, d ** -0.5)
    assert q1.shape[-1] == d + 1 and q1.shape[-2] == n + 1
    for c, L, s, top_k in CONFIGS[:3]:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s + 1, top_k=top_k, scale=d ** -0.5)
        out = mta_forward_triton(q1, k1, v1, key_padding(mask1, B, Hq, n + 1), **kw)
        ref = mta_attention_reference(q1, k1, v1, mask1, **kw)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw}: {m}")
