"""The op and the decoding steps on arguments drawn at random, against the float64 reference.

The other tests of ``tests/ops`` walk grids (every mask kind × a few configurations); these draw
every argument at once from a seeded generator (shapes, GQA, chunk size, window, sinks, top-k,
causality, scale, soft-cap, a mask of one of twelve kinds and shapes, learned summaries, boundary
chunks, clustered summaries, ``rows_from``, q, k and v contiguous or in a model's transposed or
fused-projection layout), so that the combinations the grids leave out are
run too; smaller ones for ``gradcheck``. A failure names its seed: ``case(seed)`` rebuilds the arguments. The first such search
(2026-12-06) found the exact path's NaN for a scale ≤ 0 with causality. ``MTA_RANDOM_CASES``
runs more cases than the default (e.g. 2000: a few minutes).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

import mta_rewrite  # noqa: F401  (registers torch.ops.mta.attention)
from mta_rewrite.config import MTAConfig
from mta_rewrite.ops import mta_attention_reference
from mta_rewrite.ops.attention import attention_autograd
from mta_rewrite.ops.decode import boundary_decode_step, decode_step
from mta_rewrite.ops.segments import chunk_bounds

from .test_attention import model_layout

mta = torch.ops.mta.attention
F64 = torch.float64
CASES = int(os.environ.get("MTA_RANDOM_CASES", "240"))
BATCHES = 8  # test functions per kind of check, each a run of seeds (a failure names its seed)


def _seeds(batch: int, total: int) -> range:
    per = -(-total // BATCHES)
    return range(batch * per, min(total, (batch + 1) * per))


def random_mask(r: random.Random, g: torch.Generator, B: int, Hq: int, n: int) -> tuple[str, torch.Tensor | None]:
    kind = r.choice(["none"] * 3 + ["key_padding", "key_padding_inf", "causal_padding", "random_bool", "bias",
                                     "key_bias", "band", "per_head_padding", "rows_off", "random_min", "per_query"])
    if kind == "none":
        return kind, None
    pad = torch.rand(B, 1, 1, n, generator=g) > r.choice([0.0, 0.2, 0.5, 0.9])
    if r.random() < 0.5:
        pad[..., :r.randrange(0, n + 1)] = r.random() < 0.5  # a run of padding (or of keys kept) on the left
    i = torch.arange(n)
    fmin = torch.tensor(torch.finfo(F64).min, dtype=F64)
    if kind == "key_padding":
        return kind, pad
    if kind == "key_padding_inf":
        return kind, torch.where(pad, 0.0, float("-inf")).to(F64)
    if kind == "causal_padding":  # transformers' masks: bool (SDPA) or the minimum added (eager)
        m = (torch.ones(n, n, dtype=torch.bool).tril() & pad).expand(B, 1, n, n)
        return kind, m if r.random() < 0.5 else torch.where(m, torch.tensor(0.0, dtype=F64), fmin)
    if kind == "random_bool":
        shape = r.choice([(n, n), (B, 1, n, n), (B, Hq, n, n), (1, Hq, n, n)])
        return kind, torch.rand(*shape, generator=g) > r.choice([0.1, 0.3, 0.7])
    if kind == "bias":  # ALiBi-like
        return kind, -(i[None, :] - i[:, None]).abs().to(F64) * r.choice([0.1, 0.5])
    if kind == "key_bias":
        return kind, torch.randn(r.choice([1, B]), 1, 1, n, generator=g, dtype=F64)
    if kind == "band":  # a sliding window as a bool mask
        w = r.randrange(1, n + 1)
        return kind, (i[:, None] - i[None, :]).abs() < w
    if kind == "per_head_padding":
        return kind, torch.rand(B, Hq, 1, n, generator=g) > 0.4
    if kind == "rows_off":  # queries with nothing to attend to
        m = torch.ones(B, 1, n, n, dtype=torch.bool)
        m[:, :, torch.randperm(n, generator=g)[:r.randrange(0, n + 1)]] = False
        return kind, m
    if kind == "random_min":
        return kind, torch.where(torch.rand(B, 1, n, n, generator=g) > 0.3, torch.tensor(0.0, dtype=F64), fmin)
    return kind, torch.rand(B, 1, n, 1, generator=g) > 0.3  # per_query: one value per query for every key


def random_segments(r: random.Random, B: int, n: int) -> torch.Tensor:
    """[B or 1, n] segment ids: runs of random lengths, each row its own."""
    rows = r.choice([1, B])
    ids = torch.zeros(rows, n, dtype=torch.long)
    for b in range(rows):
        t, segment = 0, 0
        while t < n:
            length = r.randrange(1, max(2, n // r.choice([1, 2, 4, 8])) + 1)
            ids[b, t:t + length] = segment
            segment, t = segment + r.choice([1, 3]), t + length
    return ids


def case(seed: int):
    """(description, (q, k, v, mask, summary_weight, segment_ids, centroids), op keyword arguments)."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G = r.choice([1, 1, 2, 3]), r.choice([1, 2]), r.choice([1, 1, 2, 3])
    Hq = Hkv * G
    n = r.choice([1, 2, 5, 13, 17, 31, 40, 64, 70, 97])
    d = r.choice([1, 3, 8, 16])
    config = dict(chunk_size=r.choice([1, 2, 3, 4, 5, 7, 8, 16, 32, n, n + 3]), causal=r.random() < 0.5,
                  scale=r.choice([None, None, 0.3, 1.7, -0.5, 0.0]), local_chunks=r.choice([1, 1, 2, 3, 5]),
                  sinks=r.choice([0, 0, 1, 2, 5, 9]), top_k=r.choice([0, 0, 1, 2, 4]), softcap=r.choice([0.0, 0.0, 0.0, 2.0]))
    kind, mask = random_mask(r, g, B, Hq, n)
    weight = torch.randn(Hkv, d, generator=g, dtype=F64) if r.random() < 0.2 else None
    segments = random_segments(r, B, n) if r.random() < 0.25 else None
    centroids = None
    if r.random() < 0.1 and not config["causal"] and config["top_k"] == 0 and weight is None and segments is None:
        centroids = torch.randn(Hkv, r.choice([1, 2, 4]), d, generator=g, dtype=F64)
    q, k, v = (torch.randn(B, h, n, d, generator=g, dtype=F64) for h in (Hq, Hkv, Hkv))
    layout = r.choice(["contiguous", "contiguous", "transposed", "fused_projection"])  # (as models pass them)
    if layout != "contiguous":
        q, k, v = model_layout(q, k, v, layout)
    desc = (f"seed {seed}: B={B} Hq={Hq} Hkv={Hkv} n={n} d={d} mask={kind} learned={weight is not None} "
            f"boundaries={segments is not None} clustered={centroids is not None} layout={layout} {config}")
    return desc, (q, k, v, mask, weight, segments, centroids), config


