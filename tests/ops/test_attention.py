"""torch.ops.mta.attention against the float64 reference and against SDPA (MTA_SPEC.md identities)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import mta_rewrite  # noqa: F401  (registers torch.ops.mta.attention)
from mta_rewrite.ops import mta_attention_reference

mta = torch.ops.mta.attention
F64 = torch.float64


def qkv(B=2, Hq=4, Hkv=2, n=13, d=8, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, n, d, generator=g, dtype=F64).to(dtype) for h in (Hq, Hkv, Hkv))


def fmin_where(allowed: torch.Tensor, dtype=F64) -> torch.Tensor:
    """A transformers-style additive mask: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.where(allowed, torch.tensor(0.0, dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def make_mask(kind: str, B: int, Hq: int, n: int) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(1)
    pad = torch.ones(B, 1, 1, n, dtype=torch.bool)
    pad[0, ..., :3] = False  # left padding
    pad[-1, ..., n - 4:] = False  # right padding
    tri = torch.ones(n, n, dtype=torch.bool).tril()
    causal_pad = (tri & pad).expand(B, 1, n, n)
    i = torch.arange(n)
    masks = {
        "none": None,
        "key_padding_bool": pad,
        "key_padding_inf": torch.where(pad, 0.0, float("-inf")).to(F64),
        "key_padding_min": fmin_where(pad),
        "causal_padding_4d_min": fmin_where(causal_pad),  # what transformers' eager path builds
        "causal_padding_4d_bool": causal_pad,  # what its sdpa path builds
        "random_bool_per_head": torch.rand(B, Hq, n, n, generator=g) > 0.3,
        "alibi_bias": -(i[None, :] - i[:, None]).abs().to(F64) * 0.5,
        "key_bias": torch.randn(1, 1, 1, n, generator=g, dtype=F64),
        "constant_bias": torch.full((n, n), 0.7, dtype=F64),
        "block_diagonal_2d": (i[:, None] // 5) == (i[None, :] // 5),
        "per_head_key_padding": torch.rand(B, Hq, 1, n, generator=g) > 0.4,
        "some_rows_fully_masked": torch.zeros(B, 1, n, n, dtype=torch.bool).index_fill_(2, torch.arange(5), True),
        # one value per query for every key (a key dimension of 1): rows wholly allowed or forbidden
        "per_query_key_dim_1": torch.rand(B, 1, n, 1, generator=g) > 0.3,
        # key padding (∧ the triangle) in disguise, as transformers models and nn.MultiheadAttention
        # pass it (ops/masks.simplify_mask turns it back), and near misses that must stay as they are
        "key_padding_4d_materialised": pad.expand(B, Hq, n, n).contiguous(),
        "causal_4d_no_padding_min": fmin_where(tri.expand(B, 1, n, n)),
        "causal_padding_one_entry_off": causal_pad.clone().index_put_((torch.tensor(B - 1), torch.tensor(0),
                                                                       torch.tensor(4), torch.tensor(6)),
                                                                      torch.tensor(True)),  # one future key
        "causal_padding_key_bias": fmin_where(causal_pad) + 0.3 * i * causal_pad,
        # only the first keys' columns (sinks, with sinks ≥ 2) differ between rows: a block is uniform
        # by its summarisable keys, so chunk 0 can still be summarised beyond them
        "sink_columns_vary": torch.ones(n, n, dtype=torch.bool).index_fill_(1, torch.tensor([0, 1]), False)
                             | (i[:, None] % 2 == 0),
    }
    return masks[kind]


MASKS = [
    "none", "key_padding_bool", "key_padding_inf", "key_padding_min", "causal_padding_4d_min",
    "causal_padding_4d_bool", "random_bool_per_head", "alibi_bias", "key_bias", "constant_bias",
    "block_diagonal_2d", "per_head_key_padding", "some_rows_fully_masked", "per_query_key_dim_1",
    "key_padding_4d_materialised",
    "causal_4d_no_padding_min", "causal_padding_one_entry_off", "causal_padding_key_bias", "sink_columns_vary",
]
# (chunk_size, local_chunks, sinks, top_k): partial last chunk, c = 1, c > n, windows, sinks
# inside and beyond the first chunk, selection
CONFIGS = [(4, 1, 0, 0), (3, 2, 2, 1), (5, 1, 7, 2), (4, 2, 0, 3), (1, 1, 0, 0), (100, 1, 0, 0), (2, 3, 1, 2)]


def assert_every_config_matches_reference(q, k, v, mask, causal, **extra) -> list:
    """The op against the float64 reference at every configuration of CONFIGS (``extra``: more
    arguments for both, e.g. ``softcap``); returns the reference outputs."""
    refs = []
    for c, L, s, top_k in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k, **extra)
        out = mta(q, k, v, mask, **kw)
        ref = mta_attention_reference(q, k, v, mask, **kw)
        assert not out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kw}: {m}")
        refs.append(ref)
    return refs


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_every_mask_and_parameter(mask_kind, causal):
    B, Hq, Hkv, n = 2, 4, 2, 13
    q, k, v = qkv(B, Hq, Hkv, n)
    assert_every_config_matches_reference(q, k, v, make_mask(mask_kind, B, Hq, n), causal)


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("Hq,Hkv", [(1, 1), (4, 1), (6, 3)])
def test_matches_reference_shapes(n, Hq, Hkv):
    q, k, v = qkv(1, Hq, Hkv, n, d=5, seed=n)
    for c, causal, top_k in itertools.product([1, 3, 8], [False, True], [0, 2]):
        kw = dict(chunk_size=c, causal=causal, top_k=top_k, sinks=1, scale=0.3)
        torch.testing.assert_close(mta(q, k, v, **kw), mta_attention_reference(q, k, v, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c,top_k", [(4, 0), (4, 2), (100, 0)])  # several chunks, with top-k; one chunk (exact)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "fused_qkv_slice"])
def test_output_takes_the_layout_of_q(c, top_k, layout):
    """Models pass q, k, v as transposed [B, n, H, d] buffers, often slices of one fused q/k/v
    projection; the output has q's layout as ``torch.empty_like(q)`` gives it (the op's fake says
    the same), and its values do not depend on the layout (top-k gathers its chunks from a copy of
    a strided k and v)."""
    q, k, v = qkv(Hkv=4)
    if layout == "transposed":
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    elif layout == "fused_qkv_slice":
        q, k, v = torch.cat([x.transpose(1, 2) for x in (q, k, v)], dim=-1).transpose(1, 2).split(8, dim=-1)
    kw = dict(chunk_size=c, causal=True, sinks=1, top_k=top_k)
    out = mta(q, k, v, **kw)
    assert out.stride() == torch.empty_like(q).stride() and out.dtype == q.dtype
    assert out.is_contiguous() == (layout == "contiguous")
    torch.testing.assert_close(out, mta_attention_reference(q, k, v, **kw), rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the fake (what torch.export records) agrees
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
            assert mta(fq, fk, fv, **kw).stride() == out.stride()


def model_layout(q, k, v, layout: str):
    """q, k, v (same values) as models hand them to attention."""
    if layout == "transposed":  # [B, n, H, d] buffers viewed as [B, H, n, d] (transformers, diffusers)
        return tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert layout == "fused_projection"  # slices of one [B, n, (Hq + 2·Hkv)·d] projection (GPT-2's c_attn)
    flat = torch.cat([x.transpose(1, 2).flatten(2) for x in (q, k, v)], dim=-1)
    parts = flat.split([x.shape[1] * x.shape[3] for x in (q, k, v)], dim=-1)
    return tuple(p.unflatten(-1, x.shape[1::2]).transpose(1, 2) for p, x in zip(parts, (q, k, v)))


@pytest.mark.parametrize("layout", ["transposed", "fused_projection"])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "per_head_key_padding", "alibi_bias"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2)])
def test_model_layouts_in_whole_chunks_match_reference(layout, mask_kind, Hq, Hkv):
    """With whole chunks (nothing padded, so nothing copied first) the op reads a model's layouts
    as they are: each chunk's key and value sums as one matmul over a token's heads side by side,
    the query rows band by band, the output written in q's layout. Values are the reference's,
    gradients the contiguous inputs' (which test_gradcheck checks), whatever the layout."""
    B, n = 2, 16
    q0, k0, v0 = qkv(B, Hq, Hkv, n)
    mask = make_mask(mask_kind, B, Hq, n)
    for causal, top_k in itertools.product([False, True], [0, 2]):
        kw = dict(chunk_size=4, causal=causal, sinks=1, top_k=top_k)
        q, k, v = (x.requires_grad_() for x in model_layout(*(x.detach().clone() for x in (q0, k0, v0)), layout))
        out = mta(q, k, v, mask, **kw)
        assert out.stride() == torch.empty_like(q).stride()
        ref = mta_attention_reference(q0, k0, v0, mask, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        qc, kc, vc = (x.detach().clone().requires_grad_() for x in (q0, k0, v0))
        w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
        for got, want in zip(torch.autograd.grad((out * w).sum(), (q, k, v)),
                             torch.autograd.grad((mta(qc, kc, vc, mask, **kw) * w).sum(), (qc, kc, vc))):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        with torch.no_grad():  # (the forward without autograd: top-k's two key sets)
            torch.testing.assert_close(mta(q, k, v, mask, **kw), ref, rtol=1e-10, atol=1e-10)


def test_fully_masked_rows_are_zero():
    q, k, v = qkv(1, 2, 2, 10)
    mask = torch.ones(1, 1, 10, 10, dtype=torch.bool)
    mask[..., 3, :] = False
    for causal in (False, True):
        out = mta(q, k, v, mask, chunk_size=4, causal=causal)
        assert torch.equal(out[..., 3, :], torch.zeros_like(out[..., 3, :]))
        assert out[..., 4, :].abs().sum() > 0


# ---- identities of MTA_SPEC.md, against SDPA in fp32 ----------------------------------------

def sdpa(q, k, v, mask=None, causal=False, scale=None):
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "alibi_bias", "random_bool_per_head"])
def test_the_reference_itself_holds_the_identities(causal, mask_kind):
    """The float64 reference every other test trusts, against exact attention (SDPA in float64):
    one chunk, a window over every chunk and sinks over every token are exact attention; so are
    summaries of chunks whose keys and values are identical (log n_j); and one summary by hand."""
    B, Hq, Hkv, n, d = 2, 4, 2, 13, 8
    q, k, v = qkv(B, Hq, Hkv, n, d)
    mask = make_mask(mask_kind, B, Hq, n)
    exact = sdpa(q, k, v, mask, causal)
    for kw in (dict(chunk_size=n), dict(chunk_size=3, local_chunks=5), dict(chunk_size=4, sinks=n)):
        torch.testing.assert_close(mta_attention_reference(q, k, v, mask, causal=causal, **kw), exact,
                                   rtol=1e-12, atol=1e-12, msg=lambda m: f"{kw}: {m}")
    if mask_kind == "none":  # with a mask, a chunk's kept keys differ per query block
        k1, v1 = (x[:, :, :1].expand(-1, -1, n, -1).contiguous() for x in (k, v))  # one key, one value throughout
        torch.testing.assert_close(mta_attention_reference(q, k1, v1, chunk_size=3, causal=causal),
                                   sdpa(q, k1, v1, None, causal), rtol=1e-12, atol=1e-12)
    # by hand: n = 4, c = 2, query 0 sees keys 0 and 1 and the mean of keys 2, 3 with log 2 added
    q4, k4, v4 = (x[:1, :1, :4] for x in (q, k, v))
    logits = torch.stack([q4[0, 0, 0] @ k4[0, 0, 0], q4[0, 0, 0] @ k4[0, 0, 1],
                          q4[0, 0, 0] @ k4[0, 0, 2:].mean(0)]) / math.sqrt(d) + torch.tensor([0, 0, math.log(2)], dtype=F64)
    want = torch.softmax(logits, 0) @ torch.stack([v4[0, 0, 0], v4[0, 0, 1], v4[0, 0, 2:].mean(0)])
    torch.testing.assert_close(mta_attention_reference(q4, k4, v4, chunk_size=2)[0, 0, 0], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "causal_padding_4d_bool", "alibi_bias"])
