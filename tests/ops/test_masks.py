"""ops/masks.simplify_mask: a [B, H, n, n] mask that is key padding (∧ the causal triangle) by value
becomes key padding [B, 1, 1, n] (with causal=True for the triangle); anything else stays as it is.
That the op's output is unchanged by it is checked against the float64 reference in
test_attention.py (the mask kinds there include these forms and near misses)."""

from __future__ import annotations

import pytest
import torch

from mta_rewrite.ops import masks
from mta_rewrite.ops.masks import simplify_mask

B, H, N = 2, 3, 11
MIN = torch.finfo(torch.float32).min


def keep_flags():
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, :3] = False  # left padding
    keep[1, N - 2:] = False  # right padding
    return keep


def tri():
    return torch.ones(N, N, dtype=torch.bool).tril()


def additive(allowed, forbidden=MIN):
    return torch.zeros(allowed.shape).masked_fill(~allowed, forbidden)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", ["bool", "min", "-inf"])
def test_causal_with_key_padding_becomes_key_padding_and_causal(form, causal):
    keep = keep_flags()
    allowed = (tri() & keep[:, None, :])[:, None]  # [B, 1, n, n]
    mask = allowed if form == "bool" else additive(allowed, MIN if form == "min" else float("-inf"))
    out, out_causal = simplify_mask(mask, B, H, N, causal)
    assert out_causal is True and out.dtype == torch.bool and out.shape == (B, 1, 1, N)
    assert torch.equal(out[:, 0, 0], keep)


@pytest.mark.parametrize("causal", [False, True])
def test_materialised_key_padding_becomes_key_padding(causal):
    keep = keep_flags()
    mask = keep[:, None, None, :].expand(B, H, N, N).contiguous()  # as nn.MultiheadAttention merges it
    out, out_causal = simplify_mask(mask, B, H, N, causal)
    assert out_causal is causal and torch.equal(out[:, 0, 0], keep)


@pytest.mark.parametrize("shape", [(N, N), (1, 1, N, N), (B, 1, N, N)])
def test_a_triangle_alone_is_causal_without_mask(shape):
    mask = tri().expand(shape).contiguous()
    assert simplify_mask(mask, B, H, N, False) == (None, True)
    assert simplify_mask(additive(mask), B, H, N, False) == (None, True)


def test_all_allowed_is_no_mask():
    assert simplify_mask(torch.ones(B, 1, N, N, dtype=torch.bool), B, H, N, False) == (None, False)
    assert simplify_mask(torch.zeros(1, 1, N, N), B, H, N, True) == (None, True)


def near_misses():
    keep = keep_flags()
    allowed = (tri() & keep[:, None, :])[:, None]
    one_future_key = allowed.clone()
    one_future_key[1, 0, 4, 6] = True
    one_missing_key = allowed.clone()
    one_missing_key[1, 0, 7, 5] = False
    heads_differ = allowed.expand(B, H, N, N).clone()
    heads_differ[0, 2, N - 1, 5] = False
    window = allowed & ~torch.ones(N, N, dtype=torch.bool).tril(-4)  # a sliding window
    key_bias = additive(allowed) + 0.5 * torch.arange(N) * allowed
    alibi = -(torch.arange(N)[None, :] - torch.arange(N)[:, None]).abs() * 0.5
    return {"one future key": one_future_key, "one missing key": one_missing_key, "heads differ": heads_differ,
            "sliding window": window, "a bias": key_bias, "alibi": alibi}


@pytest.mark.parametrize("name", list(near_misses()))
@pytest.mark.parametrize("causal", [False, True])
def test_anything_else_comes_back_unchanged(name, causal):
    mask = near_misses()[name]
    out, out_causal = simplify_mask(mask, B, H, N, causal)
    assert out is mask and out_causal is causal


def test_already_key_padding_and_no_mask_pass_through():
    mask = keep_flags()[:, None, None, :]
    assert simplify_mask(mask, B, H, N, False)[0] is mask
    assert simplify_mask(None, B, H, N, True) == (None, True)


def test_verdict_is_computed_once_per_mask_tensor(monkeypatch):
    """Every layer of a forward pass gets the same mask tensor: it is read once. Changing it in place
    invalidates the verdict; a new tensor gets its own."""
    calls = []
    structure = masks._structure
    monkeypatch.setattr(masks, "_structure", lambda *a: calls.append(1) or structure(*a))
    keep = keep_flags()
    mask = (tri() & keep[:, None, :])[:, None].contiguous()
    first = simplify_mask(mask, B, H, N, False)
    for _ in range(3):
        again = simplify_mask(mask, B, H, N, False)
        assert again[1] is True and torch.equal(again[0], first[0])
    assert len(calls) == 1
    mask[1, 0, 4, 6] = True  # in place: no longer causal ∧ key padding
    assert simplify_mask(mask, B, H, N, False)[0] is mask and len(calls) == 2
    other = mask.clone()
    simplify_mask(other, B, H, N, False)
    assert len(calls) == 3
    del other, mask
    assert not [key for key in masks._STRUCTURE if key[1:] == (B, H, N)]  # entries go with their tensors