@pytest.mark.parametrize("batch", range(BATCHES))
def test_random_arguments_match_the_reference(batch):
    """Each case in float64 (to 1e-8) and float32 (to 2e-4 of the output's scale) against the
    float64 reference, and with ``rows_from`` at a random row (the rows from it on); a one-line
    refusal is accepted only for what the op documents it does not take (clustered summaries with
    a mask that varies per query or with causality)."""
    refused = 0
    for seed in _seeds(batch, CASES):
        desc, (q, k, v, mask, weight, segments, centroids), config = case(seed)
        try:
            out = mta(q, k, v, mask, weight, segments, centroids, **config)
        except ValueError as exc:
            assert "clustered summaries" in str(exc), f"{desc}: {exc}"
            refused += 1
            continue
        want = mta_attention_reference(q, k, v, mask, summary_weight=weight, segment_ids=segments,
                                       centroids=centroids, **config)
        torch.testing.assert_close(out, want, rtol=1e-8, atol=1e-8, msg=lambda m: f"{desc}: {m}")
        assert out.stride() == torch.empty_like(q).stride(), f"{desc}: the output is not in q's layout"
        mask32 = mask.clamp(min=torch.finfo(torch.float32).min).float() if mask is not None \
            and mask.is_floating_point() else mask
        out32 = mta(q.float(), k.float(), v.float(), mask32, None if weight is None else weight.float(), segments,
                    None if centroids is None else centroids.float(), **config)
        tol = 2e-4 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(out32.double(), want, rtol=0, atol=tol, msg=lambda m: f"{desc}, float32: {m}")
        r = random.Random(seed).randrange(0, q.shape[2] + 1)
        rows = attention_autograd(q, k, v, mask, weight, segments, centroids, rows_from=r, **config)
        torch.testing.assert_close(rows[:, :, r:], want[:, :, r:], rtol=1e-8, atol=1e-8,
                                   msg=lambda m: f"{desc}, rows_from={r}: {m}")
    assert refused < len(_seeds(batch, CASES)) // 4 + 1  # (the cases still test the op)


def _decode_case(seed: int, boundaries: bool):
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G = r.choice([1, 2, 3]), r.choice([1, 2]), r.choice([1, 2, 3])
    n, d = r.choice([1, 3, 9, 20, 37]), r.choice([1, 4, 8])
    config = MTAConfig(chunk_size=r.choice([1, 2, 3, 4, 7, 8]), local_chunks=r.choice([1, 2, 3]),
                       sinks=r.choice([0, 0, 1, 3, 6]))
    scale, softcap = r.choice([None, 0.3, -0.7, 0.0]), r.choice([0.0, 0.0, 1.5])
    weight = torch.randn(Hkv, d, generator=g, dtype=F64) if r.random() < 0.25 else None
    allowed = None
    if r.random() < 0.5:
        allowed = torch.rand(B, n, generator=g) > r.choice([0.1, 0.5])
        allowed[:, :r.randrange(0, n + 1)] = r.random() < 0.5
    segments = torch.cumsum((torch.rand(B, n, generator=g) < r.choice([0.1, 0.3, 0.6])).long(), 1) if boundaries else None
    static = r.random() < 0.3  # a static cache: the slots after the sequence hold other values
    q, k, v = (torch.randn(B, h, n, d, generator=g, dtype=F64) for h in (Hkv * G, Hkv, Hkv))
    desc = (f"seed {seed}: B={B} Hq={Hkv * G} Hkv={Hkv} n={n} d={d} {config} scale={scale} softcap={softcap} "
            f"learned={weight is not None} padding={allowed is not None} static={static}")
    return desc, (q, k, v, allowed, weight, segments), config, scale, softcap, static


