"""The cost model (``calibration.cost``): the work it counts, its times, per-group costs of head
groups, how calibration uses them, and the fit that benchmarks/bench_cost_model.py makes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.calibration.cost import (CPU, WORK, TimeModel, exact_flops, load_time_model, mta_work,
                                          relative_cost)
from mta_rewrite.calibration.search import SiteStats, _choose

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cost_model.py"


def test_work_counts_the_spec_flops_key_sets_and_selection():
    """By hand, c=64 L=2 s=4 k=2 at n=1024 (16 chunks), d=32, non-causal: each query attends
    c·(2L−1) + s + k·c + nc = 192 + 4 + 128 + 16 keys (MTA_SPEC's count); a chunk's key set has as
    many rows, k and v, fp32."""
    cfg = mr.MTAConfig(64, 2, 4, 2)
    flops, bytes_, select = mta_work(cfg, 1024, 32, False, heads=4, kv_heads=4, batch=2)
    width = 192 + 4 + 128 + 16
    assert flops == 2 * 4 * 4.0 * 1024 * width * 32 + 2 * 4 * 4.0 * 1024 * 32  # + the summary pass over k and v
    assert bytes_ == 2 * 4 * 16 * width * 32 * 2 * 4
    assert select == 2 * 4 * 16 * (16 + width)
    assert exact_flops(1024, 32, False) == 4.0 * 1024 * 1024 * 32 == 2 * exact_flops(1024, 32, True)
    # causal: the window is the L chunks up to the query's, the summaries half of them on average
    flops_c, _, _ = mta_work(cfg, 1024, 32, True, heads=4, kv_heads=4, batch=2)
    assert flops_c == 2 * 4 * 4.0 * 1024 * (128 + 4 + 128 + 8) * 32 + 2 * 4 * 4.0 * 1024 * 32


def test_top_k_with_grouped_query_heads_builds_its_selected_part_per_query_head():
    """Without top-k the 3 key/value heads' key sets serve all 9 query heads. Top-k selects per
    query head, and the op then builds two key sets (ops.chunked._TopKSplit): the window and sinks
    per key/value head, the selected chunks and summaries per query head; k and v are not copied.
    By hand at n = 2048, c = 64 (32 chunks), causal, L = 2, 4 sinks, top_k = 2: 128 + 4 shared rows,
    128 selected + 16 summaries (half the chunks on average) per query head."""
    plain, topk = mr.MTAConfig(64, 2, 4, 0), mr.MTAConfig(64, 2, 4, 2)
    gqa = dict(heads=9, kv_heads=3)
    mha = dict(heads=9, kv_heads=9)
    assert mta_work(plain, 2048, 64, True, **gqa)[1] * 3 == mta_work(plain, 2048, 64, True, **mha)[1]
    assert mta_work(topk, 2048, 64, True, **mha)[1] == 9 * 32 * (132 + 144) * 64 * 2 * 4
    assert mta_work(topk, 2048, 64, True, **gqa)[1] == 32 * (3 * 132 + 9 * 144) * 64 * 2 * 4
    assert mta_work(plain, 2048, 64, True, **gqa)[2] == 0  # no selection without top-k


def test_times_are_linear_in_the_work_plus_a_call():
    model = TimeModel("m", exact_ms_per_gflop=2.0, exact_call_ms=0.5, mta_ms_per_gflop=3.0, mta_ms_per_gb=10.0,
                      mta_ms_per_mselect=7.0, mta_call_ms=1.5)
    cfg = mr.MTAConfig(32, 1, 0, 1)
    flops, bytes_, select = mta_work(cfg, 512, 16, True, heads=4, kv_heads=2, batch=3)
    assert model.mta_ms(cfg, 512, 16, True, heads=4, kv_heads=2, batch=3) == pytest.approx(
        3.0 * flops / 1e9 + 10.0 * bytes_ / 1e9 + 7.0 * select / 1e6 + 1.5)
    exact = model.exact_ms(512, 16, True, heads=4, batch=3)
    assert exact == pytest.approx(2.0 * 12 * exact_flops(512, 16, True) / 1e9 + 0.5)
    assert relative_cost(cfg, 512, 16, True, heads=4, kv_heads=2, batch=3, model=model) == pytest.approx(
        model.mta_ms(cfg, 512, 16, True, heads=4, kv_heads=2, batch=3) / exact)
    assert relative_cost(None, 512, 16, True) == 1.0


def test_the_cpu_model_keeps_short_sequences_exact_and_long_ones_not():
    """The fixed cost per call decides short sequences: on the CPU box no configuration of the
    benchmark's grid beat exact attention at 256 tokens, all did at 8192 (MiniLM's layer;
    benchmarks/results/cost_model_2026-12-03_fit.md), and the model says the same. The work alone
    (no per-call costs) would approximate at 256 tokens."""
    minilm = dict(heads=12, kv_heads=12)
    grid = [mr.MTAConfig(c, L, s, k) for c in (16, 64) for L in (1, 2) for s in (0, 4) for k in (0, 1, 4)]
    assert all(relative_cost(cfg, 256, 32, False, **minilm) > 1.0 for cfg in grid)
    assert any(relative_cost(cfg, 256, 32, False, model=WORK, **minilm) < 1.0 for cfg in grid)
    assert all(relative_cost(cfg, 8192, 32, False, **minilm) < 1.0 for cfg in grid)


def _site(n=512, heads=4, kv_heads=4, model=CPU, candidates=()):
    st = SiteStats("s", n, 16, True, 1.0, heads=heads, kv_heads=kv_heads, model=model)
    st.candidates = list(candidates)
    st.layout = {c: {} for c in candidates}
    st.costs = {c: relative_cost(c, n, 16, True, model=model, **st.shape()) for c in candidates}
    return st


def test_head_groups_pay_a_call_per_group():
    """A site split into groups of heads runs one op call per group (passes.lower.grouped_attention):
    its cost is the groups' modelled times, each at its own heads, plus the copies, over exact
    attention's at all heads; with the fixed cost per call that is more than the heads-weighted
    mean of the groups' configurations."""
    a, b = mr.MTAConfig(64, 1, 4, 0), mr.MTAConfig(128, 1, 4, 0)
    st = _site(n=4096, candidates=[a, b])
    groups = mr.HeadGroups(((a, (0, 1, 2)), (b, (3,))))
    want = CPU.grouped_ms(groups.groups, 4096, 16, True, heads=4, kv_heads=4) / CPU.exact_ms(4096, 16, True, heads=4)
    assert st.choice_cost(groups) == pytest.approx(want)
    assert st.choice_cost(groups) > (3 * st.costs[a] + st.costs[b]) / 4
    parts = CPU.mta_ms(a, 4096, 16, True, heads=3, kv_heads=3) + CPU.mta_ms(b, 4096, 16, True, heads=1, kv_heads=1)
    assert CPU.grouped_ms(groups.groups, 4096, 16, True, heads=4, kv_heads=4) > parts  # + the copies
    # an exact group costs exact attention on its heads
    mixed = mr.HeadGroups(((a, (0, 1, 2)), (None, (3,))))
    assert CPU.grouped_ms(mixed.groups, 4096, 16, True, heads=4, kv_heads=4) > CPU.exact_ms(4096, 16, True, heads=1)


