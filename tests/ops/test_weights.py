"""``ops.weights.effective_weights``: the weights MTA puts on each token, W with ``op(v) == W @ v``,
checked in float64 against the op itself on random values and, with one chunk, against softmax."""

from __future__ import annotations

import pytest
import torch

import mta_rewrite  # noqa: F401  (registers torch.ops.mta.attention)
from mta_rewrite.ops.weights import effective_weights

F64 = torch.float64

CASES = {
    "fixed chunks": dict(chunk_size=8),
    "causal, window, sinks, top-k": dict(chunk_size=8, causal=True, local_chunks=2, sinks=2, top_k=1),
    "soft-capped, top-k 2": dict(chunk_size=16, causal=True, softcap=5.0, top_k=2),
    "learned summaries": dict(chunk_size=8, causal=True, sinks=1, learned=True),
    "boundary chunks": dict(chunk_size=8, causal=True, local_chunks=2, boundaries=True),
    "clustered summaries": dict(chunk_size=8, sinks=1, clusters=3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("padded", [False, True])
def test_the_weights_give_the_output_and_each_real_row_sums_to_one(case, padded):
    """For random q, k (GQA: 4 query heads over 2) and a padding mask or none, W @ v equals the op's
    output for random v (to 1e-12), and each query that may attend to something puts weight 1 in
    all (no sink logits); the weights are the same whatever v is (they depend on q and k)."""
    g = torch.Generator().manual_seed(len(case))
    B, Hq, Hkv, n, d = 2, 4, 2, 45, 8
    q, k = torch.randn(B, Hq, n, d, generator=g, dtype=F64), torch.randn(B, Hkv, n, d, generator=g, dtype=F64)
    config = dict(CASES[case])
    extra = {}
    if config.pop("learned", False):
        extra["summary_weight"] = torch.randn(Hkv, d, generator=g, dtype=F64)
    if config.pop("boundaries", False):
        extra["segment_ids"] = torch.randint(0, 3, (B, n), generator=g).cumsum(1) // 4
    if "clusters" in config:
        extra["centroids"] = torch.randn(Hkv, config.pop("clusters"), d, generator=g, dtype=F64)
    mask = None
    if padded:
        mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
        mask[0, ..., :6] = False

    def run(values):
        return torch.ops.mta.attention(q, k, values, mask, **extra, **config)

    weights = effective_weights(run, k)
    assert weights.shape == (B, Hq, n, n)
    for seed in (1, 2):
        v = torch.randn(B, Hkv, n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
        torch.testing.assert_close(weights @ v.repeat_interleave(Hq // Hkv, dim=1), run(v), rtol=0, atol=1e-12)
    sees = weights.abs().sum(-1) > 0
    torch.testing.assert_close(weights.sum(-1)[sees], torch.ones(int(sees.sum()), dtype=F64))
    if config.get("causal"):
        assert not weights.triu(1).any()
    if padded:
        assert not weights[0, ..., :6].any()  # (padded keys get nothing)


def test_one_chunk_gives_softmax_and_a_head_size_that_does_not_divide_the_length():
    """One chunk (exact attention): the weights are softmax(scale·q·kᵀ + mask) itself; n = 50 with
    d = 16 (the last run of the identity is 2 columns wide)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 50, 16, generator=g, dtype=F64), torch.randn(1, 2, 50, 16, generator=g, dtype=F64)
    weights = effective_weights(lambda values: torch.ops.mta.attention(q, k, values, chunk_size=64, causal=True), k)
    scores = (q @ k.transpose(-1, -2) / 4.0).masked_fill(torch.ones(50, 50, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(weights, scores.softmax(-1), rtol=0, atol=1e-14)