@pytest.mark.parametrize("boundaries", [False, True])
@pytest.mark.parametrize("batch", range(BATCHES // 2))
def test_random_decoding_steps_match_the_reference(batch, boundaries):
    """Every step t of a random sequence (no top-k), its sums carried from the step before, equal
    to the float64 reference's row t over the first t + 1 tokens; boundary chunks with the chunk
    bounds of the whole sequence or of the prefix, as the step is given them."""
    for seed in _seeds(batch, CASES // 4):
        desc, (q, k, v, allowed, weight, segments), config, scale, softcap, static = _decode_case(seed, boundaries)
        n, sums = q.shape[2], None
        whole = random.Random(seed).random() < 0.5
        w32 = None if weight is None else weight.float()
        for t in range(n):
            keys, values = k.float(), v.float()
            if static:
                keys, values = keys.clone(), values.clone()
                keys[:, :, t + 1:], values[:, :, t + 1:] = 1e3, -1e3
            if boundaries:
                bounds = chunk_bounds(segments if whole else segments[:, :t + 1], q.shape[0], config.chunk_size,
                                      config.sinks)
                out, sums = boundary_decode_step(q[:, :, t:t + 1].float(), keys, values, allowed, t + 1, config,
                                                 bounds, scale=scale, sums=sums, summary_weight=w32, softcap=softcap)
            else:
                out, sums = decode_step(q[:, :, t:t + 1].float(), keys, values, allowed, t + 1, config, scale=scale,
                                        sums=sums, summary_weight=w32, softcap=softcap)
            mask = None if allowed is None else allowed[:, None, None, :t + 1]
            want = mta_attention_reference(q[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1], mask, causal=True,
                                           scale=scale, summary_weight=weight, softcap=softcap,
                                           segment_ids=None if segments is None else segments[:, :t + 1],
                                           **config.op_kwargs())[:, :, t:t + 1]
            torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{desc}, step {t}: {m}")


def _gradient_case(seed: int):
    """A small case of :func:`case`'s kinds (gradcheck perturbs every input element twice)."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, Hkv, G = r.choice([1, 2]), r.choice([1, 2]), r.choice([1, 2])
    n, d = r.choice([3, 7, 11, 16]), r.choice([2, 3])
    config = dict(chunk_size=r.choice([1, 2, 3, 4, n]), causal=r.random() < 0.5, scale=r.choice([None, 0.7]),
                  local_chunks=r.choice([1, 2]), sinks=r.choice([0, 1, 3]), top_k=r.choice([0, 1, 2]),
                  softcap=r.choice([0.0, 0.0, 2.0]))
    kind, mask = random_mask(r, g, B, Hkv * G, n)
    weight = torch.randn(Hkv, d, generator=g, dtype=F64, requires_grad=True) if r.random() < 0.25 else None
    segments = random_segments(r, B, n) if r.random() < 0.25 else None
    q, k, v = (torch.randn(B, h, n, d, generator=g, dtype=F64) for h in (Hkv * G, Hkv, Hkv))
    layout = r.choice(["contiguous", "contiguous", "transposed", "fused_projection"])
    if layout != "contiguous":
        q, k, v = model_layout(q, k, v, layout)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    desc = (f"seed {seed}: B={B} Hq={Hkv * G} Hkv={Hkv} n={n} d={d} mask={kind} learned={weight is not None} "
            f"boundaries={segments is not None} layout={layout} {config}")
    return desc, (q, k, v, mask, weight, segments), config


@pytest.mark.parametrize("seed", range(CASES // 30))
def test_random_arguments_gradcheck(seed):
    """Gradients of q, k, v (and the summary weight) against finite differences, float64."""
    desc, (q, k, v, mask, weight, segments), config = _gradient_case(seed)
    inputs = (q, k, v) + ((weight,) if weight is not None else ())

    def op(*x):
        return mta(x[0], x[1], x[2], mask, x[3] if len(x) > 3 else None, segments, None, **config)

    assert torch.autograd.gradcheck(op, inputs, eps=1e-6, atol=1e-5, rtol=1e-4), desc
