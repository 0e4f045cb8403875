"""The search's site-by-site forward passes (probe.Cursor) and its walk over the tree of upstream
plans, against the plain whole-model forward pass (Probe.run) and a brute-force greedy built on it."""

from __future__ import annotations

import warnings

import pytest
import torch

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.calibration.cost import CPU, WORK, TimeModel, relative_cost
from mta_rewrite.calibration.metrics import relative
from mta_rewrite.calibration.probe import Probe
from mta_rewrite.calibration.search import _choose, _ladder, _site_parts, _walk
from mta_rewrite.config import HeadGroups

from ..zoo_programs import captured

CANDIDATES = [mr.MTAConfig(16), mr.MTAConfig(16, top_k=2), mr.MTAConfig(16, 2, 4, 1), mr.MTAConfig(32, 2, 4, 0),
              mr.MTAConfig(32, 1, 4, 2), mr.MTAConfig(64, 1, 0, 0)]


@pytest.fixture(scope="module")
def probed():
    """A 4-layer built-in LM on 3 samples of real text (bytes), captured with switchable sites."""
    model = zoo.TinyCausalLM(d=64, heads=4, layers=4).eval()
    text = zoo.real_text()
    data = [(zoo.byte_tokens(text[i * 1500:], 512),) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = Probe(model, data[0], {})
    return probe, data


def site_inputs(records):
    return [(r.q, r.k, r.v, r.exact) for r in records]


def test_cursor_stops_at_every_site_with_the_inputs_of_the_whole_forward_pass(probed):
    probe, data = probed
    names = [s.name for s in probe.rewritable]
    head = HeadGroups.from_heads([CANDIDATES[0], None, CANDIDATES[4], CANDIDATES[0]])
    configs = {names[0]: CANDIDATES[2], names[2]: head}  # approximated upstream, one config and one per head
    for sample in data:
        _, records = probe.run(sample, configs, record=set(names))
        cursor = probe.cursor(sample)
        for name in names:
            call = cursor.advance()
            assert call.name == name
            (rec,) = records[name]
            got = call.record
            for got, want in zip((got.q, got.k, got.v, got.exact), (rec.q, rec.k, rec.v, rec.exact)):
                assert torch.equal(got, want)
            assert call.record.causal == rec.causal and call.record.scale == rec.scale
            cursor.resume(call.output(configs.get(name)))
        assert cursor.advance() is None  # past the last site


def test_forks_are_independent(probed):
    probe, data = probed
    names = [s.name for s in probe.rewritable]
    a = probe.cursor(data[0])
    a.advance()
    b = a.fork()
    call = b.advance()  # a fork stands where its parent stood: at the first site
    assert call.name == names[0]
    b.resume(call.output(CANDIDATES[1]))
    a.resume(call.output(None))
    in_a, in_b = a.advance(), b.advance()
    for cursor, config, got in ((a, {}, in_a), (b, {names[0]: CANDIDATES[1]}, in_b)):
        _, records = probe.run(data[0], config, record={names[1]})
        assert torch.equal(got.record.q, records[names[1]][0].q)
        assert torch.equal(got.record.exact, records[names[1]][0].exact)
    assert not torch.equal(in_a.record.q, in_b.record.q)
    with pytest.raises(RuntimeError, match="resume"):
        b.resume(in_b.record.exact)
        b.resume(in_b.record.exact)  # the second is not at a site


def test_cursor_frees_values_after_their_last_use(probed):
    probe, data = probed
    cursor = probe.cursor(data[0])
    cursor.advance()
    program = cursor.program
    live = set(cursor.env)
    # everything still held is read at or after the current node
    for node in live:
        assert any(program.nodes.index(user) >= cursor.pos for user in node.users), node


# The search's question here is the walk itself, so costs are the flops alone (no per-call or copy
# costs, which at these small sizes would keep most per-head plans exact and leave few plans to walk)
FLOPS = TimeModel("flops alone", exact_ms_per_gflop=1.0, exact_call_ms=0.0, mta_ms_per_gflop=1.0, mta_ms_per_gb=0.0,
                  mta_ms_per_mselect=0.0, mta_call_ms=0.0)


def brute_force_greedy(probe, samples, per_head, tau, candidates, memo):
    """Each policy's plan as the search defines it, computed the slow way: for each site in order,
    one whole forward pass per sample with the upstream choices, recording the site. ``memo``
    (shared by the policies of one test) keeps the exact-upstream statistics and each site's
    measurements per upstream plan, so that policies agreeing upstream run those passes once."""
    if "stats" not in memo:  # exact-upstream statistics
        memo["stats"] = _walk(probe, samples, candidates, [(False, 0.0)], lambda: None, model=FLOPS)[0]
    configs, errors = {}, {}
    for st in memo["stats"]:
        key = (st.name, tuple(sorted((name, repr(cfg)) for name, cfg in configs.items())))
        if key not in memo:
            recs = []
            for sample in samples:
                recs += probe.run(sample, configs, record={st.name})[1][st.name]
            memo[key] = {cand: _site_parts(recs, cand) for cand in st.candidates}
        measured = memo[key]
        choice, err = _choose(st, measured.__getitem__, per_head, tau)
        if choice is not None:
            configs[st.name], errors[st.name] = choice, err
    return configs, errors


def test_walk_equals_brute_force_greedy_for_every_policy(probed):
    probe, data = probed
    policies = [(per_head, tau) for per_head in (False, True) for tau in _ladder()]
    nodes = []
    stats, chosen = _walk(probe, data, CANDIDATES, policies, lambda: nodes.append(1), model=FLOPS)
    assert [st.name for st in stats] == [s.name for s in probe.rewritable]
    distinct = {tuple(sorted((k, repr(v)) for k, v in chosen[p][0].items())) for p in policies}
    assert len(distinct) >= 4, "the ladder should give several different plans on this model"
    # one node per site and distinct upstream plan: what policies share is walked once
    pairs = {(st.name, tuple((up.name, chosen[p][0].get(up.name)) for up in stats[:i]))
             for p in policies for i, st in enumerate(stats)}
    assert len(nodes) == len(pairs) > len(stats)
    for st in stats:  # step 2's statistics: errors with exact upstream
        recs = []
        for sample in data:
            recs += probe.run(sample, {}, record={st.name})[1][st.name]
        for cand in st.candidates:
            assert st.errors[cand] == relative(*_site_parts(recs, cand))
    memo = {}
    for policy in policies:
        want_configs, want_errors = brute_force_greedy(probe, data, *policy, CANDIDATES, memo)
        got_configs, got_errors = chosen[policy]
        assert got_configs == want_configs, policy
        assert got_errors == want_errors, policy


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_sites_are_costed_as_the_op_runs_them(arch):
    """transformers hands a decoder's layers the causal triangle as a mask with causal=False; the op
    recognises it and runs causally, so the cost model must too. An encoder's padding stays non-causal."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    n = 256
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                       use_cache=False)
        model = transformers.LlamaModel(cfg).eval()
        data = [{"input_ids": torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    else:
        cfg = transformers.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=1024)
        model = transformers.BertModel(cfg).eval()
        mask = torch.ones(1, n, dtype=torch.long)
        mask[:, n - 40:] = 0
        data = [{"input_ids": torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(i)), "attention_mask": mask}
                for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, details = mr.calibrate(model, data, budget=0.0, candidates=CANDIDATES, progress=False, return_details=True)
    causal = arch == "llama"
    for st in details.sites:
        assert st.causal is causal
        assert (st.batch, st.heads, st.kv_heads) == (1, 2, 1 if causal else 2)
        assert st.weight == CPU.exact_ms(n, st.d, causal, heads=2)
        assert st.candidates == [c for c in CANDIDATES if relative_cost(c, n, st.d, causal, **st.shape()) < 1.0]
        assert st.costs == {c: relative_cost(c, n, st.d, causal, **st.shape()) for c in st.candidates}


def test_many_small_chunks_are_costed_in_query_blocks():
    """Fixed chunks the op runs in query blocks (c < 8, at least 256 chunks: ``varlen.blocks_beat_chunks``)
    are costed from that layout, which the chunk-by-chunk model (quadratic key sets) overestimates;
    the others chunk by chunk."""
    from mta_rewrite.ops.varlen import key_columns

    n = 2048
    model = zoo.TinyCausalLM(d=32, heads=2, layers=1).eval()
    data = [(zoo.byte_tokens(zoo.real_text()[i * 5000:], n),) for i in range(2)]
    small, large = mr.MTAConfig(4, 1, 4, 0), mr.MTAConfig(64, 1, 4, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, details = mr.calibrate(model, data, budget=0.0, candidates=[small, large], progress=False, cost_model=WORK,
                                  return_details=True)
    (st,) = details.sites
    assert st.causal
    cols = key_columns(None, chunk_size=4, causal=True, local_chunks=1, sinks=4, n=n)
    model = dict(model=WORK, **st.shape())
    assert st.costs[small] == pytest.approx(relative_cost(small, n, st.d, True, block_columns=cols, **model))
    assert st.costs[small] < relative_cost(small, n, st.d, True, **model)
    assert st.costs[large] == relative_cost(large, n, st.d, True, **model)


def test_boundary_candidates_with_top_k_are_costed_from_their_selection():
    """Boundary chunks with top-k run in query blocks on the CPU (since 2026-12-05): a candidate's
    columns are the most over the site's samples of what the op's selection gives on each (its q
    and k, the key padding the mask leaves), not the padded slots' length."""
    from mta_rewrite.calibration.probe import SiteRecord
    from mta_rewrite.calibration.search import _layout_costs
    from mta_rewrite.ops.varlen import key_columns

    from ..ops.test_segments import segments

    n, g = 300, torch.Generator().manual_seed(3)
    recs = []
    for i in range(3):
        q, k, v = (torch.randn(1, h, n, 8, generator=g) for h in (4, 2, 2))
        mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
        mask[..., :5 * i] = False  # left padding, by sample
        recs.append(SiteRecord(q, k, v, mask, True, None, None, segment_ids=segments(1, n, rate=0.1, seed=i)))
    pool = [mr.MTAConfig(16, 1, 4, 0), mr.MTAConfig(16, 1, 4, 2), mr.MTAConfig(32, 2, 0, 1)]
    layout = _layout_costs(recs, pool, n, True)
    for cfg in pool:
        shape = dict(chunk_size=cfg.chunk_size, causal=True, local_chunks=cfg.local_chunks, sinks=cfg.sinks, n=n)
        want = max(key_columns(r.segment_ids, top_k=cfg.top_k, q=r.q, k=r.k, attn_mask=r.mask, **shape) for r in recs)
        assert layout[cfg] == {"block_columns": want}
    assert layout[pool[1]]["block_columns"][0] > layout[pool[0]]["block_columns"][0]  # the selected tokens


def _zoo_with_sites():
    return [case for case in zoo.all_cases() if case.rewritable > 0]


@pytest.mark.parametrize("case", _zoo_with_sites(), ids=lambda case: case.name)
@pytest.mark.parametrize("lower_exact", [True, False])
def test_forward_skips_what_only_mta_sites_original_needs_and_equals_run(case, lower_exact, monkeypatch):
    """Probe.forward (verification) equals Probe.run bit for bit, with sites exact and MTA; for an
    MTA site, and for an exact site the probe runs through the op's exact path, it never runs the
    nodes that only its original output needs, and those include the softmax (the attention itself
    is skipped), never the q, k, v or mask the op reads."""
    args, kwargs = captured(case).args, captured(case).kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = Probe(captured(case).program, args, kwargs, lower_exact=lower_exact)
    program = probe.program
    lowered = any(s.kind != "sdpa" or s.mask != "none" for s in probe.rewritable)  # a site the exact path takes
    assert bool(probe.exact_path) == (lower_exact and lowered)
    names = [s.name for s in probe.rewritable]
    assert len(names) == case.rewritable
    sample = kwargs if not args else args
    ran = []
    real_run_node = program.interpreter.run_node
    monkeypatch.setattr(program.interpreter, "run_node", lambda node: ran.append(node) or real_run_node(node))
    heads = probe.rewritable[0].q_heads or 1
    head = HeadGroups.from_heads([mr.MTAConfig(8)] + [None] * (heads - 1)) if heads > 1 else mr.MTAConfig(8, top_k=1)
    for configs in ({}, {names[0]: head}, {name: mr.MTAConfig(8, 1, 2, 1) for name in names}):
        ran.clear()
        got = probe.forward(sample, configs)
        want = probe.run(sample, configs)[0]
        for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            assert torch.equal(a, b)
        for site, only in program.exact_only.items():
            assert only is not None, "export records every original output's dtype"
            assert not only.nodes & set(site.args[1:5])
            assert any("softmax" in str(node.target) or "scaled_dot_product" in str(node.target) for node in only.nodes)
            skipped = configs.get(site.args[5]) is not None or site.args[5] in probe.exact_path
            assert not (only.nodes & set(ran)) if skipped else only.nodes <= set(ran)


def _exact_fraction_by_loops(mask, n, c, causal, L):
    """Brute force, from MTA_SPEC.md: a block (query chunk i, key chunk j) outside the window that
    holds an allowed key of its first query is summarised only if every query of chunk i allows
    the same keys of chunk j and the bias is one constant over them; the fraction that is not."""
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
    bias = None if mask.dtype == torch.bool else torch.where(allowed, mask, 0.0).double()
    nc = -(-n // c)
    total = exact = 0
    for b in range(mask.shape[0]):
        for h in range(mask.shape[1]):
            for i in range(nc):
                for j in range(nc):
                    outside = j < i - L + 1 if causal else abs(i - j) > L - 1
                    rows, cols = slice(i * c, min(n, (i + 1) * c)), slice(j * c, min(n, (j + 1) * c))
                    block = allowed[b, h, rows, cols]
                    if not outside or not block[0].any():
                        continue
                    total += 1
                    same = bool((block == block[0]).all())
                    if same and bias is not None:
                        values = bias[b, h, rows, cols][block]
                        same = bool((values == values[0]).all())
                    exact += not same
    return exact / total if total else 0.0


def test_exact_block_fraction_equals_the_spec_by_loops():
    """ops.chunked.exact_block_fraction (what the cost model counts as attended exactly) against a
    loop over blocks, on masks that are summarised everywhere, nowhere and in part."""
    from mta_rewrite.ops.chunked import exact_block_fraction

    n, H = 50, 2
    g = torch.Generator().manual_seed(0)
    tri = torch.ones(n, n, dtype=torch.bool).tril()
    pos = torch.arange(n)
    rel = (pos[None, :] - pos[:, None]).float()
    masks = {
        "key padding": (torch.arange(n) < 43).view(1, 1, 1, n).expand(1, 1, n, n).clone(),
        "triangle": tri.view(1, 1, n, n),
        "alibi": (torch.tensor([0.5, 0.25]).view(1, H, 1, 1) * pos.view(1, 1, 1, n)).expand(1, H, n, n).clone(),
        "alibi causal": torch.where(tri, 0.3 * rel, float("-inf")).view(1, 1, n, n),
        "buckets": (rel.abs().clamp(max=20) // 10 * torch.sign(rel)).view(1, 1, n, n),
        "random per query": torch.rand(1, H, n, n, generator=g) > 0.3,
        "banded": ((rel <= 0) & (rel > -17)).view(1, 1, n, n),
    }
    seen = set()
    for name, mask in masks.items():
        for c, causal, L in [(8, False, 1), (8, True, 1), (16, True, 2), (7, False, 2)]:
            got = exact_block_fraction(mask, 1, H, n, chunk_size=c, causal=causal, local_chunks=L)
            want = _exact_fraction_by_loops(mask.expand(1, H, n, n), n, c, causal, L)
            assert got == pytest.approx(want, abs=1e-12), (name, c, causal, L)
            seen.add(round(want, 3))
    assert 0.0 in seen and 1.0 in seen and any(0 < f < 1 for f in seen)


def test_a_bias_site_the_op_attends_exactly_is_not_costed_as_summarised():
    """Bloom's ALiBi varies inside every chunk, so the op attends every block exactly: calibration
    must cost its sites at exact attention's price or more, and keep them exact (it once reported
    such a plan at 0.48 of exact attention with an error of 2e-8)."""
    pytest.importorskip("transformers")
    case = next(c for c in zoo.transformers_cases() if c.name == "bloom (eager)")
    model = case.build()
    data = [{"input_ids": torch.randint(0, 100, (1, 256), generator=torch.Generator().manual_seed(i))} for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, details = mr.calibrate(model, data, budget=0.5, candidates=CANDIDATES, progress=False, return_details=True)
    assert [st.candidates for st in details.sites] == [[], []]
    assert plan.metadata["relative_attention_cost"] == 1.0
    assert all(entry.config is None for entry in plan.sites.values())


@pytest.mark.parametrize("case", _zoo_with_sites(), ids=lambda case: case.name)
def test_exact_sites_run_what_the_rewritten_model_runs(case):
    """The probe's all-exact forward pass, whole (Probe.run) or site by site (Probe.forward), is
    the program ``rewrite`` makes when the plan leaves every site exact (the exact-path sites call
    the op with one chunk), bit for bit, at the example's length and another."""
    args, kwargs = captured(case).args, captured(case).kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = Probe(captured(case).program, args, kwargs)
        program = mr.rewrite(captured(case).program, plan=mr.Plan({}))
    for n in case.lengths:
        a, kw = case.inputs(n)
        sample = kw if not a else a
        with torch.no_grad():
            want = torch.utils._pytree.tree_leaves(program(*a, **kw))
            for got in (probe.forward(sample), probe.run(sample)[0]):
                for x, y in zip(torch.utils._pytree.tree_leaves(got), want):
                    assert torch.equal(x, y), n


def test_local_errors_over_the_last_positions_compute_those_rows_only(monkeypatch):
    """With ``last_positions`` a candidate's local error counts the last rows of each sample only,
    so the op computes the query chunks from the first counted row on (``rows_from``), per sample
    (samples of several lengths): the errors are those of the whole outputs, and the chunks before
    were not computed (zeros). Fixed chunks with and without top-k (by chunks and by query blocks),
    groups of heads, key padding, learned sink logits and boundary chunks (with groups of heads
    too), in float64."""
    from mta_rewrite.calibration import search
    from mta_rewrite.calibration.metrics import LocalReference
    from mta_rewrite.calibration.probe import SiteRecord, exact_output, site_output

    gen = torch.Generator().manual_seed(5)
    B, H, Hkv, d, last = 2, 4, 2, 8, 20

    def record(n, mask=None, sinks=None, segments=None):
        q, k, v = (torch.randn(B, h, n, d, generator=gen, dtype=torch.float64) for h in (H, Hkv, Hkv))
        exact = exact_output(q, k, v, mask, True, None, torch.float64, sink_logits=sinks)
        return SiteRecord(q, k, v, mask, True, None, exact, segment_ids=segments, sink_logits=sinks)

    padding = torch.ones(B, 1, 1, 96, dtype=torch.bool)
    padding[1, ..., :10] = False  # left padding
    segments = (torch.rand(B, 96, generator=gen) < 0.2).long().cumsum(-1)
    sites = {"plain": [record(96), record(80)], "padded": [record(96, padding), record(80)],
             "sink logits": [record(96, sinks=torch.randn(1, H, 1, 1, generator=gen, dtype=torch.float64))],
             "boundaries": [record(96, segments=segments)], "long": [record(1024)]}
    configs = [mr.MTAConfig(16), mr.MTAConfig(16, 2, 4, 2), mr.MTAConfig(8, 2, 0, 0), mr.MTAConfig(32, 1, 4, 1),
               mr.MTAConfig(4, 2, 0, 0),  # (in query blocks of 64 at 1024 tokens: ops.varlen.blocks_beat_chunks)
               HeadGroups.from_heads([mr.MTAConfig(16, top_k=1), None, mr.MTAConfig(8), mr.MTAConfig(16)])]
    outputs, skipped = [], 0
    real = search.site_output
    monkeypatch.setattr(search, "site_output", lambda *a, **kw: outputs.append(real(*a, **kw)) or outputs[-1])
    for site, recs in sites.items():
        exacts, masks = [r.exact for r in recs], [r.mask for r in recs]
        for config in configs:
            outputs.clear()
            got = _site_parts(recs, config, LocalReference(exacts, masks, last))
            whole = [site_output(config, None, r.q, r.k, r.v, r.mask, r.causal, r.scale, r.q.dtype,
                                 segment_ids=r.segment_ids, sink_logits=r.sink_logits) for r in recs]
            want = LocalReference(exacts, masks, last).parts(whole)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=f"{site}, {config}")
            assert float(want[0].sum()) > 0, (site, config)
            if site != "boundaries":  # (boundary chunks may compute every row: ops.attention)
                heads = [0, 2, 3] if isinstance(config, HeadGroups) else list(range(H))  # (head 1: exact, SDPA)
                for y, r in zip(outputs, recs):
                    first = (r.q.shape[-2] - last) // 64 * 64  # a multiple of every chunk and block at or before it
                    first -= r.sink_logits is not None  # (the sink logits' token comes first, then is dropped)
                    assert not y[:, heads, :first].any(), (site, config)
                    skipped += first > 0
    assert skipped == 4 * len(configs)  # (the samples of 80 tokens hold no such multiple)
