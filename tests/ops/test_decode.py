"""``ops.decode``: one decoding step of MTA over a KV cache, with chunk sums kept between steps,
against the float64 reference of MTA_SPEC.md (``ops.reference``): without top-k a step is the
one-prompt op's row t; with top-k, the row t of a prompt whose chunk i holds the step's query
everywhere (the step ranks chunks by its own query)."""

from __future__ import annotations

import pytest
import torch

from mta_rewrite.config import MTAConfig
from mta_rewrite.ops.decode import boundary_decode_step, chunk_sums, decode_step, grouped_decode_step
from mta_rewrite.ops.reference import mta_attention_reference
from mta_rewrite.ops.segments import chunk_bounds


def inputs(B=2, Hq=4, Hkv=2, n=37, d=8, seed=0, pad=0, hole=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, d, generator=g) for h in (Hq, Hkv, Hkv))
    allowed = torch.ones(B, n, dtype=torch.bool)
    allowed[-1, :pad] = False  # left padding of the last sequence
    if hole:
        allowed[0, 9:22] = False  # keys no query may see, after some it may: chunks with n_j = 0 between live ones
    return q, k, v, allowed


def reference_row(q, k, v, allowed, t, config, summary_weight=None, softcap=0.0):
    """Row t of the float64 reference over the first t + 1 tokens, the step's query in all of chunk i."""
    c = config.chunk_size
    i = t // c
    prompt = q[:, :, :t + 1].clone()
    prompt[:, :, i * c:] = q[:, :, t:t + 1]
    mask = None if allowed is None else allowed[:, None, None, :t + 1]
    return mta_attention_reference(prompt, k[:, :, :t + 1], v[:, :, :t + 1], mask, causal=True,
                                   summary_weight=summary_weight, softcap=softcap, **config.op_kwargs())[:, :, t]


CONFIGS = [MTAConfig(4, 1, 0, 0), MTAConfig(4, 2, 3, 0), MTAConfig(5, 1, 2, 2), MTAConfig(3, 2, 0, 1),
           MTAConfig(6, 1, 7, 3), MTAConfig(4, 1, 1, 4)]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("mask", ["none", "padding", "hole"])
