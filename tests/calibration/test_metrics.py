"""The error metrics against direct float64 formulas over whole tensors (the metrics compute in
blocks of rows, and the local errors against a prepared reference)."""

from __future__ import annotations

import math

import pytest
import torch

from mta_rewrite.calibration import metrics
from mta_rewrite.calibration.metrics import LocalReference, output_error


def direct(metric, y, y0, rows):
    """The metric's definition, float64, all rows at once (``rows``: which positions count)."""
    y, y0 = y.double()[rows], y0.double()[rows]
    if metric == "rel_l2":
        return float(torch.sqrt(((y - y0) ** 2).sum() / (y0 ** 2).sum()))
    if metric == "cosine":
        cos = (y * y0).sum(-1) / (y.norm(dim=-1) * y0.norm(dim=-1))
        return float((1 - cos).mean())
    p0, p = torch.softmax(y0, -1), torch.softmax(y, -1)
    return float((p0 * (p0.log() - p.log())).sum(-1).mean())


@pytest.mark.parametrize("metric", metrics.METRICS)
@pytest.mark.parametrize("padded", [False, True])
def test_output_error_equals_its_definition(metric, padded, monkeypatch):
    torch.manual_seed(0)
    B, n, V = 2, 150, 700
    y0 = torch.randn(B, n, V) * 3
    y = y0 + 0.2 * torch.randn(B, n, V)
    kwargs, rows = {}, torch.ones(B, n, dtype=torch.bool)
    if padded:  # padded positions are left out; their outputs are garbage
        rows[1, 100:] = False
        y[1, 100:] = 1e4
        kwargs = {"attention_mask": rows.long()}
    want = direct(metric, y, y0, rows)
    # blocks of 3 rows: 100 blocks, the last one short
    monkeypatch.setattr(metrics, "ROW_BLOCK_ELEMENTS", 3 * V + 5)
    got = output_error(metric, y, y0, kwargs)
    assert got == pytest.approx(want, rel=1e-12)
    assert output_error(metric, y0, y0, kwargs) == pytest.approx(0.0, abs=1e-12)
    late = rows & (torch.arange(n) >= n - 70)  # last=70: the last 70 positions of each sample (and real ones)
    assert output_error(metric, y, y0, kwargs, last=70) == pytest.approx(direct(metric, y, y0, late), rel=1e-12)


def test_last_positions_need_an_output_with_positions():
    with pytest.raises(ValueError, match=r"^last_positions needs an output with positions \(\[batch, positions, "
                                         r"features\]\); the model's first output is \[2, 16\]$"):
        output_error("rel_l2", torch.randn(2, 16), torch.randn(2, 16), {}, last=4)


def test_local_reference_parts_equal_their_definition():
    """Per head: Σ ‖y − y0‖² and Σ ‖y0‖² over samples and over the rows that attend to something."""
    torch.manual_seed(1)
    B, H, n, d = 2, 3, 40, 8
    allowed = torch.rand(B, 1, n, n) > 0.3
    allowed[0, 0, 5] = False  # a row that attends to nothing: not counted
    masks = [allowed, None]
    exacts = [torch.randn(B, H, n, d) for _ in masks]
    outs = [e + 0.1 * torch.randn_like(e) for e in exacts]
    ref = LocalReference(exacts, masks)
    num, den = ref.parts(outs)
    want_num, want_den = torch.zeros(H, dtype=torch.float64), torch.zeros(H, dtype=torch.float64)
    for y, y0, mask in zip(outs, exacts, masks):
        for b in range(B):
            for h in range(H):
                for t in range(n):
                    if mask is not None and not bool(mask[b, 0, t].any()):
                        continue
                    want_num[h] += float(((y[b, h, t].double() - y0[b, h, t].double()) ** 2).sum())
                    want_den[h] += float((y0[b, h, t].double() ** 2).sum())
    torch.testing.assert_close(num, want_num, rtol=1e-12, atol=0)
    torch.testing.assert_close(den, want_den, rtol=1e-12, atol=0)
    assert metrics.relative(num, den) == pytest.approx(math.sqrt(float(want_num.sum() / want_den.sum())), rel=1e-12)
    # the reference serves any number of candidates: a second one gets its own error, the same norm
    num2, den2 = ref.parts(exacts)
    assert float(num2.sum()) == 0.0 and torch.equal(den2, den)
    # last=12: the rows t ≥ n − 12 only (of those that attend to something)
    late_num, late_den = LocalReference(exacts, masks, last=12).parts(outs)
    want_num.zero_(), want_den.zero_()
    for y, y0, mask in zip(outs, exacts, masks):
        for t in range(n - 12, n):
            counted = torch.ones(B, dtype=torch.bool) if mask is None else mask[:, 0, t].any(-1)
            for b in range(B):
                if counted[b]:
                    want_num += ((y[b, :, t].double() - y0[b, :, t].double()) ** 2).sum(-1)
                    want_den += (y0[b, :, t].double() ** 2).sum(-1)
    torch.testing.assert_close(late_num, want_num, rtol=1e-12, atol=0)
    torch.testing.assert_close(late_den, want_den, rtol=1e-12, atol=0)