def test_one_chunk_equals_sdpa(causal, mask_kind):
    B, n = 2, 37
    q, k, v = qkv(B, 4, 2, n, d=16, dtype=torch.float32)
    mask = make_mask(mask_kind, B, 4, n)
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    out = mta(q, k, v, mask, chunk_size=n, causal=causal)
    exact = sdpa(q, k, v, mask, causal)
    torch.testing.assert_close(out, exact, rtol=1e-5, atol=1e-5)
    # c ≥ n is the same single chunk
    torch.testing.assert_close(mta(q, k, v, mask, chunk_size=10 * n, causal=causal), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_every_chunk_equals_sdpa(causal):
    n, c = 50, 8
    q, k, v = qkv(1, 2, 2, n, d=16, dtype=torch.float32)
    L = math.ceil(n / c)
    out = mta(q, k, v, chunk_size=c, local_chunks=L, causal=causal)
    torch.testing.assert_close(out, sdpa(q, k, v, causal=causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_identical_keys_within_chunks_are_exact(causal):
    n, c, d = 40, 8, 16
    q, k, v = qkv(1, 2, 2, n, d=d, dtype=torch.float32)
    # every chunk's keys and values identical: its summary (with log n_j) is exactly its tokens
    k = k.view(1, 2, n // c, c, d)[:, :, :, :1].expand(-1, -1, -1, c, -1).reshape(1, 2, n, d)
    v = v.view(1, 2, n // c, c, d)[:, :, :, :1].expand(-1, -1, -1, c, -1).reshape(1, 2, n, d)
    out = mta(q, k, v, chunk_size=c, causal=causal)
    torch.testing.assert_close(out, sdpa(q, k, v, causal=causal), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k,sinks,t", [(0, 0, 20), (1, 3, 23)])
def test_causality(top_k, sinks, t):
    """out[≤ t] does not change when every token after t changes; with top-k, t ends its chunk
    (18 … 23): selection is causal between chunks only (the next test). (The top-k case took
    top_k = 2 with t inside a chunk, where chunk 3 has two summarised chunks and selects both: it
    could not see that.)"""
    n = 45
    q, k, v = qkv(1, 4, 2, n, d=8, dtype=torch.float32)
    kw = dict(chunk_size=6, causal=True, local_chunks=2, top_k=top_k, sinks=sinks)
    out = mta(q, k, v, **kw)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 3
    out2 = mta(q2, k2, v2, **kw)
    torch.testing.assert_close(out[:, :, : t + 1], out2[:, :, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(out[:, :, t + 1:], out2[:, :, t + 1:])


def test_top_k_is_causal_between_chunks_not_within_one():
    """With top-k a chunk's selection ranks by q̄_i, the mean of all its queries (MTA_SPEC.md), so
    out[t] depends on the queries after t in t's own chunk (the spec's causality identity holds
    for top_k = 0, test_causality; with top-k only at chunk granularity): changing every token
    after t's chunk leaves out[≤ t] as it was; changing only the queries after t inside its chunk
    moves it (here by up to 0.34)."""
    n, t, c = 96, 62, 8  # t = 62 in chunk 7 (56 … 63)
    q, k, v = qkv(1, 2, 2, n, d=16, dtype=torch.float32)
    kw = dict(chunk_size=c, causal=True, top_k=1)
    out = mta(q, k, v, **kw)
    g = torch.Generator().manual_seed(3)
    later = [x.clone() for x in (q, k, v)]
    for x in later:
        x[:, :, 64:] = torch.randn(x[:, :, 64:].shape, generator=g) * 3
    torch.testing.assert_close(mta(*later, **kw)[:, :, :64], out[:, :, :64], rtol=0, atol=1e-6)
    moved = 0.0
    for _ in range(5):
        q2 = q.clone()
        q2[:, :, t + 1:64] = torch.randn(q2[:, :, t + 1:64].shape, generator=g) * 3
        moved = max(moved, float((mta(q2, k, v, **kw)[:, :, :t + 1] - out[:, :, :t + 1]).abs().max()))
    assert moved > 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance(causal):
    n, real = 40, 29
    q, k, v = qkv(2, 2, 2, n, d=8, dtype=torch.float32)
    mask = torch.zeros(2, 1, 1, n, dtype=torch.bool)
    mask[..., :real] = True
    kw = dict(chunk_size=6, causal=causal, top_k=1, sinks=2)
    out = mta(q, k, v, mask, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, real:] = torch.randn_like(k2[:, :, real:]) * 5
    v2[:, :, real:] = torch.randn_like(v2[:, :, real:]) * 5
    torch.testing.assert_close(mta(q, k2, v2, mask, **kw)[:, :, :real], out[:, :, :real], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "per_head_key_padding", "causal_padding_4d_min"])
def test_gqa_equals_repeated_heads(mask_kind):
    q, k, v = qkv(2, 6, 2, 23, d=8)
    mask = make_mask(mask_kind, 2, 6, 23)
    for causal, top_k in itertools.product([False, True], [0, 2]):
        kw = dict(chunk_size=4, causal=causal, top_k=top_k, sinks=1)
        grouped = mta(q, k, v, mask, **kw)
        repeated = mta(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask, **kw)
        torch.testing.assert_close(grouped, repeated, rtol=1e-12, atol=1e-12)


# ---- dtypes, gradients, export -------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("causal", [False, True])
def test_dtypes_match_reference(dtype, tol, causal):
    q, k, v = qkv(1, 4, 2, 70, d=32, dtype=dtype)
    mask = make_mask("key_padding_bool", 1, 4, 70)
    kw = dict(chunk_size=16, causal=causal, sinks=4, top_k=1, local_chunks=2)
    out = mta(q, k, v, mask, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    ref = mta_attention_reference(q, k, v, mask, **kw)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_casts_q_k_v_to_its_dtype_as_for_sdpa(dtype):
    """Under torch.autocast the op takes q, k, v in the autocast's dtype, as torch casts SDPA's: a
    model's q and k come out of a float32 rotary embedding while v comes out of a half-precision
    linear, and the op refused the mix ("q, k, v must share one float dtype"). Mixed inputs give
    what the op gives on the three cast, bit for bit; gradients reach the float32 inputs in float32;
    float64 is left as it is (torch's rule), and outside autocast the mix is still an error."""
    q, k = (x.float() for x in qkv(1, 4, 2, 40, d=16, seed=3)[:2])
    v = qkv(1, 4, 2, 40, d=16, seed=4)[2].to(dtype)
    mask = make_mask("key_padding_bool", 1, 4, 40)
    kw = dict(chunk_size=8, causal=True, sinks=2, top_k=1, local_chunks=2)
    q.requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = mta(q, k, v, mask, **kw)
        sdpa_dtype = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)).dtype
    assert out.dtype == dtype == sdpa_dtype
    torch.testing.assert_close(out, mta(q.to(dtype), k.to(dtype), v, mask, **kw), rtol=0, atol=0)
    ref = mta_attention_reference(q.double(), k.double(), v.double(), mask, **kw)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=dtype):
        assert mta(*qkv(1, 4, 2, 40, d=16), chunk_size=8).dtype == torch.float64
    with pytest.raises(TypeError, match="one float dtype"):
        mta(q.detach(), k, v, chunk_size=8)


@pytest.mark.parametrize(
    "kw,mask_kind",
    [
        (dict(chunk_size=3), "none"),
        (dict(chunk_size=2, causal=True, sinks=1, top_k=1, local_chunks=2), "none"),
        (dict(chunk_size=3, top_k=1), "key_padding_bool"),
        (dict(chunk_size=3, causal=True), "causal_padding_4d_min"),
        (dict(chunk_size=2, top_k=1, sinks=1), "causal_padding_4d_bool"),  # recognised: causal + key padding
        (dict(chunk_size=2, sinks=2), "alibi_bias"),
    ],
)
def test_gradcheck(kw, mask_kind):
    B, Hq, Hkv, n = 1, 2, 1, 9
    q, k, v = (x.requires_grad_() for x in qkv(B, Hq, Hkv, n, d=4))
    mask = make_mask(mask_kind, B, Hq, n)
    assert torch.autograd.gradcheck(lambda q, k, v: mta(q, k, v, mask, **kw), (q, k, v))


def test_gradient_only_for_inputs_that_need_it():
    q, k, v = qkv(1, 2, 2, 12, dtype=torch.float32)
    q.requires_grad_()
    mta(q, k, v, chunk_size=4).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and k.grad is None


def _opcheck_cases():
    """Every form of the op's backward: masks simplified by value or not, GQA, top-k and sinks,
    learned summaries, boundary chunks, clustered summaries."""
    n, g = 16, torch.Generator().manual_seed(7)
    ids = torch.zeros(2, n, dtype=torch.long)
    ids[:, 5:] = 1
    ids[1, 11:] = 2
    w = torch.randn(2, 8, generator=g, dtype=torch.float32)
    mu = torch.randn(2, 3, 8, generator=g, dtype=torch.float32)
    return {
        "no mask, causal, sinks, top-k": (None, (None, None, None), dict(chunk_size=4, causal=True, sinks=1, top_k=1)),
        "causal ∧ padding as a 4-D bool mask": ("causal_padding_4d_bool", (None, None, None), dict(chunk_size=4)),
        "key padding, float": ("key_padding_min", (None, None, None), dict(chunk_size=4, top_k=1)),
        "a bias (not simplified)": ("alibi_bias", (None, None, None), dict(chunk_size=4, causal=True)),
        "learned summaries": ("key_padding_bool", (w, None, None), dict(chunk_size=4, causal=True)),
        "boundary chunks": (None, (None, ids, None), dict(chunk_size=4, causal=True, sinks=1)),
        "clustered summaries": ("key_padding_bool", (None, None, mu), dict(chunk_size=4, sinks=1)),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_torch_library_opcheck_passes_backward_traced_too(name):
    """``torch.library.opcheck``: schema, autograd registration, fake tensors, and AOTAutograd
    with dynamic shapes, which traces the backward as torch.compile does. The backward read the
    mask's values (``simplify_mask``) inside the trace and failed ("unhashable type: non-nested
    SymInt"); it is now an op of its own, ``mta::attention_backward``."""
    mask_kind, (w, ids, mu), kw = _opcheck_cases()[name]
    q, k, v = (x.requires_grad_() for x in qkv(2, 4, 2, 16, dtype=torch.float32))
    mask = None if mask_kind is None else make_mask(mask_kind, 2, 4, 16)
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    if w is not None:
        w = w.clone().requires_grad_()
    torch.library.opcheck(mta, (q, k, v, mask, w, ids, mu), kw)


def test_compiled_training_step_traces_the_backward_and_matches_eager():
    """torch.compile (AOTAutograd, without code generation: ``aot_eager``) of a module calling the
    op with a mask: the backward is traced with the rest (no "Error detected in
    GeneratedBackwardFor_mta_attention" warnings, no fallback) and its gradients are eager's."""
    torch.manual_seed(0)
    model = MaskedTinyAttention()
    x = torch.randn(2, 24, 16)
    mask = torch.ones(2, 1, 24, 24, dtype=torch.bool).tril()
    mask[0, ..., :5] = False
    model(x, mask).square().sum().backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    import warnings

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
        compiled(x, mask).square().sum().backward()
    assert not [w for w in caught if "Error detected" in str(w.message)]
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-5, atol=1e-6)


class MaskedTinyAttention(torch.nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)

    def forward(self, x, mask):
        B, n, d = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = torch.ops.mta.attention(q, k, v, mask, chunk_size=4, sinks=1, top_k=1)
        return o.transpose(1, 2).reshape(B, n, d)


class TinyAttention(torch.nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)

    def forward(self, x):
        B, n, d = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = torch.ops.mta.attention(q, k, v, chunk_size=8, causal=True, sinks=2, top_k=1)
        return o.transpose(1, 2).reshape(B, n, d)


def test_export_traces_through_the_op(tmp_path):
    torch.manual_seed(0)
    model = TinyAttention().eval()
    x = torch.randn(2, 40, 16)
    n = torch.export.Dim("n", min=2, max=4096)
    ep = torch.export.export(model, (x,), dynamic_shapes=({1: n},), strict=False)
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    assert torch.ops.mta.attention.default in targets
    for length in (40, 77):
        y = torch.randn(2, length, 16)
        torch.testing.assert_close(ep.module()(y), model(y))
    path = tmp_path / "tiny.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    torch.testing.assert_close(loaded.module()(x), model(x))


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4)), dict(chunk_size=2), "self-attention"),
        ((torch.zeros(1, 3, 8, 4), torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4)), dict(chunk_size=2), "multiple"),
        ((torch.zeros(2, 8, 4), torch.zeros(2, 8, 4), torch.zeros(2, 8, 4)), dict(chunk_size=2), "4-D"),
        ((torch.zeros(1, 2, 8, 4),) * 3, dict(chunk_size=0), "chunk_size"),
        ((torch.zeros(1, 2, 8, 4),) * 3, dict(chunk_size=2, local_chunks=0), "local_chunks"),
        ((torch.zeros(1, 2, 8, 4),) * 3, dict(chunk_size=2, top_k=-1), "top_k"),
        ((torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 2)), dict(chunk_size=2), "k and v must be"),
        ((torch.zeros(1, 2, 0, 4),) * 3, dict(chunk_size=2), "at least 1"),
        # no heads, no head size: were ZeroDivisionErrors (2026-12-07)
        ((torch.zeros(1, 0, 8, 4),) * 3, dict(chunk_size=2), r"^q, k, v need at least one head and a head size d"),
        ((torch.zeros(1, 2, 8, 4), torch.zeros(1, 0, 8, 4), torch.zeros(1, 0, 8, 4)), dict(chunk_size=2),
         "need at least one head"),
        ((torch.zeros(1, 2, 8, 0),) * 3, dict(chunk_size=2), r"a head size d of at least 1; got \(1, 2, 8, 0\)"),
        ((torch.zeros(1, 2, 8, 4),) * 3, dict(chunk_size=2, softcap=-1.0), "softcap must be"),
        ((torch.zeros(1, 2, 8, 4),) * 3 + (None, torch.zeros(2, 3)), dict(chunk_size=2), r"summary_weight must be \[Hkv, d\]"),
        ((torch.zeros(1, 2, 8, 4),) * 3 + (torch.ones(8, 8, dtype=torch.bool, device="meta"),), dict(chunk_size=2),
         "attn_mask is on meta but q is on cpu"),
    ],
)
def test_bad_input_is_a_clear_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mta(*args, **kwargs)


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="one float dtype"):
        mta(*(torch.zeros(1, 2, 8, 4, dtype=torch.int64),) * 3, chunk_size=2)
    with pytest.raises(TypeError, match="one float dtype"):
        mta(torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4, dtype=torch.float64), torch.zeros(1, 2, 8, 4), chunk_size=2)
    # (torch's dispatcher lets None through as a Tensor argument: it was "'NoneType' object has no attribute 'dim'")
    with pytest.raises(TypeError, match=r"^q must be a tensor \[B, H, n, d\], got NoneType$"):
        mta(None, torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 8, 4), chunk_size=2)


