"""What the calibration tests share."""

import pytest

from mta_rewrite import zoo


@pytest.fixture(scope="module")
def lm():
    """The built-in causal LM (random weights, small) on bytes of real text: 5 samples × 512 tokens
    (shorter sequences leave MTA nothing to save: the cost model keeps them exact)."""
    model = zoo.TinyCausalLM(d=64, heads=4, layers=2).eval()
    text = zoo.real_text()
    data = [(zoo.byte_tokens(text[i * 2000:], 512),) for i in range(5)]
    return model, data
