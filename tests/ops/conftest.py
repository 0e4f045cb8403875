from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_chunk_bands(monkeypatch):
    """Key sets built one query chunk (ops/chunked.py) or one query block (ops/varlen.py) at a
    time: the CPU's band budget below one chunk's key set."""
    import mta_rewrite.ops.chunked as chunked

    monkeypatch.setattr(chunked, "_BAND_BYTES", 1)
    assert len(chunked._bands(5, False, 100, torch.device("cpu"))) == 5