def test_per_head_choice_that_costs_more_than_exact_stays_exact():
    """_choose per head: when each head's cheapest candidate within τ makes groups whose calls cost
    more than exact attention, the site stays exact (at the same τ one configuration for all
    heads would be chosen by the other policy)."""
    a, b = mr.MTAConfig(64, 1, 0, 0), mr.MTAConfig(32, 1, 0, 0)
    errs = {a: torch.tensor([0.0, 1.0]), b: torch.tensor([1.0, 0.0])}  # head 0 takes a, head 1 takes b

    def parts(cand):
        return errs[cand], torch.ones(2)

    for n, kept in ((512, False), (8192, True)):
        st = _site(n=n, heads=2, kv_heads=2, candidates=[a, b])
        st.head_front = sorted([a, b], key=lambda c: st.costs[c])
        choice, err = _choose(st, parts, True, 0.5)
        grouped = mr.HeadGroups(((a, (0,)), (b, (1,))))
        assert (st.choice_cost(grouped) < 1.0) is kept
        assert (choice == grouped) is kept and (err == 0.0 if kept else err is None)


def test_with_measured_costs_a_per_head_choice_is_timed():
    """With a timer, the groups' cost is what the timer says for the HeadGroups (on the site's
    input), not the model's: kept at 512 tokens when timed fast, dropped at 8192 when timed slow."""
    a, b = mr.MTAConfig(64, 1, 0, 0), mr.MTAConfig(32, 1, 0, 0)
    errs = {a: torch.tensor([0.0, 1.0]), b: torch.tensor([1.0, 0.0])}
    grouped = mr.HeadGroups(((a, (0,)), (b, (1,))))

    class Timer:
        def __init__(self, ratio):
            self.ratio, self.asked = ratio, []

        def relative(self, rec, choice):
            self.asked.append((rec, choice))
            return self.ratio

    for n, ratio, kept in ((512, 0.5, True), (8192, 1.5, False)):
        st = _site(n=n, heads=2, kv_heads=2, candidates=[a, b])
        st.head_front = sorted([a, b], key=lambda c: st.costs[c])
        timer = Timer(ratio)
        choice, _ = _choose(st, lambda c: (errs[c], torch.ones(2)), True, 0.5, timer=timer, rec="the site's input")
        assert timer.asked == [("the site's input", grouped)]
        assert st.choice_cost(grouped) == ratio
        assert (choice == grouped) is kept


