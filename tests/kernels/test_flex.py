"""MTA as FlexAttention (kernels/flex.py), the GPU baseline, against the float64 reference.

On the CPU flex_attention runs eagerly, and the eager path applies ``mask_mod`` to every pair: it
ignores which blocks the BlockMask lists. So the block mask is checked on its own: the attention
that its blocks imply (listed partial blocks through mask_mod, full blocks wholly allowed, the
rest forbidden) must equal the reference, and its classification must match a dense evaluation.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mta_rewrite.kernels.flex import mta_block_mask, mta_flex_attention
from mta_rewrite.ops import mta_attention_reference

# (B, Hq, Hkv, n, d, chunk, L, causal, block): partial last chunk and block, GQA, L > 1, full
# blocks (chunks wider than blocks), one chunk (exact), chunks narrower than blocks
CASES = [
    (1, 2, 2, 70, 16, 8, 1, True, 16),
    (2, 4, 2, 90, 16, 24, 2, False, 16),
    (1, 2, 1, 200, 8, 32, 2, True, 16),
    (1, 2, 2, 200, 8, 32, 1, False, 16),
    (1, 2, 2, 100, 8, 7, 3, True, 32),
    (1, 2, 2, 33, 8, 40, 1, True, 16),
]


def qkv(B, Hq, Hkv, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, d, generator=g) for h in (Hq, Hkv, Hkv)]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")  # eager on the CPU: "use torch.compile"
        yield


@pytest.mark.parametrize("B,Hq,Hkv,n,d,c,L,causal,block", CASES)
def test_flex_matches_reference(B, Hq, Hkv, n, d, c, L, causal, block):
    q, k, v = qkv(B, Hq, Hkv, n, d)
    kw = dict(chunk_size=c, causal=causal, local_chunks=L)
    bm = mta_block_mask(n, block=block, **kw)
    out = mta_flex_attention(q, k, v, block_mask=bm, **kw)
    torch.testing.assert_close(out.double(), mta_attention_reference(q, k, v, **kw), rtol=1e-5, atol=1e-5)


def _dense_from_blocks(bm, n, n_kv, block):
    """What a block-sparse kernel computes with: listed partial blocks through mask_mod, full
    blocks allowed whole, every other block forbidden."""
    mod = bm.mask_mod(0, 0, torch.arange(n)[:, None], torch.arange(n_kv)[None, :])
    allowed = torch.zeros(n, n_kv, dtype=torch.bool)
    for qb in range(bm.kv_num_blocks.shape[-1]):
        rows = slice(qb * block, (qb + 1) * block)
        for e in range(int(bm.kv_num_blocks[0, 0, qb])):
            cols = slice(int(bm.kv_indices[0, 0, qb, e]) * block, (int(bm.kv_indices[0, 0, qb, e]) + 1) * block)
            allowed[rows, cols] = mod[rows, cols]
        for e in range(int(bm.full_kv_num_blocks[0, 0, qb])):
            cols = slice(int(bm.full_kv_indices[0, 0, qb, e]) * block, (int(bm.full_kv_indices[0, 0, qb, e]) + 1) * block)
            allowed[rows, cols] = True
    return allowed, mod


@pytest.mark.parametrize("B,Hq,Hkv,n,d,c,L,causal,block", CASES)
def test_block_mask_lists_exactly_the_needed_blocks(B, Hq, Hkv, n, d, c, L, causal, block):
    kw = dict(chunk_size=c, causal=causal, local_chunks=L)
    bm = mta_block_mask(n, block=block, **kw)
    nc = -(-n // min(c, n))
    allowed, mod = _dense_from_blocks(bm, n, n + nc, block)
    # every allowed pair is inside a listed block, nothing else is allowed (a full block that
    # holds a forbidden pair would show here)
    assert torch.equal(allowed, mod)
    # and no empty block is listed (the point of the sparsity)
    for qb in range(bm.kv_num_blocks.shape[-1]):
        listed = [int(x) for x in bm.kv_indices[0, 0, qb, : int(bm.kv_num_blocks[0, 0, qb])]]
        listed += [int(x) for x in bm.full_kv_indices[0, 0, qb, : int(bm.full_kv_num_blocks[0, 0, qb])]]
        assert len(listed) == len(set(listed))
        for kb in listed:
            assert mod[qb * block:(qb + 1) * block, kb * block:(kb + 1) * block].any(), (qb, kb)
    if c >= 2 * block:  # chunks span several blocks: some window blocks are wholly allowed
        assert int(bm.full_kv_num_blocks.sum()) > 0


@pytest.mark.parametrize("B,Hq,Hkv,n,d,c,L,causal,block", CASES[:4])
def test_block_sparse_attention_matches_reference(B, Hq, Hkv, n, d, c, L, causal, block):
    """The attention the block list implies (as a compiled FlexAttention kernel computes it)."""
    q, k, v = qkv(B, Hq, Hkv, n, d, seed=1)
    kw = dict(chunk_size=c, causal=causal, local_chunks=L)
    bm = mta_block_mask(n, block=block, **kw)
    cc = min(c, n)
    nc = -(-n // cc)
    allowed, _ = _dense_from_blocks(bm, n, n + nc, block)
    counts = (n - torch.arange(nc) * cc).clamp(max=cc).double()
    pad = nc * cc - n

    def means(x):
        return torch.nn.functional.pad(x.double(), (0, 0, 0, pad)).view(B, Hkv, nc, cc, d).sum(3) / counts[:, None]

    G = Hq // Hkv
    keys = torch.cat([k.double(), means(k)], 2).repeat_interleave(G, 1)
    values = torch.cat([v.double(), means(v)], 2).repeat_interleave(G, 1)
    bias = torch.cat([torch.zeros(n, dtype=torch.float64), counts.log()])
    logits = q.double() @ keys.transpose(-1, -2) / d ** 0.5 + bias
    out = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ values
    torch.testing.assert_close(out, mta_attention_reference(q, k, v, **kw), rtol=1e-9, atol=1e-9)


def test_block_mask_at_128k_is_built_from_indices():
    """The 128K causal block mask that create_block_mask cannot build (dense: 128K × 128K)."""
    n = 131072
    bm = mta_block_mask(n, chunk_size=256, causal=True, block=128)
    assert tuple(bm.seq_lengths) == (n, n + n // 256)
    # each query block sees its chunk's diagonal and earlier blocks of the chunk (≤ 2) and the
    # summary blocks of the chunks before it (≤ 512 / 128 + 1)
    per_row = bm.kv_num_blocks[0, 0] + bm.full_kv_num_blocks[0, 0]
    assert int(per_row.max()) <= 2 + 5 and int(per_row.min()) >= 1


def test_block_mask_for_another_length_is_refused():
    q, k, v = qkv(1, 2, 2, 40, 8)
    bm = mta_block_mask(48, chunk_size=8, causal=True, block=16)
    with pytest.raises(ValueError, match="block_mask is for"):
        mta_flex_attention(q, k, v, chunk_size=8, causal=True, block_mask=bm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_compiled_flex_matches_reference(causal):
    """Compiled on the GPU, where the block list is what the kernel reads (unlike eager)."""
    B, Hq, Hkv, n, d = 1, 4, 2, 1000, 64  # GQA; n a multiple of neither the chunk nor the block
    q, k, v = (x.cuda().half() for x in qkv(B, Hq, Hkv, n, d, seed=2))
    kw = dict(chunk_size=64, causal=causal, local_chunks=2)
    out = mta_flex_attention(q, k, v, block_mask=mta_block_mask(n, device="cuda", **kw), **kw)
    ref = mta_attention_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), **kw)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2)
