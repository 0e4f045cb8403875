"""Calibration with measured costs (``calibrate(measure_costs=...)``, ``cost.MeasuredCosts``):
the timings, not the model, decide the crossover and the plan's cost. Timings are injected where
a test asserts on them; the one real timing run asserts only what does not depend on the clock."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.calibration.cost import WORK, MeasuredCosts, _exact_call, relative_cost
from mta_rewrite.calibration.probe import SiteRecord

FAST, SLOW = mr.MTAConfig(32, 1, 4, 0), mr.MTAConfig(64, 1, 0, 1)  # both under the crossover by the model at 512


class ScriptedCosts(MeasuredCosts):
    """Timings by configuration (None: exact), counting what was timed; each call still runs once."""

    def __init__(self, ms: dict):
        super().__init__(repeats=1, timer=lambda fn, repeats, device: (fn(), 0.0)[1])
        self.script, self.timed = ms, []

    def _time(self, rec, config):
        super()._time(rec, config)  # runs the call (cached by signature like the real timings)
        self.timed.append(config)
        return self.script[config]


def lm_and_data(n=512, samples=3):
    model = zoo.TinyCausalLM(d=64, heads=4, layers=2).eval()
    text = zoo.real_text()
    return model, [(zoo.byte_tokens(text[i * 1500:], n),) for i in range(samples)]


def calibrate(model, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mr.calibrate(model, data, progress=False, return_details=True, **{"cost_model": WORK, **kw})


def test_measured_costs_decide_the_crossover_and_the_plan_cost():
    """SLOW is cheap by the model but measured slower than exact: it is no candidate; FAST costs
    its measured ratio; the site's weight is exact attention's measured time."""
    model, data = lm_and_data()
    timer = ScriptedCosts({None: 10.0, FAST: 4.0, SLOW: 12.0})
    plan, details = calibrate(model, data, budget=1.0, candidates=[FAST, SLOW], measure_costs=timer)
    for st in details.sites:
        assert relative_cost(SLOW, st.n, st.d, st.causal, model=WORK, **st.shape()) < 1.0  # the model kept it
        assert st.candidates == [FAST]
        assert st.costs == {FAST: pytest.approx(0.4)}
        assert st.weight == 10.0
    assert plan.metadata["costs"].startswith("measured on ")
    assert plan.metadata["relative_attention_cost"] == pytest.approx(0.4)  # budget 1: every site takes FAST
    # both layers have the same inputs' signature: exact, FAST and SLOW timed once for both
    assert len(details.sites) == 2 and len(timer._ms) == 3


def test_candidates_the_model_rejects_are_not_timed():
    model, data = lm_and_data()
    huge = mr.MTAConfig(64, 2, 16, 4)  # modelled at 1.6× exact at 512 tokens
    timer = ScriptedCosts({None: 10.0, FAST: 4.0, huge: 1.0})
    _, details = calibrate(model, data, budget=1.0, candidates=[FAST, huge], measure_costs=timer)
    st = details.sites[0]
    assert relative_cost(huge, st.n, st.d, st.causal, model=WORK, **st.shape()) >= 1.0
    assert huge not in timer.timed and huge not in st.candidates


def test_every_candidate_slower_than_exact_keeps_the_model_exact(tmp_path):
    """Measured slower everywhere: no site has a candidate, the plan is exact, the report (table and
    plot) says so."""
    model, data = lm_and_data()
    timer = ScriptedCosts({None: 1.0, FAST: 1.5, SLOW: 2.0})
    plan, details = calibrate(model, data, budget=1.0, candidates=[FAST, SLOW], measure_costs=timer,
                              output=str(tmp_path / "plan.json"))
    assert all(not st.candidates for st in details.sites)
    assert all(entry.config is None for entry in plan.sites.values())
    assert plan.metadata["relative_attention_cost"] == 1.0
    assert "costs measured on" in (tmp_path / "plan.report.md").read_text()
    assert (tmp_path / "plan.report.png").stat().st_size > 0


def test_real_timings_run_end_to_end():
    """The clock itself: every cost a positive finite ratio, the crossover kept, a valid plan."""
    model, data = lm_and_data()
    plan, details = calibrate(model, data, budget=0.5, candidates=[FAST, SLOW, mr.MTAConfig(64)], measure_costs=True)
    for st in details.sites:
        assert all(0 < c < 1.0 and math.isfinite(c) for c in st.costs.values())
        assert st.weight > 0
    assert plan.metadata["holdout_error"] <= 0.5
    assert "threads" in plan.metadata["costs"]  # the CPU it was measured on


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_exact_baseline_is_the_sites_attention(mask):
    """The baseline call (the op with one chunk, what a site left exact runs) computes the site's
    own exact attention: causality and the mask together, GQA."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 9, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(2))
    pad = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    pad[..., :2] = False
    m = {"none": None, "bool": pad, "float": torch.where(pad, 0.0, -math.inf).to(torch.float64)}[mask]
    rec = SiteRecord(q, k, v, m, True, 0.3, exact=None)
    tri = torch.ones(9, 9, dtype=torch.bool).tril()
    allowed = tri if m is None else tri & pad
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed,
                                          scale=0.3)
    torch.testing.assert_close(_exact_call(rec)(), want)