def test_calibrate_records_the_cost_model_and_rejects_a_wrong_one():
    model = zoo.TinyCausalLM(d=32, heads=2, layers=1).eval()
    data = [(zoo.byte_tokens(zoo.real_text()[i * 900:], 256),) for i in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = mr.calibrate(model, data, budget=0.5, candidates=[mr.MTAConfig(32)], progress=False, cost_model=WORK)
        assert "work alone" in plan.metadata["costs"]
        with pytest.raises(ValueError, match="cost_model must be a calibration.cost.TimeModel"):
            mr.calibrate(model, data, budget=0.5, progress=False, cost_model="cpu")


def test_load_time_model(tmp_path):
    assert load_time_model("cpu") is CPU and load_time_model("work") is WORK
    good = tmp_path / "m.json"
    fields = dict(machine="m", exact_ms_per_gflop=1, exact_call_ms=0.1, mta_ms_per_gflop=2, mta_ms_per_gb=3,
                  mta_ms_per_mselect=4, mta_call_ms=0.5)
    good.write_text(json.dumps(fields))
    assert load_time_model(str(good)) == TimeModel(**fields)
    for bad, message in (({**fields, "mta_call_ms": -1}, "numbers ≥ 0"), ({**fields, "extra": 1}, "not a cost model"),
                         ({**fields, "exact_call_ms": "fast"}, "numbers ≥ 0"), ([1, 2], "not a cost model")):
        good.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            load_time_model(str(good))
    with pytest.raises(ValueError, match="neither cpu nor work"):
        load_time_model(str(tmp_path / "missing.json"))


def test_the_benchmark_fit_recovers_a_model_from_its_own_times():
    """bench_cost_model.fit on rows timed by a known TimeModel gives back its constants (the
    least squares on relative error, every constant ≥ 0; one constant zero in truth stays zero)."""
    spec = importlib.util.spec_from_file_location("bench_cost_model", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    truth = TimeModel("truth", exact_ms_per_gflop=3.5, exact_call_ms=0.3, mta_ms_per_gflop=5.0, mta_ms_per_gb=70.0,
                      mta_ms_per_mselect=0.0, mta_call_ms=0.9)
    rows = []
    for shape in ("minilm", "smollm2", "gqa4_b2"):
        B, Hq, Hkv, d, causal, _ = bench.SHAPES[shape]
        for n in (256, 1024, 4096):
            for cfg in bench.CONFIGS:
                if cfg.chunk_size < n:
                    kw = dict(heads=Hq, kv_heads=Hkv, batch=B)
                    rows.append({"shape": shape, "batch": B, "heads": Hq, "kv_heads": Hkv, "head_dim": d,
                                 "causal": causal, "n": n,
                                 "config": cfg.to_dict(), "exact_ms": truth.exact_ms(n, d, causal, heads=Hq, batch=B),
                                 "mta_ms": truth.mta_ms(cfg, n, d, causal, **kw)})
    got = bench.fit(rows, "here")
    for field in ("exact_ms_per_gflop", "exact_call_ms", "mta_ms_per_gflop", "mta_ms_per_gb", "mta_call_ms"):
        assert math.isclose(getattr(got, field), getattr(truth, field), rel_tol=0.01), field
    assert got.mta_ms_per_mselect == pytest.approx(0.0, abs=1e-3)
    lines, figures = bench.agreement(rows, got)
    assert figures["same_side_of_exact"] == 1.0 and len(lines) == 9


def test_a_soft_cap_costs_each_computed_logit():
    """A soft-capped site pays the model's cost per logit, exact and MTA (flops / 4d logits); the
    cap moves the relative cost, since exact attention can no longer run SDPA; a model saved
    before the constants existed loads with a cap costing nothing."""
    n, d, heads = 4096, 256, 8
    cfg = mr.MTAConfig(128, 2, 4, 2)
    logits = heads * exact_flops(n, d, True) / (4 * d) / 1e6
    assert CPU.exact_ms(n, d, True, heads=heads, softcap=True) - CPU.exact_ms(n, d, True, heads=heads) == \
        pytest.approx(logits * CPU.exact_softcap_ms_per_mlogit)
    flops = mta_work(cfg, n, d, True, heads=heads, kv_heads=4)[0]
    assert CPU.mta_ms(cfg, n, d, True, heads=heads, kv_heads=4, softcap=True) - \
        CPU.mta_ms(cfg, n, d, True, heads=heads, kv_heads=4) == \
        pytest.approx(flops / (4 * d) / 1e6 * CPU.mta_softcap_ms_per_mlogit)
    capped = relative_cost(cfg, n, d, True, heads=heads, kv_heads=4, softcap=True)
    assert capped < relative_cost(cfg, n, d, True, heads=heads, kv_heads=4)
    old = TimeModel("before", 3.762, 0.242, 5.185, 73.8, 15.395, 0.971)
    assert relative_cost(cfg, n, d, True, heads=heads, kv_heads=4, softcap=True, model=old) == \
        relative_cost(cfg, n, d, True, heads=heads, kv_heads=4, model=old)


def test_calibration_costs_a_soft_capped_site_with_its_cap():
    """The site statistics of a soft-capped site (its records carry the cap) are costed capped:
    exact attention's weight and each candidate's relative cost."""
    from mta_rewrite.calibration.probe import SiteRecord, exact_output
    from mta_rewrite.calibration.search import _site_stats

    def Rec(softcap):  # a probe's record of one sample at the site
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
        exact = exact_output(q, k, v, None, True, 0.25, q.dtype, None, softcap)
        return SiteRecord(q, k, v, None, True, 0.25, exact, softcap=softcap)

    pool = [mr.MTAConfig(32), mr.MTAConfig(16, 1, 4, 1)]
    plain, capped = (_site_stats("s", [Rec(cap)], pool, model=WORK_CAPPED) for cap in (0.0, 5.0))
    assert not plain.softcap and capped.softcap
    assert capped.weight == pytest.approx(WORK_CAPPED.exact_ms(256, 16, True, heads=2, softcap=True))
    assert capped.weight > plain.weight
    # capped exact attention costs more per logit than capped MTA here: a candidate over the
    # crossover uncapped comes under it
    assert set(plain.costs) == {pool[0]} and set(capped.costs) == set(pool)
    for cfg in pool:
        assert capped.costs[cfg] == pytest.approx(relative_cost(cfg, 256, 16, True, heads=2, kv_heads=2, softcap=True,
                                                                model=WORK_CAPPED))
    assert capped.costs[pool[0]] < plain.costs[pool[0]]

WORK_CAPPED = TimeModel("work with a cap", 10.0, 0.0, 10.0, 200.0, 0.0, 0.0, exact_softcap_ms_per_mlogit=5.0,
                        mta_softcap_ms_per_mlogit=1.0)


def test_the_benchmark_fits_the_soft_cap_constants_from_capped_minus_uncapped_times():
    """bench_cost_model.fit_softcap on rows timed by a model with known soft-cap constants gives
    them back, the other constants those of the base model it is handed."""
    spec = importlib.util.spec_from_file_location("bench_cost_model", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    truth = TimeModel("truth", 3.5, 0.3, 5.0, 70.0, 10.0, 0.9, exact_softcap_ms_per_mlogit=2.5,
                      mta_softcap_ms_per_mlogit=1.5)
    rows = []
    for shape, (B, Hq, Hkv, d, causal, _) in bench.SOFTCAP_SHAPES.items():
        for n in (1024, 4096):
            kw = dict(heads=Hq, kv_heads=Hkv, batch=B)
            for cfg in bench.CONFIGS:
                rows.append({"shape": shape, "batch": B, "heads": Hq, "kv_heads": Hkv, "head_dim": d, "causal": causal,
                             "n": n, "config": cfg.to_dict(), "softcap": True,
                             "exact_ms": truth.exact_ms(n, d, causal, heads=Hq, batch=B, softcap=True),
                             "uncapped_exact_ms": truth.exact_ms(n, d, causal, heads=Hq, batch=B),
                             "mta_ms": truth.mta_ms(cfg, n, d, causal, softcap=True, **kw),
                             "uncapped_mta_ms": truth.mta_ms(cfg, n, d, causal, **kw)})
    got = bench.fit_softcap(rows, CPU)
    assert got.exact_softcap_ms_per_mlogit == pytest.approx(2.5, rel=1e-3)
    assert got.mta_softcap_ms_per_mlogit == pytest.approx(1.5, rel=1e-3)
    assert got.exact_ms_per_gflop == CPU.exact_ms_per_gflop and got.mta_call_ms == CPU.mta_call_ms


def test_the_op_in_query_blocks_has_its_own_constants():
    """Where the op runs in query blocks (``block_columns``: boundary chunks, many small fixed
    chunks) a model with query-block constants costs it by them, elsewhere by the fixed-chunk
    op's; a model without them (saved before they existed) costs both alike."""
    cfg = mr.MTAConfig(128, 2, 4, 2)
    cols = (600.0, 900, 64)
    flops, bytes_, select = mta_work(cfg, 8192, 64, True, heads=9, kv_heads=3, block_columns=cols)
    blocks = dataclasses.replace(CPU, block_ms_per_gflop=12.0, block_ms_per_gb=300.0, block_ms_per_mselect=100.0,
                                 block_call_ms=2.0)
    assert blocks.mta_ms(cfg, 8192, 64, True, heads=9, kv_heads=3, block_columns=cols) == pytest.approx(
        flops / 1e9 * 12.0 + bytes_ / 1e9 * 300.0 + select / 1e6 * 100.0 + 2.0)
    plain = dict(heads=9, kv_heads=3)
    assert blocks.mta_ms(cfg, 8192, 64, True, **plain) == CPU.mta_ms(cfg, 8192, 64, True, **plain)
    old = dataclasses.replace(CPU, block_ms_per_gflop=0.0, block_ms_per_gb=0.0, block_ms_per_mselect=0.0,
                              block_call_ms=0.0)
    assert old.mta_ms(cfg, 8192, 64, True, heads=9, kv_heads=3, block_columns=cols) == pytest.approx(
        flops / 1e9 * CPU.mta_ms_per_gflop + bytes_ / 1e9 * CPU.mta_ms_per_gb
        + select / 1e6 * CPU.mta_ms_per_mselect + CPU.mta_call_ms)


def test_the_benchmark_fits_the_query_block_constants():
    """bench_cost_model.fit_blocks on boundary rows timed by a model with known query-block
    constants gives them back, the other constants those of the base model it is handed."""
    spec = importlib.util.spec_from_file_location("bench_cost_model", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    truth = dataclasses.replace(CPU, block_ms_per_gflop=9.0, block_ms_per_gb=250.0, block_ms_per_mselect=40.0,
                                block_call_ms=1.5)
    rows = []
    for shape in ("smollm2", "minilm"):
        B, Hq, Hkv, d, causal, _ = bench.SHAPES[shape]
        for n in (512, 2048, 8192):
            for cfg in bench.CONFIGS:
                if cfg.chunk_size < n:
                    # columns and rows roughly as the op's layout has them (the fit needs only variety)
                    cols = (cfg.chunk_size * (cfg.local_chunks + 1) + cfg.sinks + n / 64 + 40 * cfg.top_k,
                            cfg.chunk_size * 3 + n // 32 + 30 * cfg.top_k, n // 40)
                    kw = dict(heads=Hq, kv_heads=Hkv, batch=B, block_columns=cols)
                    rows.append({"shape": shape, "batch": B, "heads": Hq, "kv_heads": Hkv, "head_dim": d,
                                 "causal": causal, "n": n, "config": cfg.to_dict(), "block_columns": list(cols),
                                 "exact_ms": truth.exact_ms(n, d, causal, heads=Hq, batch=B),
                                 "mta_ms": truth.mta_ms(cfg, n, d, causal, **kw)})
    got = bench.fit_blocks(rows, CPU)
    for field in ("block_ms_per_gflop", "block_ms_per_gb", "block_ms_per_mselect", "block_call_ms"):
        assert getattr(got, field) == pytest.approx(getattr(truth, field), rel=0.01), field
    assert got.mta_ms_per_gflop == CPU.mta_ms_per_gflop and got.exact_ms_per_gflop == CPU.exact_ms_per_gflop
    lines, figures = bench.agreement(rows, got)
    assert figures["same_side_of_exact"] == 1.0 and len(lines) == 6