def test_bad_mask_is_a_clear_error():
    q = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        mta(q, q, q, torch.ones(1, 3, 8, 8, dtype=torch.bool), chunk_size=2)
    with pytest.raises(TypeError, match="bool or floating"):
        mta(q, q, q, torch.ones(8, 8, dtype=torch.int64), chunk_size=2)


_PEAK_MEMORY_SCRIPT = """
import resource, sys, torch, mta_rewrite
n, causal = int(sys.argv[1]), sys.argv[2] == "1"
q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
mask = torch.ones(1, 1, 1, n, dtype=torch.bool) if sys.argv[3] == "1" else None
torch.ops.mta.attention(q[..., :64, :], k[..., :64, :], v[..., :64, :], chunk_size=8)  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.ops.mta.attention(q, k, v, mask, chunk_size=128, causal=causal)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.parametrize("causal,key_padding", [(False, False), (True, False), (True, True)])
def test_no_n_by_n_memory(causal, key_padding):
    """At n = 16384 an n×n fp32 score matrix is 1 GiB; the op must stay far below it."""
    import subprocess
    import sys

    n = 16384
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_SCRIPT, str(n), str(int(causal)), str(int(key_padding))],
        capture_output=True, text=True, check=True,
    )
    grown = int(run.stdout.strip().splitlines()[-1])
    assert grown < n * n * 4 / 16, f"peak memory grew by {grown / 2**20:.0f} MiB"


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_min", "causal_padding_4d_bool"])
def test_many_causal_bands_match_reference(mask_kind):
    """nc = 32 query chunks: the causal path splits them into bands of different key widths."""
    q, k, v = qkv(1, 2, 1, 64, d=4, seed=3)
    mask = make_mask(mask_kind, 1, 2, 64)
    kw = dict(chunk_size=2, causal=True, local_chunks=2, sinks=3, top_k=2)
    torch.testing.assert_close(mta(q, k, v, mask, **kw), mta_attention_reference(q, k, v, mask, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True])
def test_bands_of_one_chunk_match_reference(one_chunk_bands, mask_kind, causal):
    """Band by band (memory-bounded key sets): every band edge cuts the window, the selected and
    non-uniform chunks, the summaries (causal: a different width per band) and the masks."""
    B, Hq, Hkv, n = 2, 4, 2, 13
    q, k, v = qkv(B, Hq, Hkv, n, seed=5)
    mask = make_mask(mask_kind, B, Hq, n)
    for c, L, s, top_k in CONFIGS:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        ref = mta_attention_reference(q, k, v, mask, **kw)
        torch.testing.assert_close(mta(q, k, v, mask, **kw), ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kw}: {m}")


@pytest.mark.parametrize("kw", [dict(chunk_size=2, causal=True, sinks=1, top_k=1, local_chunks=2),
                                dict(chunk_size=3, top_k=1, local_chunks=2)])
def test_bands_of_one_chunk_gradcheck(one_chunk_bands, kw):
    q, k, v = (x.requires_grad_() for x in qkv(1, 2, 1, 9, d=4))
    mask = make_mask("key_padding_bool", 1, 2, 9)
    assert torch.autograd.gradcheck(lambda q, k, v: mta(q, k, v, mask, **kw), (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["bool_per_query", "bias", "key_padding", "finite_min"])
def test_one_chunk_with_a_mask_is_exact_attention(kind, causal):
    """One chunk (c ≥ n) is exact attention, run by SDPA with the mask (ops.attention.exact_sdpa):
    equal to the float64 reference for masks that vary per query, carry a bias, pad keys or use
    the finite minimum as "forbidden" (transformers'), with GQA; gradients too."""
    q, k, v = qkv(2, 4, 2, 11, seed=3)
    g = torch.Generator().manual_seed(1)
    if kind == "bool_per_query":
        mask = torch.rand(2, 4, 11, 11, generator=g) > 0.4
        mask[..., 0] = True  # every query attends to something
    elif kind == "bias":
        mask = torch.randn(1, 4, 11, 11, generator=g, dtype=F64)
    elif kind == "key_padding":
        mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
        mask[1, ..., 8:] = False
    else:
        mask = torch.zeros(2, 1, 11, 11, dtype=F64)
        mask[..., 5:] = torch.finfo(F64).min
    kw = dict(chunk_size=64, causal=causal, scale=0.4)
    torch.testing.assert_close(mta(q, k, v, mask, **kw), mta_attention_reference(q, k, v, mask, **kw),
                               rtol=1e-10, atol=1e-10)
    inputs = tuple(x[:, :, :6].clone().requires_grad_() for x in (q, k, v))  # gradients, on fewer tokens
    small = mask[..., :6, :6] if mask.shape[-2] > 1 else mask[..., :6]
    assert torch.autograd.gradcheck(lambda q, k, v: mta(q, k, v, small, **kw), inputs)


@pytest.mark.parametrize("causal", [False, True])
def test_one_chunk_with_an_empty_row_outputs_zeros_there(causal):
    """A query the mask leaves nothing to attend to outputs zeros (the op's rule; SDPA alone gives
    NaN or an average there): a fully masked row, and left padding under the triangle (the first
    queries see only padded keys); finite gradients."""
    q, k, v = qkv(2, 2, 2, 9)
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    mask[0, ..., 4, :] = False
    mask[1, ..., :3] = False  # left padding: with causality queries 0-2 of sequence 1 see nothing
    out = mta(q, k, v, mask, chunk_size=64, causal=causal)
    assert torch.all(out[0, :, 4] == 0) and torch.all(out[1, :, :3] == 0) == causal
    torch.testing.assert_close(out, mta_attention_reference(q, k, v, mask, chunk_size=64, causal=causal),
                               rtol=1e-10, atol=1e-10)
    inputs = tuple(x.clone().requires_grad_() for x in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: mta(q, k, v, mask, chunk_size=64, causal=causal), inputs)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("chunk_size", [4, 64])  # several chunks; one chunk (SDPA)
def test_causal_with_a_scale_of_zero_or_below(chunk_size, scale, dtype):
    """A scale ≤ 0 with causality: uniform attention over the past (0), or the keys least like the
    query weighed most (< 0), as the float64 reference computes it; no NaN. (The CPU flash kernel's
    is_causal scales its −inf for future keys with the row and returned NaN for every query but the
    last: one chunk, run by SDPA, takes the triangle as a mask instead.)"""
    q, k, v = qkv(2, 4, 2, 13, dtype=dtype, seed=5)
    kw = dict(chunk_size=chunk_size, causal=True, scale=scale)
    out = mta(q, k, v, **kw)
    torch.testing.assert_close(out.double(), mta_attention_reference(q, k, v, **kw),
                               rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=1e-6 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "per_head_key_padding", "key_bias"])