def test_inference_tensors_are_read_every_call(monkeypatch):
    calls = []
    structure = masks._structure
    monkeypatch.setattr(masks, "_structure", lambda *a: calls.append(1) or structure(*a))
    with torch.inference_mode():
        mask = tri()[None, None].expand(B, 1, N, N).clone()
        assert simplify_mask(mask, B, H, N, False) == (None, True)
        assert simplify_mask(mask, B, H, N, False) == (None, True)
    assert len(calls) == 2


def test_large_masks_are_compared_in_row_blocks(monkeypatch):
    monkeypatch.setattr(masks, "_ROW_BLOCK_ELEMENTS", 3 * B * N)  # three rows a step
    keep = keep_flags()
    allowed = (tri() & keep[:, None, :])[:, None].contiguous()
    assert simplify_mask(allowed, B, H, N, False)[1] is True
    allowed[0, 0, N - 2, N - 1] = True  # in the last block but one
    assert simplify_mask(allowed, B, H, N, False)[0] is allowed


def test_float_masks_are_read_in_row_blocks_too(monkeypatch):
    monkeypatch.setattr(masks, "_ROW_BLOCK_ELEMENTS", 3 * B * N)
    keep = keep_flags()
    mask = additive((tri() & keep[:, None, :])[:, None])
    assert simplify_mask(mask, B, H, N, False)[1] is True
    mask[1, 0, N - 1, 3] = 0.25  # an allowed key with a bias, in the last block
    assert simplify_mask(mask, B, H, N, False)[0] is mask


def test_continued_key_padding(monkeypatch):
    """The mask of m queries that are the last of n tokens (a prompt continued over a cache, slots
    after n ignored): the triangle from n − m on ∧ key padding, bool or float, is recognised (keep
    flags [B, 1, 1, n], None when nothing is padded), once per mask tensor; a key after a query,
    a bias, or key padding without the triangle are not."""
    calls = []
    structure = masks._structure
    monkeypatch.setattr(masks, "_structure", lambda *a: calls.append(1) or structure(*a))
    m, slots = 4, N + 5
    keep = keep_flags()
    rows = tri()[N - m:]  # [m, N]: query r sees keys up to N − m + r
    mask = torch.zeros(B, 1, m, slots, dtype=torch.bool)
    mask[..., :N] = (rows & keep[:, None, :])[:, None]
    for _ in range(2):
        ok, flags = masks.continued_key_padding(mask, N)
        assert ok and torch.equal(flags, keep[:, None, None, :])
    assert len(calls) == 1
    float_mask = torch.where(mask, 0.0, MIN)
    assert masks.continued_key_padding(float_mask, N)[0]
    assert masks.continued_key_padding(rows[None, None].expand(B, 1, m, N).clone(), N) == (True, None)
    future = mask.clone()
    future[1, 0, 0, N - 1] = True
    biased = float_mask.clone()
    biased[0, 0, 1, 5] = 0.5
    padding = keep[:, None, None, :].expand(B, 1, m, N).clone()
    for other in (future, biased, padding):
        assert masks.continued_key_padding(other, N) == (False, None)


def test_decode_row(monkeypatch):
    """A decoding step's mask row: the keys each sequence may see up to the last any may (a static
    cache's empty slots after it), None for all of them; None for a bias, for nothing to see and
    for a mask per query. Read once per mask tensor (every layer of the step shares it), again
    after a change in place."""
    from mta_rewrite.ops.masks import decode_row

    calls = []
    normalize = masks.normalize_mask
    monkeypatch.setattr(masks, "normalize_mask", lambda *a: calls.append(1) or normalize(*a))
    row = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    row[:, :, :, 9:] = False  # (empty slots)
    row[0, :, :, :3] = False  # (left padding)
    allowed, length = decode_row(row, 2, 4, 12)
    assert length == 9 and torch.equal(allowed, row[:, 0, 0])
    assert decode_row(row, 2, 4, 12)[1] == 9 and len(calls) == 1
    row[0, :, :, :3] = True
    assert decode_row(row, 2, 4, 12)[0] is None and len(calls) == 2
    assert decode_row(additive(row), 2, 4, 12)[1] == 9
    bias = additive(row).clone()
    bias[..., 1] = 0.5
    assert decode_row(bias, 2, 4, 12) is None
    assert decode_row(torch.zeros(2, 1, 1, 12, dtype=torch.bool), 2, 4, 12) is None
    assert decode_row(torch.ones(2, 1, 3, 12, dtype=torch.bool), 2, 4, 12) is None
