"""The Triton forward on configurations and launches drawn at random, against the float64 reference.

``test_triton_fwd.py`` walks each branch on its own; this draws them together from a seeded
generator: GQA, chunk size, window, sinks, top-k, causality, a scale of either sign, soft-cap, key
padding, learned summaries, boundary chunks (read where they lie), ``rows_from`` and a tile choice
or variant (narrow and wide blocks, one loop, tensor descriptors, the fused launch and its
chunk-major order where they apply). A failure names its seed. Without CUDA it runs in Triton's
interpreter (a few hundred milliseconds a case at these sizes); ``MTA_RANDOM_KERNELS`` runs more
cases than the default (the first search, 2026-12-06: 800 cases, all equal to the reference).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from .common import DEVICE

triton = pytest.importorskip("triton")

import mta_rewrite  # noqa: E402,F401
from mta_rewrite.kernels.mta_fwd import LaunchConfig, key_padding, mta_forward_triton  # noqa: E402
from mta_rewrite.ops import mta_attention_reference  # noqa: E402
from mta_rewrite.ops.segments import chunk_bounds  # noqa: E402

CASES = int(os.environ.get("MTA_RANDOM_KERNELS", "24"))


def case(seed: int):
    """(description, (q, k, v, mask, summary weight, segment ids), op keyword arguments, launch, rows_from)."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G = r.choice([1, 2]), r.choice([1, 2]), r.choice([1, 2])
    n, d = r.choice([5, 17, 33, 48, 70]), r.choice([8, 12, 16])
    config = dict(chunk_size=r.choice([2, 3, 5, 8, 16, 24, 40]), causal=r.random() < 0.5,
                  scale=r.choice([None, None, 0.4, -0.6]), local_chunks=r.choice([1, 2, 3]),
                  sinks=r.choice([0, 0, 1, 4, 11]), top_k=r.choice([0, 0, 1, 2]), softcap=r.choice([0.0, 0.0, 0.0, 2.0]))
    weight = torch.randn(Hkv, d, generator=g) if r.random() < 0.2 else None
    segments = None
    if r.random() < 0.3:  # runs of random lengths, each sequence its own
        segments = torch.cumsum((torch.rand(B, n, generator=g) < r.choice([0.1, 0.3, 0.6])).long(), 1)
    mask = None
    if r.random() < 0.5:
        mask = torch.rand(B, 1, 1, n, generator=g) > r.choice([0.1, 0.4])
        if r.random() < 0.5:
            mask[0, ..., :r.randrange(0, n)] = False  # left padding
    rows_from = r.choice([0, 0, r.randrange(0, n)])
    q, k, v = (torch.randn(B, h, n, d, generator=g) for h in (Hkv * G, Hkv, Hkv))
    launches = [LaunchConfig(16, 16, 4, 1), LaunchConfig(32, 16, 4, 1), LaunchConfig(16, 32, 4, 1),
                LaunchConfig(16, 16, 4, 1, one_loop=True)]
    if d >= 16 and d & (d - 1) == 0:
        launches.append(LaunchConfig(16, 16, 4, 1, tma=True))
    if config["causal"] and config["top_k"] == 0 and weight is None and segments is None and rows_from == 0 \
            and d % 8 == 0:  # (the fused launch: causal, mean summaries; chunk-major rows of 32 bytes)
        launches += [LaunchConfig(16, 16, 4, 1, fused=True), LaunchConfig(16, 16, 4, 1, fused=True, chunk_major=True)]
    launch = r.choice(launches)
    desc = (f"seed {seed}: B={B} Hq={Hkv * G} Hkv={Hkv} n={n} d={d} {config} learned={weight is not None} "
            f"boundaries={segments is not None} padding={mask is not None} rows_from={rows_from} {launch}")
    return desc, (q, k, v, mask, weight, segments), config, launch, rows_from


@pytest.mark.parametrize("half", [0, 1])
def test_random_configurations_and_launches_match_the_reference(half):
    """Each case's rows from ``rows_from`` on (the rows before its block are zeros, not computed)
    equal the float64 reference's to 2e-4."""
    for seed in range(half * CASES // 2, (half + 1) * CASES // 2):
        desc, (q, k, v, mask, weight, segments), config, launch, rows_from = case(seed)
        B, Hq, n = q.shape[:3]
        starts = None if segments is None else chunk_bounds(segments, B, config["chunk_size"], config["sinks"])
        to = (lambda x: None if x is None else x.to(DEVICE))
        out = mta_forward_triton(to(q), to(k), to(v), to(key_padding(mask, B, Hq, n)), summary_weight=to(weight),
                                 chunk_starts=to(starts), rows_from=rows_from, launch=launch, **config)
        want = mta_attention_reference(q, k, v, mask, summary_weight=weight, segment_ids=segments, **config)
        torch.testing.assert_close(out.double().cpu()[:, :, rows_from:], want[:, :, rows_from:], rtol=2e-4, atol=2e-4,
                                   msg=lambda m: f"{desc}: {m}")