def test_every_step_is_the_reference_row(config, mask):
    """Steps t = 0 … n−1 in turn, the sums carried from step to step (chunks of 3–6 with partial
    last chunks, windows of 1–2 chunks, sinks inside and beyond the first chunk, top-k 0–3 (more
    than there are live chunks early on), GQA; key padding with fully masked rows early on, and a
    run of forbidden keys after allowed ones: chunks with nothing to summarise between live ones)."""
    q, k, v, allowed = inputs(pad=6 if mask == "padding" else 0, hole=mask == "hole")
    sums = None
    for t in range(q.shape[2]):
        out, sums = decode_step(q[:, :, t:t + 1], k, v, None if mask == "none" else allowed, t + 1, config, None,
                                sums)
        want = reference_row(q, k, v, allowed, t, config)
        torch.testing.assert_close(out[:, :, 0].double(), want, rtol=1e-5, atol=1e-5)
        assert sums.chunks == max(0, t // config.chunk_size - config.local_chunks + 1)


@pytest.mark.parametrize("config", [MTAConfig(4, 1, 0, 0), MTAConfig(5, 1, 2, 2), MTAConfig(4, 1, 1, 4)], ids=str)
def test_learned_summaries_at_every_step(config):
    """Learned summaries (a summary weighs its chunk's kept keys by softmax(k_s·w)): every step, the
    summaries kept between steps, against the reference; summaries taken with another weight (or
    with means) are not reused."""
    q, k, v, allowed = inputs(pad=6, hole=True)
    w = torch.randn(2, 8, generator=torch.Generator().manual_seed(5))
    sums = None
    for t in range(q.shape[2]):
        out, sums = decode_step(q[:, :, t:t + 1], k, v, allowed, t + 1, config, None, sums, summary_weight=w)
        want = reference_row(q, k, v, allowed, t, config, summary_weight=w)
        torch.testing.assert_close(out[:, :, 0].double(), want, rtol=1e-5, atol=1e-5)
    assert not sums.serves(k, allowed, config.chunk_size, config.sinks, w + 1)
    assert not sums.serves(k, allowed, config.chunk_size, config.sinks)
    means, _ = decode_step(q[:, :, -1:], k, v, allowed, 37, config, None, sums)
    torch.testing.assert_close(means[:, :, 0].double(), reference_row(q, k, v, allowed, 36, config), rtol=1e-5,
                               atol=1e-5)


def test_a_step_over_a_static_cache_and_a_given_scale():
    """Keys and values with slots after the sequence (a static cache's, garbage in them) are not
    read; the scale is the caller's."""
    q, k, v, allowed = inputs(n=48, pad=3)
    config = MTAConfig(4, 1, 2, 1)
    slots_k = torch.cat([k, torch.full_like(k[:, :, :16], 1e4)], 2)
    slots_v = torch.cat([v, torch.full_like(v[:, :, :16], float("nan"))], 2)
    slots_allowed = torch.cat([allowed, torch.ones(2, 16, dtype=torch.bool)], 1)
    out, _ = decode_step(q[:, :, 40:41], slots_k, slots_v, slots_allowed, 41, config, 0.3)
    want = mta_attention_reference(*_chunk_query(q, 40, 4), k[:, :, :41], v[:, :, :41], allowed[:, None, None, :41],
                                   causal=True, scale=0.3, **config.op_kwargs())[:, :, 40]
    torch.testing.assert_close(out[:, :, 0].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["slots", "tokens_outer", "features_outer", "one_sequence"])
def test_top_k_reads_whole_chunks_in_any_cache_layout(layout):
    """The top-k chunks' keys and values are copied as whole blocks from a view of the cache's
    windows where its strides allow (a static cache's slots after the sequence, one sequence,
    positions outside the heads: [B, n, H, d] transposed, d outside the positions), else by
    advanced indexing: the reference row either way."""
    q, k, v, allowed = inputs(B=1 if layout == "one_sequence" else 2, n=48, pad=3)
    config = MTAConfig(4, 1, 2, 2)

    def laid_out(x):
        if layout == "slots":
            return torch.cat([x, torch.full_like(x[:, :, :16], float("nan"))], 2)[:, :, :48]
        if layout == "tokens_outer":
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        if layout == "features_outer":
            return x.transpose(2, 3).contiguous().transpose(2, 3)
        return x

    kk, vv = laid_out(k), laid_out(v)
    assert torch.equal(kk, k) and (layout == "one_sequence" or kk.stride() != k.stride())
    out, _ = decode_step(q[:, :, 40:41], kk, vv, allowed, 41, config)
    want = mta_attention_reference(*_chunk_query(q, 40, 4), k[:, :, :41], v[:, :, :41], allowed[:, None, None, :41],
                                   causal=True, **config.op_kwargs())[:, :, 40]
    torch.testing.assert_close(out[:, :, 0].double(), want, rtol=1e-5, atol=1e-5)


def _chunk_query(q, t, c):
    prompt = q[:, :, :t + 1].clone()
    prompt[:, :, t // c * c:] = q[:, :, t:t + 1]
    return (prompt,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """bf16 / fp16 q, k, v: float32 inside, the output in q's dtype, within the dtype's rounding."""
    q, k, v, allowed = inputs(n=64, pad=5)
    config = MTAConfig(8, 2, 4, 2)
    out, _ = decode_step(q[:, :, 63:64].to(dtype), k.to(dtype), v.to(dtype), allowed, 64, config)
    assert out.dtype == dtype
    want = reference_row(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), allowed, 63, config)
    torch.testing.assert_close(out[:, :, 0].double(), want, rtol=2e-2, atol=2e-2)


def test_sums_kept_between_steps_are_the_sums_from_scratch():
    """Extending the sums chunk by chunk gives the sums of all chunks at once; sums that do not
    serve a cache (another mask over the summed keys, another chunking, batch, or fewer keys) are
    not extended: the step sums from the start."""
    _, k, v, allowed = inputs(n=40, pad=6)
    step = None
    for chunks in range(1, 9):
        step = chunk_sums(k, v, allowed, chunks, 5, 2, step)
    whole = chunk_sums(k, v, allowed, 8, 5, 2)
    for a, b in ((step.k, whole.k), (step.v, whole.v), (step.count, whole.count)):
        torch.testing.assert_close(a, b)
    assert whole.count[0, 0] == 3 and whole.count[1, 1] == 4  # (2 sinks; 6 padded keys)
    assert whole.serves(k, allowed, 5, 2)
    other = allowed.clone()
    other[0, 3] = False
    assert not whole.serves(k, other, 5, 2)
    assert not whole.serves(k, None, 5, 2)
    assert not whole.serves(k, allowed, 4, 2) and not whole.serves(k, allowed, 5, 0)
    assert not whole.serves(k[:1], allowed[:1], 5, 2) and not whole.serves(k[:, :, :35], allowed, 5, 2)
    assert chunk_sums(k, v, None, 8, 5, 2).serves(k, None, 5, 2)
    q = torch.randn(2, 4, 1, 8)
    stale = chunk_sums(k, v, other, 6, 5, 2)  # (sums under another mask: rebuilt, not used)
    out, sums = decode_step(q, k, v, allowed, 40, MTAConfig(5, 1, 2, 0), None, stale)
    torch.testing.assert_close(sums.k, whole.k[:, :, :7])
    fresh, _ = decode_step(q, k, v, allowed, 40, MTAConfig(5, 1, 2, 0))
    torch.testing.assert_close(out, fresh)
    # sums of more chunks than a step summarises (a later position's, a step taken again earlier):
    # cut to the chunks before its window, the same output as from scratch. Without a mask: a mask
    # is cut to the step's length, which would no longer cover the sums' keys (they are rebuilt then)
    every = chunk_sums(k, v, None, 8, 5, 2)
    early, cut = decode_step(q, k, v, None, 23, MTAConfig(5, 1, 2, 0), None, every)
    assert cut.chunks == 4 and cut.k.data_ptr() == every.k.data_ptr()  # (views of the sums given)
    torch.testing.assert_close(early, decode_step(q, k, v, None, 23, MTAConfig(5, 1, 2, 0))[0])


GROUPS = ((MTAConfig(4, 1, 1, 0), (0, 5)), (None, (1, 4)), (MTAConfig(5, 1, 2, 2), (2, 3)))


@pytest.mark.parametrize("learned", [False, True])
def test_head_groups_at_every_step(learned):
    """A configuration per group of query heads (HeadGroups, as calibration plans them): every step
    of a padded sequence with a hole, each query head against the reference row of its own group's
    configuration over its key/value head (exact: one chunk); groups that split a key/value head's
    query heads between them (6 query heads over 3: heads 0 and 5 in one group, 1 and 4 exact) and
    learned summaries, each head with its key/value head's weight."""
    q, k, v, allowed = inputs(Hq=6, Hkv=3, pad=6, hole=True)
    w = torch.randn(3, 8, generator=torch.Generator().manual_seed(5)) if learned else None
    sums = None
    for t in range(q.shape[2]):
        out, sums = grouped_decode_step(q[:, :, t:t + 1], k, v, allowed, t + 1, GROUPS, None, sums, w)
        for config, heads in GROUPS:
            for h in heads:
                rows = slice(h // 2, h // 2 + 1)
                want = reference_row(q[:, h:h + 1], k[:, rows], v[:, rows], allowed, t, config or MTAConfig(64),
                                     None if w is None or config is None else w[rows])
                torch.testing.assert_close(out[:, h:h + 1, 0].double(), want, rtol=1e-5, atol=1e-5)
    assert sorted(sums) == [(0, 0, 1), (0, 2, 3), (2, 1, 2)]  # (group, key/value heads [a, b)) with MTA
    assert sums[0, 0, 1].chunks == 36 // 4 - 1 + 1 and sums[2, 1, 2].chunks == 36 // 5


@pytest.mark.parametrize("chunks", ["fixed", "groups", "boundaries"])
def test_soft_capped_steps(chunks):
    """A soft-cap (Gemma-2's attn_logit_softcapping: cap·tanh(term / cap) on every product term,
    keys' and summaries', before the mask and log n_j) at every step of a padded sequence with a
    hole, against the reference with the same cap: fixed chunks with top-k (ranked by the uncapped
    term) and sinks, head groups with an exact group (the capped softmax, not SDPA), boundary
    chunks. A cap of 1 bends these logits (q scaled by 3): the uncapped steps differ."""
    q, k, v, allowed = inputs(Hq=6, Hkv=3, pad=6, hole=True)
    q = q * 3
    cap = 1.0
    segments = torch.tensor([0] * 7 + [1] * 12 + [2] * 18)
    config = MTAConfig(4, 1, 2, 2)
    sums, plain = None, None
    for t in range(q.shape[2]):
        step = q[:, :, t:t + 1]
        if chunks == "groups":
            out, sums = grouped_decode_step(step, k, v, allowed, t + 1, GROUPS, None, sums, softcap=cap)
            uncapped, plain = grouped_decode_step(step, k, v, allowed, t + 1, GROUPS, None, plain)
            want = torch.cat([reference_row(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1], allowed,
                                            t, next(c for c, heads in GROUPS if h in heads) or MTAConfig(64),
                                            softcap=cap) for h in range(6)], dim=1)
        elif chunks == "boundaries":
            bounds = chunk_bounds(segments[None].expand(2, -1), 2, config.chunk_size, config.sinks)
            out, sums = boundary_decode_step(step, k, v, allowed, t + 1, config, bounds, None, sums, softcap=cap)
            uncapped, plain = boundary_decode_step(step, k, v, allowed, t + 1, config, bounds, None, plain)
            want = boundary_reference_row(q, k, v, allowed, t, config, segments, softcap=cap)
        else:
            out, sums = decode_step(step, k, v, allowed, t + 1, config, None, sums, softcap=cap)
            uncapped, plain = decode_step(step, k, v, allowed, t + 1, config, None, plain)
            want = reference_row(q, k, v, allowed, t, config, softcap=cap)
        torch.testing.assert_close(out[:, :, 0].double(), want, rtol=1e-5, atol=1e-5)
    assert (out - uncapped).abs().max() > 0.05


def sink_reference_row(q, k, v, allowed, t, config, sink_logit, softcap=0.0):
    """Row t of the float64 reference over the operands a prompt of the first t + 1 tokens with
    learned sink logits gets (``passes.lower.sink_logit_operands``: one more token at position 0,
    one more sink), the step's query in all of its chunk there."""
    from mta_rewrite.passes.lower import sink_logit_operands, with_sink_token

    scale = q.shape[-1] ** -0.5
    mask = None if allowed is None else allowed[:, None, None, :t + 1]
    qs, ks, vs, mask = sink_logit_operands(q[:, :, :t + 1].double(), k[:, :, :t + 1].double(),
                                           v[:, :, :t + 1].double(), mask, sink_logit.double().view(1, -1, 1, 1),
                                           scale)
    c = config.chunk_size
    qs[:, :, (t + 1) // c * c:] = qs[:, :, t + 1:t + 2]  # (position t + 1 there: the step's query)
    out = mta_attention_reference(qs, ks, vs, mask, causal=True, scale=scale, softcap=softcap,
                                  **with_sink_token(config).op_kwargs())
    return out[:, :, t + 1, :-1]


@pytest.mark.parametrize("config", [MTAConfig(4, 1, 0, 0), MTAConfig(4, 2, 3, 0), MTAConfig(5, 1, 2, 2),
                                    MTAConfig(3, 1, 1, 4), None], ids=str)
@pytest.mark.parametrize("mask", ["none", "padding", "hole"])
def test_steps_with_sink_logits(config, mask):
    """Learned sink logits (GPT-OSS's s_aux: a logit per query head beside the keys', its value
    zero), as the prompt's op takes them: one more token at position 0, one more sink, every real
    token one position later (chunk j holds tokens jc − 1 …). Every step of GQA sequences against
    the reference over those operands: top-k (the sink token, in chunk 0, never taken), sinks,
    padding and a forbidden run; head groups with an exact group (None: the groups of
    test_head_groups_at_every_step, with a soft-cap too). The sink logits matter (their steps
    differ from those without)."""
    q, k, v, allowed = inputs(Hq=6, Hkv=3, pad=6 if mask == "padding" else 0, hole=mask == "hole")
    sink = torch.tensor([1.5, -0.5, 0.0, 2.0, 3.0, -2.0])
    given = None if mask == "none" else allowed
    cap = 0.0 if config is not None else 2.0
    sums, plain = None, None
    for t in range(q.shape[2]):
        step = q[:, :, t:t + 1]
        if config is None:
            out, sums = grouped_decode_step(step, k, v, given, t + 1, GROUPS, None, sums, softcap=cap, sink_logit=sink)
            without, plain = grouped_decode_step(step, k, v, given, t + 1, GROUPS, None, plain, softcap=cap)
            want = torch.cat([sink_reference_row(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1],
                                                 given, t, next(c for c, heads in GROUPS if h in heads) or
                                                 MTAConfig(64), sink[h:h + 1], cap) for h in range(6)], dim=1)
        else:
            out, sums = decode_step(step, k, v, given, t + 1, config, None, sums, sink_logit=sink)
            without, plain = decode_step(step, k, v, given, t + 1, config, None, plain)
            want = sink_reference_row(q, k, v, given, t, config, sink)
            assert sums.chunks == max(0, (t + 1) // config.chunk_size - config.local_chunks + 1)
        torch.testing.assert_close(out[:, :, 0].double(), want, rtol=1e-5, atol=1e-5)
    assert (out - without).abs().max() > 0.05


def boundary_sink_reference_row(q, k, v, allowed, t, config, segment_ids, sink_logit):
    """Row t of the float64 reference with boundary chunks over a prompt's operands with learned
    sink logits (``sink_logit_operands``; the sink token takes the first token's segment,
    ``sink_token_segments``), the step's query in all of its chunk there."""
    from mta_rewrite.ops.reference import chunk_lists
    from mta_rewrite.passes.lower import sink_logit_operands, sink_token_segments, with_sink_token

    scale = q.shape[-1] ** -0.5
    mask = None if allowed is None else allowed[:, None, None, :t + 1]
    qs, ks, vs, mask = sink_logit_operands(q[:, :, :t + 1].double(), k[:, :, :t + 1].double(),
                                           v[:, :, :t + 1].double(), mask, sink_logit.double().view(1, -1, 1, 1),
                                           scale)
    seg = sink_token_segments(segment_ids[None, :t + 1])
    config = with_sink_token(config)
    mine = next(chunk for chunk in chunk_lists(t + 2, config.chunk_size, config.sinks, seg[0].tolist())
                if t + 1 in chunk)
    qs[:, :, mine[0]:] = qs[:, :, t + 1:t + 2]
    out = mta_attention_reference(qs, ks, vs, mask, causal=True, scale=scale, segment_ids=seg,
                                  **config.op_kwargs())
    return out[:, :, t + 1, :-1]


@pytest.mark.parametrize("config", [MTAConfig(4, 1, 0, 0), MTAConfig(5, 2, 3, 0), MTAConfig(4, 1, 2, 2)], ids=str)
@pytest.mark.parametrize("mask", ["none", "padding", "hole"])
def test_boundary_steps_with_sink_logits(config, mask):
    """Boundary chunks with learned sink logits: the sink token first with the first token's
    segment, the chunk bounds of that sequence with one more sink, as the prompt's op chunks it.
    Every step of two sequences with different segments (so different windows) against the
    reference over those operands, top-k and sinks, padding and a forbidden run."""
    from mta_rewrite.passes.lower import sink_token_segments

    q, k, v, allowed = inputs(Hq=6, Hkv=3, pad=6 if mask == "padding" else 0, hole=mask == "hole")
    given = None if mask == "none" else allowed
    sink = torch.tensor([1.5, -0.5, 0.0, 2.0, 3.0, -2.0])
    n = q.shape[2]
    g = torch.Generator().manual_seed(7)
    segment_ids = torch.stack([torch.repeat_interleave(torch.arange(n), torch.randint(1, 10, (n,), generator=g))[:n]
                               for _ in range(2)])
    bounds = chunk_bounds(sink_token_segments(segment_ids), 2, config.chunk_size, config.sinks + 1)
    sums, differed = None, False
    for t in range(n):
        out, sums = boundary_decode_step(q[:, :, t:t + 1], k, v, given, t + 1, config, bounds, None, sums,
                                         sink_logit=sink)
        differed |= bool(sums.done[0] != sums.done[1])
        for b in range(2):
            want = boundary_sink_reference_row(q[b:b + 1], k[b:b + 1], v[b:b + 1],
                                               None if given is None else given[b:b + 1], t, config, segment_ids[b],
                                               sink)
            torch.testing.assert_close(out[b:b + 1, :, 0].double(), want, rtol=1e-5, atol=1e-5)
    assert differed  # (the two sequences' windows apart at some step)


def test_bad_shapes_get_one_line():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match=r"^decode_step takes one query per sequence over at least `length` keys"):
        decode_step(q[:, :, :2], k, v, None, 37, MTAConfig(4))
    with pytest.raises(ValueError, match=r"^decode_step takes one query"):
        decode_step(q[:, :, :1], k, v, None, 38, MTAConfig(4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("extra", ["plain", "softcap", "sink logits"])
def test_a_step_on_cuda_is_the_reference_row(extra):
    """The same torch operations on a CUDA device (no Triton kernel): every step of a padded
    sequence with top-k, in bf16, against the reference; with a soft-cap, with sink logits."""
    q, k, v, allowed = inputs(n=40, pad=5)
    config = MTAConfig(4, 2, 2, 2)
    sink = torch.tensor([1.0, -1.0, 2.0, 0.5])
    kwargs = {"plain": {}, "softcap": dict(softcap=1.0), "sink logits": dict(sink_logit=sink.cuda())}[extra]
    qb, kb, vb = (x.bfloat16().float() for x in (q, k, v))
    sums = None
    for t in range(40):
        out, sums = decode_step(q[:, :, t:t + 1].cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16(),
                                allowed.cuda(), t + 1, config, None, sums, **kwargs)
        if extra == "sink logits":
            want = sink_reference_row(qb, kb, vb, allowed, t, config, sink)
        else:
            want = reference_row(qb, kb, vb, allowed, t, config, softcap=kwargs.get("softcap", 0.0))
        torch.testing.assert_close(out[:, :, 0].double().cpu(), want, rtol=2e-2, atol=2e-2)


def boundary_reference_row(q, k, v, allowed, t, config, segment_ids, summary_weight=None, softcap=0.0):
    """Row t of the float64 reference with boundary chunks over the first t + 1 tokens, the step's
    query in all of its chunk."""
    from mta_rewrite.ops.reference import chunk_lists

    mine = next(chunk for chunk in chunk_lists(t + 1, config.chunk_size, config.sinks, segment_ids[:t + 1].tolist())
                if t in chunk)
    prompt = q[:, :, :t + 1].clone()
    prompt[:, :, mine[0]:] = q[:, :, t:t + 1]
    mask = None if allowed is None else allowed[:, None, None, :t + 1]
    return mta_attention_reference(prompt, k[:, :, :t + 1], v[:, :, :t + 1], mask, causal=True,
                                   segment_ids=segment_ids[None, :t + 1], summary_weight=summary_weight,
                                   softcap=softcap, **config.op_kwargs())[:, :, t]


@pytest.mark.parametrize("config", [MTAConfig(4, 1, 0, 0), MTAConfig(5, 2, 3, 0), MTAConfig(4, 1, 2, 2),
                                    MTAConfig(3, 2, 0, 1), MTAConfig(6, 1, 7, 3)], ids=str)
@pytest.mark.parametrize("mask", ["none", "padding", "hole", "learned"])
def test_boundary_chunks_at_every_step(config, mask):
    """Boundary chunks (segments of 1–9 tokens, each cut to at most c): every step t of sequences
    whose two rows have different segments (so different windows and numbers of summaries), the
    sums carried from step to step (kept as they are while no chunk leaves the window), against
    the float64 reference's row t with those segments (top-k with the step's query in all of its
    chunk); key padding and a forbidden run; learned summaries (with the forbidden run)."""
    q, k, v, allowed = inputs(pad=6 if mask == "padding" else 0, hole=mask in ("hole", "learned"))
    w = torch.randn(2, 8, generator=torch.Generator().manual_seed(5)) if mask == "learned" else None
    n = q.shape[2]
    g = torch.Generator().manual_seed(7)
    segment_ids = torch.stack([torch.repeat_interleave(torch.arange(n), torch.randint(1, 10, (n,), generator=g))[:n]
                               for _ in range(2)])
    bounds = chunk_bounds(segment_ids, 2, config.chunk_size, config.sinks)  # (the whole sequence's: cut to each step)
    sums, differed = None, False
    for t in range(n):
        previous = sums
        out, sums = boundary_decode_step(q[:, :, t:t + 1], k, v, None if mask == "none" else allowed, t + 1, config,
                                         bounds, None, sums, w)
        if previous is not None and torch.equal(previous.done, sums.done):
            assert sums is previous  # (no chunk left the window: the kept sums serve as they are)
        for b in range(2):
            want = boundary_reference_row(q[b:b + 1], k[b:b + 1], v[b:b + 1], allowed[b:b + 1], t, config,
                                          segment_ids[b], w)
            torch.testing.assert_close(out[b:b + 1, :, 0].double(), want, rtol=1e-5, atol=1e-5)
        differed |= bool(sums.done[0] != sums.done[1])
    assert differed  # (the rows' segments differ: so, at some steps, do their numbers of summaries)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_boundary_step_on_cuda_is_the_reference_row():
    """Boundary chunks' steps on a CUDA device (the same torch operations), bf16, padded, top-k:
    every step against the reference with the sequences' segments."""
    q, k, v, allowed = inputs(n=40, pad=5)
    config = MTAConfig(4, 2, 2, 2)
    g = torch.Generator().manual_seed(7)
    segment_ids = torch.stack([torch.repeat_interleave(torch.arange(40), torch.randint(1, 10, (40,), generator=g))[:40]
                               for _ in range(2)])
    bounds = chunk_bounds(segment_ids, 2, 4, 2).cuda()
    sums = None
    for t in range(40):
        out, sums = boundary_decode_step(q[:, :, t:t + 1].cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16(),
                                         allowed.cuda(), t + 1, config, bounds, None, sums)
        for b in range(2):
            want = boundary_reference_row(q[b:b + 1].bfloat16().float(), k[b:b + 1].bfloat16().float(),
                                          v[b:b + 1].bfloat16().float(), allowed[b:b + 1], t, config, segment_ids[b])
            torch.testing.assert_close(out[b:b + 1, :, 0].double().cpu(), want, rtol=2e-2, atol=2e-2)
