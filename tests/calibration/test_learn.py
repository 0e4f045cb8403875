"""Learned summaries fitted on calibration data (calibration/learn.py and calibrate(learn_summaries=True))."""

from __future__ import annotations

import warnings

import pytest
import torch

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.calibration.cost import WORK
from mta_rewrite.calibration.learn import fit_site, fit_summaries
from mta_rewrite.calibration.metrics import first_tensor, output_error
from mta_rewrite.calibration.probe import Probe, SiteRecord

from .test_calibrate import CANDIDATES


def _records(seed=0, samples=3, n=96, d=16):
    """Attention where each chunk of 8 keys holds one key far along a direction u that queries
    also point at: exact attention picks those keys out, a chunk mean dilutes them 8-fold, a
    summary weighted towards u recovers them."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(d)
    u[0] = 1.0
    recs = []
    for _ in range(samples):
        q = torch.randn(1, 2, n, d, generator=g) * 0.3 + 2.0 * u
        k = torch.randn(1, 1, n, d, generator=g) * 0.3
        k[:, :, ::8] += 3.0 * u
        v = torch.randn(1, 1, n, d, generator=g)
        exact = torch.nn.functional.scaled_dot_product_attention(q, k.expand(1, 2, n, d), v.expand(1, 2, n, d),
                                                                 is_causal=True)
        recs.append(SiteRecord(q, k, v, None, True, None, exact))
    return recs


def test_fit_lowers_the_error_from_the_means_and_generalises():
    cfg = mr.MTAConfig(8)
    train, test = _records(0), _records(1)
    fit = fit_site("s", cfg, train)
    mean = [float((torch.ops.mta.attention(r.q, r.k, r.v, causal=True, chunk_size=8) - r.exact).norm() / r.exact.norm())
            for r in train]
    assert fit.mean_error == pytest.approx(sum(mean) / len(mean), rel=1e-5)  # step 0: w = 0, the mean
    assert fit.learned_error < 0.5 * fit.mean_error
    assert fit.weight[0, 0] > 0  # leaning towards the keys the queries attend to
    held_mean = [(torch.ops.mta.attention(r.q, r.k, r.v, causal=True, chunk_size=8) - r.exact).norm() / r.exact.norm()
                 for r in test]
    held = [(torch.ops.mta.attention(r.q, r.k, r.v, None, fit.weight, causal=True, chunk_size=8) - r.exact).norm()
            / r.exact.norm() for r in test]
    assert sum(held) < 0.5 * sum(held_mean)


def test_fit_never_ends_worse_than_the_mean():
    """With nothing to learn (keys without structure) the kept weight is no worse than w = 0."""
    g = torch.Generator().manual_seed(3)
    recs = []
    for _ in range(2):
        q, k, v = (torch.randn(1, 1, 64, 8, generator=g) for _ in range(3))
        recs.append(SiteRecord(q, k, v, None, False, None, torch.nn.functional.scaled_dot_product_attention(q, k, v)))
    fit = fit_site("s", mr.MTAConfig(8), recs, steps=5, lr=5.0)  # a wild learning rate
    assert fit.learned_error <= fit.mean_error + 1e-7


def test_fit_summaries_walks_the_plan_in_layer_order():
    model = zoo.TinyCausalLM(d=64, heads=4, layers=2).eval()
    text = zoo.real_text()
    data = [(zoo.byte_tokens(text[i * 2000:], 256),) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe = Probe(model, data[0], {})
    names = [s.name for s in probe.rewritable]
    configs = {names[0]: mr.MTAConfig(16, sinks=2), names[1]: mr.MTAConfig(32)}
    learned, fits = fit_summaries(probe, data, configs, steps=10)
    assert list(fits) == names and set(learned) == set(names)
    for name in names:
        choice = learned[name]
        if isinstance(choice, mr.Learned):
            assert choice.config == configs[name] and fits[name].learned_error < fits[name].mean_error
        else:
            assert choice == configs[name]
    # what the probe runs with the learned choices is what the rewritten model runs
    plan = mr.Plan(learned)
    with torch.no_grad():
        want = first_tensor(probe.forward(data[1], learned))
        got = mr.rewrite(model, data[0], plan=plan)(*data[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_calibrate_with_learned_summaries_meets_the_budget_and_never_costs_more(lm):
    model, data = lm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = mr.calibrate(model, data, budget=0.05, candidates=CANDIDATES, progress=False, cost_model=WORK)
        plan, details = mr.calibrate(model, data, budget=0.05, candidates=CANDIDATES, progress=False, cost_model=WORK,
                                     learn_summaries=True, return_details=True)
    assert plan.metadata["holdout_error"] <= 0.05
    assert plan.metadata["relative_attention_cost"] <= base.metadata["relative_attention_cost"]
    tried = [p for p in details.family if p.origin.endswith("+ learned summaries")]
    assert tried, "the chosen plan is fitted"
    if plan.metadata["relative_attention_cost"] == base.metadata["relative_attention_cost"]:
        assert plan.metadata["holdout_error"] <= base.metadata["holdout_error"]
    # the saved plan reproduces its held-out error
    fast = mr.rewrite(model, data[0], plan=mr.Plan.from_json(plan.to_json()))
    (i,) = plan.metadata["holdout_indices"]
    with torch.no_grad():
        err = output_error("rel_l2", first_tensor(fast(*data[i])), first_tensor(model(*data[i])), {})
    assert err == pytest.approx(plan.metadata["holdout_error"], rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="learned_plans"):
        mr.calibrate(model, data, budget=0.05, candidates=CANDIDATES, progress=False, learn_summaries=True,
                     learned_plans=0)


def test_errors_over_the_last_rows_compute_those_rows_only():
    """With ``last`` the fit's errors (and their gradients in the weight) are those of the whole
    output's last rows, the op computing the query chunks from the first of them on: the rows
    before are not computed (zeros), a fixed configuration and groups of heads."""
    from mta_rewrite.calibration import learn
    from mta_rewrite.calibration.probe import site_output

    recs = _records(seed=3, samples=2, n=96)
    weight = torch.randn(1, 16, generator=torch.Generator().manual_seed(4)) * 0.5
    outputs = []
    real = learn.site_output

    def spy(*args, **kwargs):
        outputs.append(real(*args, **kwargs))
        return outputs[-1]

    for config in (mr.MTAConfig(8, 2, 4, 0), mr.MTAConfig(16, 1, 0, 2),
                   mr.HeadGroups.from_heads([mr.MTAConfig(8), mr.MTAConfig(16, top_k=1)])):
        w = weight.clone().requires_grad_(True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(learn, "site_output", spy)
            outputs.clear()
            got = learn._errors(config, recs, w, last=20)
        (grad,) = torch.autograd.grad(got.sum(), w)
        w2 = weight.clone().requires_grad_(True)
        want = []
        for r in recs:
            out = site_output(config, None, r.q, r.k, r.v, r.mask, r.causal, r.scale, torch.float32, w2, autograd=True)
            y, y0 = out[..., -20:, :], r.exact[..., -20:, :]
            want.append((y - y0).norm() / y0.norm())
        want = torch.stack(want)
        (want_grad,) = torch.autograd.grad(want.sum(), w2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
        assert float(want.detach().min()) > 0
        for y in outputs:  # rows 0..63: the query chunks before row 76 (of 8 and of 16 tokens) not computed
            assert not y[..., :64, :].any(), config