def test_exact_baseline_runs_a_materialised_triangle_as_is_causal(monkeypatch):
    """transformers' decoders hand SDPA a materialised [1, 1, n, n] causal mask (finite minimum
    below the diagonal); the rewritten program's exact sites recognise it and run SDPA's is_causal
    path, so the baseline timed is that call, not SDPA with the mask (1.8x slower on the CPU)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    tri = torch.ones(16, 16, dtype=torch.bool).tril()
    mask = torch.zeros(1, 1, 16, 16).masked_fill(~tri, torch.finfo(torch.float32).min)
    rec = SiteRecord(q, k, v, mask, False, None, exact=None)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    got = _exact_call(rec)()
    assert calls == [(None, True)]
    torch.testing.assert_close(got, sdpa(q, k, v, is_causal=True))


def test_bad_measure_costs_is_a_clear_error():
    model, data = lm_and_data(n=64, samples=2)
    with pytest.raises(ValueError, match="measure_costs must be"):
        calibrate(model, data, budget=0.1, measure_costs="yes")
    with pytest.raises(ValueError, match="without cluster_keys"):
        calibrate(model, data, budget=0.1, measure_costs=True, cluster_keys=True)


def test_head_groups_are_timed_as_they_run():
    """A per-head plan is timed as grouped_attention runs it (one op call per group), not as a
    heads-weighted mean of its configurations' timings: the timed call returns the grouped output."""
    from mta_rewrite.passes.lower import grouped_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 96, 8, generator=g)
    k, v = (torch.randn(1, 2, 96, 8, generator=g) for _ in range(2))
    rec = SiteRecord(q, k, v, None, True, 0.35, exact=None)
    groups = mr.HeadGroups(((FAST, (0, 3)), (None, (1,)), (SLOW, (2,))))
    outputs = []
    timer = MeasuredCosts(repeats=1, timer=lambda fn, repeats, device: (outputs.append(fn()), 2.0)[1])
    assert timer.relative(rec, groups) == 1.0  # 2 ms over the exact call's 2 ms
    want = grouped_attention(q, k, v, None, groups.op_groups(), True, 0.35)
    torch.testing.assert_close(outputs[0], want)  # the first timed call: the groups (exact's came second)
    assert len(outputs) == 2


def test_costs_default_by_device(monkeypatch):
    """On the CPU the default is the fitted CPU model; on a CUDA model (its device stubbed here: the
    timings run on the CPU tensors) measured costs, and with cluster_keys the work alone (no CUDA
    constants exist). The device is the model's, else the sample's."""
    from mta_rewrite.calibration import search

    model, data = lm_and_data(n=64, samples=2)
    assert search._device_of(model, data[0]).type == "cpu"
    assert search._device_of(torch.nn.Identity(), {"x": torch.zeros(1, device="meta")}).type == "meta"

    def costs(**kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = mr.calibrate(model, data, budget=0.1, progress=False, **kw)
        return plan.metadata["costs"]

    assert costs() == f"modelled (calibration.cost: {mr.calibration.cost.CPU.machine})"
    monkeypatch.setattr(search, "_device_of", lambda model, sample: torch.device("cuda"))
    assert costs().startswith("measured on ")
    assert costs(cluster_keys=True) == f"modelled (calibration.cost: {WORK.machine})"
    assert costs(measure_costs=False).endswith(f"{WORK.machine})")