@pytest.mark.parametrize("causal", [False, True])
def test_top_k_two_key_sets_equal_one(mask_kind, causal, monkeypatch):
    """With top-k and no gradient wanted (the op's forward) each band runs as two key sets merged by
    their log-sum-exps (window and sinks per key/value head, selected chunks and summaries per
    query head: ``ops.chunked._TopKSplit``; where a group's query heads share k or the terms would
    need the extra column); with a gradient wanted, as one key set per query head.
    Both against the float64 reference: GQA (with a per-head mask, k repeated per head), sinks
    over two chunks that top-k selects (top_k ≥ the chunk count: every chunk outside the window;
    each sink attended once), key padding per batch (part A's terms in the extra head column when
    causal), a key bias (non-uniform blocks, exact in part B)."""
    import mta_rewrite.ops.chunked as chunked

    bands = []
    band = chunked._TopKSplit.band
    monkeypatch.setattr(chunked._TopKSplit, "band", lambda self, *a: bands.append(a) or band(self, *a))
    B, Hq, Hkv, n = 2, 6, 2, 37
    q, k, v = qkv(B, Hq, Hkv, n)
    mask = make_mask(mask_kind, B, Hq, n)
    for c, L, s, top_k in [(3, 2, 5, 2), (4, 1, 6, 20), (5, 2, 0, 1)]:
        kw = dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
        want = mta_attention_reference(q, k, v, mask, **kw)
        del bands[:]
        with torch.no_grad():
            got = mta(q, k, v, mask, **kw)
        # (not taken where it saves nothing: a per-head mask copies k per head, and without causality
        # its terms need no extra column)
        assert bool(bands) == (causal or mask_kind != "per_head_key_padding")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"two key sets {kw}: {m}")
        del bands[:]
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        from mta_rewrite.ops.attention import attention_autograd

        got = attention_autograd(*leaves, mask, **kw)
        assert not bands, "with a gradient wanted, one key set"
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-10, msg=lambda m: f"one key set {kw}: {m}")


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "causal_padding_4d_bool", "random_bool_per_head"])
@pytest.mark.parametrize("top_k", [0, 1])
def test_rows_from_leaves_the_chunks_before_it_uncomputed(mask_kind, top_k):
    """``attention_autograd(..., rows_from=r)`` (use_mta's prompts continued over a cache): the
    rows of the chunk holding r and after are the reference's, the chunks wholly before it zeros
    (not computed); r = 0 is the op."""
    from mta_rewrite.ops.attention import attention_autograd

    B, Hq, n = 2, 4, 37
    q, k, v = qkv(B, Hq, 2, n)
    mask = make_mask(mask_kind, B, Hq, n)
    kw = dict(chunk_size=5, causal=True, local_chunks=2, sinks=2, top_k=top_k)
    want = mta_attention_reference(q, k, v, mask, **kw)
    assert torch.equal(attention_autograd(q, k, v, mask, **kw), mta(q, k, v, mask, **kw))
    for rows_from in (1, 12, 36):
        got = attention_autograd(q, k, v, mask, rows_from=rows_from, **kw)
        first = rows_from // 5 * 5
        torch.testing.assert_close(got[:, :, first:], want[:, :, first:], rtol=1e-10, atol=1e-10)
        assert torch.all(got[:, :, :first] == 0)
    # a caller that reads no row (rows_from = n, a multiple of c): zeros, no band to run
    q, k, v = qkv(B, Hq, 2, 40)
    assert torch.all(attention_autograd(q, k, v, make_mask(mask_kind, B, Hq, 40), rows_from=40, **kw) == 0)


def test_a_sliding_window_within_the_local_chunks_is_exact_but_for_a_short_last_chunk():
    """A band mask (a sliding window of w ≤ c·L keys) on a prompt: every full chunk of queries sees
    the chunk outside its window in varying parts (MTA_SPEC: that block exact) or not at all, so its
    rows equal exact attention; a last chunk of one query sees part of that chunk uniformly, and
    the spec summarises those keys (found by a random search of decoding, 2026-12-06: docs/api.md,
    sliding-window layers). The op agrees with the reference on every row."""
    torch.manual_seed(0)
    n, w = 65, 16
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    i = torch.arange(n)
    band = (i[None] <= i[:, None]) & (i[None] > i[:, None] - w)
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    for c, L in ((16, 1), (8, 2)):
        ref = mta_attention_reference(q, k, v, attn_mask=band, chunk_size=c, local_chunks=L, causal=True)
        got = mta(q, k, v, band, chunk_size=c, local_chunks=L, causal=True)
        torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-12, atol=1e-12)
        off = (ref - exact).abs().amax((0, 1, 3))
        assert (off[:64] < 1e-12).all() and off[64] > 1e-3, (c, L, off)
