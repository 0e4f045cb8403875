"""Clustered summaries fitted on calibration keys (calibration/cluster.py) and carried by plans
(``Clustered``) into rewritten models."""

from __future__ import annotations

import pytest
import torch

import mta_rewrite as mr
from mta_rewrite.calibration.cost import WORK
from mta_rewrite import zoo
from mta_rewrite.calibration.cluster import fit_clusters, kmeans
from mta_rewrite.calibration.metrics import first_tensor
from mta_rewrite.calibration.probe import Probe


def test_kmeans_finds_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found = kmeans(x, 3)
    assert torch.cdist(found, centres).min(0).values.max() < 0.1
    assert kmeans(x[:2], 5).shape == (2, 2)  # never more clusters than rows


def bert():
    case = next(c for c in zoo.transformers_cases() if c.name == "bert (eager)")
    model = case.build()
    return model, [case.inputs(n)[1] for n in (60, 60, 60)]


def test_fit_clusters_on_an_encoder_is_never_worse_and_runs_in_the_rewritten_model(tmp_path):
    model, samples = bert()
    probe = Probe(model, (), samples[0])
    configs = {s.name: mr.MTAConfig(8, sinks=1) for s in probe.rewritable}
    chosen, fits = fit_clusters(probe, samples, configs)
    assert set(fits) == set(configs)  # every site of the encoder is clusterable (key padding, non-causal)
    for name, fit in fits.items():
        assert fit.centroids.shape == (4, 8, 8)  # Hkv, K = ⌈60 / 8⌉, d
        assert isinstance(chosen[name], mr.Clustered) == (fit.clustered_error < fit.mean_error)
    assert any(isinstance(c, mr.Clustered) for c in chosen.values())
    plan = mr.Plan(chosen)
    loaded = mr.Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan
    rewritten = mr.rewrite(model, (), samples[0], plan=loaded)
    assert any(b.startswith("mta_centroids_") for b, _ in rewritten.named_buffers())
    with torch.no_grad():
        for s in samples:  # the rewritten model computes what the probe measured
            torch.testing.assert_close(first_tensor(rewritten(**s)), first_tensor(probe.forward(s, chosen)))
    # exported: onnxruntime gives what the rewritten model gives, at another length
    from mta_rewrite.onnx import onnx_session

    mr.export_onnx(model, (), tmp_path / "m.onnx", samples[0], plan=loaded)
    session = onnx_session(tmp_path / "m.onnx")
    case = next(c for c in zoo.transformers_cases() if c.name == "bert (eager)")
    other = case.inputs(71)[1]
    got = session.run(None, {i.name: other[i.name].numpy() for i in session.get_inputs()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), rewritten(**other).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_causal_and_top_k_sites_keep_their_configuration():
    model = zoo.TinyCausalLM(d=64, heads=4, layers=2).eval()
    samples = [(zoo.byte_tokens(zoo.real_text(), 128),)]
    probe = Probe(model, samples[0], {})
    configs = {s.name: mr.MTAConfig(16) for s in probe.rewritable}
    chosen, fits = fit_clusters(probe, samples, configs)
    assert chosen == configs and not fits
    model, samples = bert()
    probe = Probe(model, (), samples[0])
    configs = {s.name: mr.MTAConfig(8, top_k=1) for s in probe.rewritable}
    assert fit_clusters(probe, samples, configs) == (configs, {})


def test_clustered_validation_and_boundaries_conflict():
    cfg = mr.MTAConfig(8)
    with pytest.raises(ValueError, match="no top_k"):
        mr.Clustered(mr.MTAConfig(8, top_k=1), [[[0.0]]])
    with pytest.raises(ValueError, match="same K and d"):
        mr.Clustered(cfg, [[[0.0, 1.0]], [[0.0]]])
    with pytest.raises(ValueError, match="MTAConfig"):
        mr.Clustered(mr.HeadGroups(((cfg, (0,)),)), [[[0.0]]])
    model, samples = bert()
    site = next(s for s in mr.find_attention(model, (), samples[0]) if s.rewritable)
    clustered = mr.Clustered.from_tensor(cfg, torch.zeros(site.kv_heads, 3, site.head_dim))
    with pytest.raises(ValueError, match="takes no boundaries"):
        mr.rewrite(model, (), samples[0], plan=mr.Plan({site.name: clustered}, boundaries=mr.Boundaries((5,))))


def test_calibrate_with_clustered_summaries_and_the_cli(tmp_path):
    """calibrate(cluster_keys=True) on an encoder: plans with clustered summaries are fitted,
    costed with their centroid scoring and verified like the others; the chosen plan's reported
    held-out error is the rewritten model's; the CLI writes such a plan."""
    from typer.testing import CliRunner

    from mta_rewrite.calibration.metrics import output_error
    from mta_rewrite.cli import app

    case = next(c for c in zoo.transformers_cases() if c.name == "bert (eager)")
    model = case.build()
    samples = [case.inputs(256)[1] for _ in range(4)]
    for i, s in enumerate(samples):  # different text per sample
        s["input_ids"] = torch.randint(0, 100, s["input_ids"].shape, generator=torch.Generator().manual_seed(i))
    plan, details = mr.calibrate(model, samples, budget=0.3, progress=False, cluster_keys=True, return_details=True,
                                 cost_model=WORK)
    clustered = [p for p in details.family if p.origin.endswith("+ clustered summaries")]
    assert clustered and all(p.calibration_error is not None for p in clustered)
    for p in clustered:  # costed as clustered: at least the plain plan's cost (centroid scoring)
        base = next(b for b in details.family if b.origin == p.origin.removesuffix(" + clustered summaries"))
        assert p.cost >= base.cost
    rewritten = mr.rewrite(model, (), samples[0], plan=plan)
    held = [samples[i] for i in plan.metadata["holdout_indices"]]
    with torch.no_grad():
        errors = [output_error("rel_l2", rewritten(**s).last_hidden_state, model(**s).last_hidden_state, s)
                  for s in held]
    assert sum(errors) / len(errors) == pytest.approx(plan.metadata["holdout_error"], rel=1e-4, abs=1e-6)
    program = tmp_path / "bert.pt2"
    mr.save_program(model, program, (), samples[0])
    torch.save(samples, tmp_path / "samples.pt")
    result = CliRunner().invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget",
                                      "0.3", "-o", str(tmp_path / "plan.json"), "--cluster-keys", "--cost-model", "work"])
    assert result.exit_code == 0, result.output
    assert mr.Plan.load(tmp_path / "plan.json").metadata["clustered_summaries"] is True
