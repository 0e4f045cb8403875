"""The attention weights of MTA: what each query puts on each token, [B, Hq, n_q, n].

MTA's output is linear in v: which keys, summaries and sinks a query reads, and their
probabilities, depend on q, k (and the mask, the chunk grid, learned or clustered summary weights,
top-k) only, and a summary's value is its chunk's (or cluster's) values averaged or weighed. So the
output is ``W @ v`` for one matrix W per query row, the **effective weights**: a key's own
probability plus its share of every summary that holds it (a chunk's summary probability divided
among its tokens as the summary weighs them). Run with values that are the identity, d columns at
a time, the op gives W's columns exactly; that costs ⌈n / d⌉ runs of the op and an n × n matrix per
head, what eager attention materialises for ``output_attentions`` anyway. A query's row sums to 1,
less what learned sink logits take (the sink's value is zero).
"""

from __future__ import annotations

from typing import Callable

import torch


def effective_weights(run: Callable[[torch.Tensor], torch.Tensor], key: torch.Tensor) -> torch.Tensor:
    """W [B, Hq, n_q, n] such that ``run(v) == W @ v`` for every v [B, Hkv, n, d] (GQA: each query
    head's weights over the keys of its key/value head), where ``run`` is the op (or
    ``calibration.probe.site_output``) with q, k and everything but v fixed: its columns from runs on
    the identity's columns, ``key``'s head size d at a time, in ``key``'s dtype."""
    B, Hkv, n, d = key.shape
    columns = []
    for start in range(0, n, d):
        width = min(d, n - start)
        basis = key.new_zeros(B, Hkv, n, d)
        rows = torch.arange(width, device=key.device)
        basis[:, :, start + rows, rows] = 1
        columns.append(run(basis)[..., :width])
    return torch.cat(columns, dim=-1)
