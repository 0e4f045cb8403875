"""Boundary chunks in rewritten models (``Boundaries``): segment ids computed in the graph from the
model's token ids reach every site's op; against the original model run with the op (and segment
ids computed here, by the rule) in place of its attention."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.calibration.cost import WORK
from mta_rewrite.cli import app

DOT, NEWLINE = ord("."), ord("\n")


def rule_segments(ids: torch.Tensor, separators) -> torch.Tensor:
    """Segment ids by the documented rule, token by token: a segment ends after a separator."""
    out = torch.zeros_like(ids)
    for b in range(ids.shape[0]):
        seg = 0
        for t in range(ids.shape[1]):
            out[b, t] = seg
            seg += int(ids[b, t]) in separators
    return out


def lm_and_text(n=300, batch=2, start=0):
    model = zoo.TinyCausalLM(d=64, heads=4, layers=2).eval()
    return model, zoo.byte_tokens(zoo.real_text()[start:], n, batch=batch)


def test_every_site_chunks_by_segments(monkeypatch):
    """The rewritten model equals the original with its SDPA replaced by the op fed the rule's
    segment ids, at another length than the example's (the ids are computed in the graph)."""
    model, ids = lm_and_text()
    cfg = mr.MTAConfig(16, local_chunks=2, sinks=4, top_k=1)
    gm = mr.rewrite(model, (ids,), config=cfg, boundaries=mr.Boundaries((DOT, NEWLINE)))
    assert mr.count_mta_nodes(gm) == 2
    _, other = lm_and_text(411, start=777)
    seg = rule_segments(other, {DOT, NEWLINE})
    assert int(seg.max()) >= 5  # real text: several sentences and lines

    def sdpa_with_segments(q, k, v, is_causal=False, **_):
        return torch.ops.mta.attention(q, k, v, None, None, seg, causal=is_causal, **cfg.op_kwargs())

    with torch.no_grad():
        got = gm(other)
        fixed = mr.rewrite(model, (ids,), config=cfg)(other)
        monkeypatch.setattr(zoo.F, "scaled_dot_product_attention", sdpa_with_segments)
        want = model(other)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - fixed).abs().max() > 1e-3  # the boundaries changed the chunks


@pytest.mark.parametrize("name", ["llama (sdpa)", "bert (eager)"])
def test_transformers_models_with_and_without_separators(name):
    """GQA and padding masks: with no separator in the input, boundary chunks (no sinks) are the
    fixed chunks exactly; with separators they differ and stay close to the original."""
    case = next(c for c in zoo.transformers_cases() if c.name == name)
    model = case.build()
    args, kwargs = case.inputs(37)
    cfg = mr.MTAConfig(4)
    fixed = mr.rewrite(model, args, kwargs, config=cfg)
    absent = mr.rewrite(model, args, kwargs, config=cfg, boundaries=mr.Boundaries((1000,)))
    present = mr.rewrite(model, args, kwargs, config=cfg, boundaries=mr.Boundaries((3, 5, 7, 11, 13)))
    assert mr.count_mta_nodes(present) == case.rewritable
    with torch.no_grad():
        out = {k: m(*args, **kwargs).last_hidden_state for k, m in
               (("fixed", fixed), ("absent", absent), ("present", present), ("original", model))}
    torch.testing.assert_close(out["absent"], out["fixed"], rtol=1e-6, atol=1e-6)
    assert (out["present"] - out["fixed"]).abs().max() > 1e-5  # (random weights: nearly uniform attention)


def test_plan_carries_boundaries_and_saved_programs_keep_them(tmp_path):
    model, ids = lm_and_text()
    boundaries = mr.Boundaries((DOT,))
    sites = [s.name for s in mr.find_attention(model, (ids,))]
    plan = mr.Plan({sites[0]: mr.MTAConfig(8), sites[1]: mr.MTAConfig(16, sinks=2)}, boundaries=boundaries)
    loaded = mr.Plan.load(plan.save(tmp_path / "plan.json"))
    assert loaded == plan and loaded.boundaries == boundaries
    gm = mr.rewrite(model, (ids,), plan=loaded)
    assert gm.mta_boundaries == boundaries
    mr.save_program(gm, tmp_path / "m.pt2", (ids,))
    _, other = lm_and_text(250, start=4000)
    with torch.no_grad():
        torch.testing.assert_close(mr.load_program(tmp_path / "m.pt2").module()(other), gm(other))
    with pytest.raises(ValueError, match="give one"):
        mr.rewrite(model, (ids,), plan=loaded, boundaries=mr.Boundaries((NEWLINE,)))


def test_boundary_mistakes_are_clear_errors():
    model, ids = lm_and_text(64)
    with pytest.raises(ValueError, match="does not take"):
        mr.rewrite(model, (ids,), config=mr.MTAConfig(8), boundaries=mr.Boundaries((DOT,), input="tokens"))
    case = next(c for c in zoo.hand_written_cases() if c.name == "two_layers")
    args, kwargs = case.inputs(24)
    with pytest.raises(ValueError, match="token ids"):
        mr.rewrite(case.build(), args, kwargs, config=mr.MTAConfig(8), boundaries=mr.Boundaries((1,), input="x"))
    for bad in ((), (-1,), (True,), (1.5,)):
        with pytest.raises(ValueError, match="separators"):
            mr.Boundaries(bad)
    with pytest.raises(ValueError, match="unknown boundaries fields"):
        mr.Boundaries.from_dict({"separators": [1], "sep": 2})


def test_cli_rewrite_with_separators(tmp_path):
    model, ids = lm_and_text()
    program = tmp_path / "lm.pt2"
    mr.save_program(model, program, (ids,))
    out = tmp_path / "lm_mta.pt2"
    runner = CliRunner()
    result = runner.invoke(app, ["rewrite", str(program), "-o", str(out), "--chunk-size", "16", "--sinks", "2",
                                 "--separators", f"{DOT},{NEWLINE}"])
    assert result.exit_code == 0, result.output
    assert "boundary chunks" in result.output
    want = mr.rewrite(model, (ids,), config=mr.MTAConfig(16, sinks=2), boundaries=mr.Boundaries((DOT, NEWLINE)))
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(out)).module()(ids), want(ids))
    for argv, message in [(["--separators", "a,b"], "comma-separated token ids"),
                          (["--separators", "46", "--segment-input", "tokens"], "does not take")]:
        bad = runner.invoke(app, ["rewrite", str(program), "-o", str(tmp_path / "x.pt2"), "--chunk-size", "16", *argv])
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()), bad.output
        assert "Traceback" not in bad.output
    assert not (tmp_path / "x.pt2").exists()


def test_cli_export_with_separators(tmp_path):
    """`export --separators`: the ONNX model computes the segment ids from the token ids itself
    and onnxruntime gives what the rewritten model gives, at another length."""
    from mta_rewrite.onnx import onnx_session

    model, ids = lm_and_text(200)
    program = tmp_path / "lm.pt2"
    mr.save_program(model, program, (ids,))
    out = tmp_path / "lm.onnx"
    result = CliRunner().invoke(app, ["export", str(program), "-o", str(out), "--chunk-size", "16", "--sinks", "2",
                                      "--top-k", "1", "--separators", f"{DOT},{NEWLINE}"])
    assert result.exit_code == 0, result.output
    assert "2 MTA site(s)" in result.output
    want = mr.rewrite(model, (ids,), config=mr.MTAConfig(16, sinks=2, top_k=1), boundaries=mr.Boundaries((DOT, NEWLINE)))
    _, other = lm_and_text(333, start=2500)
    session = onnx_session(out)
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), want(other), rtol=1e-4, atol=1e-4)
    bad = CliRunner().invoke(app, ["export", str(program), "-o", str(tmp_path / "x.onnx"), "--separators", "46"])
    assert bad.exit_code == 2 and "--separators needs --chunk-size or --plan" in " ".join(bad.output.split()), bad.output
    assert not (tmp_path / "x.onnx").exists()


def test_calibrate_with_boundaries_and_the_cli(tmp_path):
    """calibrate(boundaries=): every candidate runs with boundary chunks (the held-out error the
    plan reports is the rewritten model's), costs are those of the op's unpadded layout (causal, no
    mask; with top-k the columns its selection gives on the samples), the plan carries the boundaries; the CLI's
    calibrate --separators writes such a plan and rewrite --plan applies it."""
    from mta_rewrite.calibration.cost import relative_cost
    from mta_rewrite.calibration.metrics import output_error
    from mta_rewrite.ops.segments import padded_length
    from mta_rewrite.ops.varlen import key_columns
    from mta_rewrite.passes.lower import segment_ids_from_separators

    model = zoo.TinyCausalLM(d=64, heads=4, layers=2).eval()
    text = zoo.real_text()
    samples = [(zoo.byte_tokens(text[i * 3000:], 512),) for i in range(4)]
    # (':' ends a segment: in Python sources lines are short, and chunk slots cut at every line
    # cost more than exact attention at 512 tokens, so the cost model keeps every site exact)
    boundaries = mr.Boundaries((ord(":"),))
    plan, details = mr.calibrate(model, samples, budget=0.2, holdout=0.25, progress=False, boundaries=boundaries,
                                 cost_model=WORK, return_details=True)
    assert plan.boundaries == boundaries
    stats = {st.name: st for st in details.sites}
    chosen = [(name, e) for name, e in plan.sites.items() if e.config is not None]
    assert chosen, "a budget of 0.2 approximates some site"
    held_out = set(plan.metadata["holdout_indices"])
    ids = [segment_ids_from_separators(s[0], boundaries.separators) for i, s in enumerate(samples) if i not in held_out]
    for name, entry in chosen:
        cfg = entry.config
        cols = max(key_columns(x, chunk_size=cfg.chunk_size, causal=True, local_chunks=cfg.local_chunks,
                               sinks=cfg.sinks) for x in ids)
        if cfg.top_k == 0:
            want = relative_cost(cfg, 512, 16, True, block_columns=cols, heads=4, model=WORK)
        else:  # the selected chunks' columns, counted from the op's selection on the site's samples
            with_top_k = stats[name].layout[cfg]["block_columns"]
            assert with_top_k[0] > cols[0] and with_top_k[2] == cols[2]
            want = relative_cost(cfg, 512, 16, True, block_columns=with_top_k, heads=4, model=WORK)
            assert want < relative_cost(cfg, 512, 16, True, heads=4, model=WORK,  # (the slots, before 2026-12-05)
                                        padded_n=max(padded_length(x, cfg.chunk_size, cfg.sinks) for x in ids))
        assert entry.relative_cost == pytest.approx(want)
        assert entry.relative_cost > relative_cost(cfg, 512, 16, True, heads=4, model=WORK)  # short lines: more chunks than fixed ones
    rewritten = mr.rewrite(model, samples[0], plan=plan)
    held = [samples[i] for i in plan.metadata["holdout_indices"]]
    with torch.no_grad():
        errors = [output_error("rel_l2", rewritten(*s), model(*s), {}) for s in held]
    assert sum(errors) / len(errors) == pytest.approx(plan.metadata["holdout_error"], rel=1e-4, abs=1e-6)

    program = tmp_path / "lm.pt2"
    mr.save_program(model, program, samples[0])
    torch.save(samples, tmp_path / "samples.pt")
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget", "0.2",
                                 "-o", str(tmp_path / "plan.json"), "--separators", str(ord(":"))])
    assert result.exit_code == 0, result.output
    assert mr.Plan.load(tmp_path / "plan.json").boundaries == boundaries
    result = runner.invoke(app, ["rewrite", str(program), "-o", str(tmp_path / "out.pt2"), "--plan", str(tmp_path / "plan.json")])
    assert result.exit_code == 0 and "boundary chunks" in result.output, result.output
    other = runner.invoke(app, ["rewrite", str(program), "-o", str(tmp_path / "other.pt2"), "--plan",
                                str(tmp_path / "plan.json"), "--separators", "10"])
    assert other.exit_code == 2 and " ".join(other.output.split()) == (
        f"error: the plan chunks by {boundaries}, --separators by boundaries after tokens [10] of input_ids: give one "
        "(the plan's apply without --separators)"), other.output


def test_head_groups_read_the_segments_too():
    """A site planned per group of heads: each group's op chunks by the segments (two groups with
    the same configuration equal that configuration at the whole site)."""
    model, ids = lm_and_text(160)
    cfg = mr.MTAConfig(8, sinks=2, top_k=1)
    groups = mr.HeadGroups(((cfg, (0, 2)), (cfg, (1, 3))))
    boundaries = mr.Boundaries((DOT, NEWLINE))
    sites = [s.name for s in mr.find_attention(model, (ids,))]
    grouped = mr.rewrite(model, (ids,), plan=mr.Plan({name: groups for name in sites}, boundaries=boundaries))
    whole = mr.rewrite(model, (ids,), config=cfg, boundaries=boundaries)
    fixed = mr.rewrite(model, (ids,), plan=mr.Plan({name: groups for name in sites}))
    with torch.no_grad():
        torch.testing.assert_close(grouped(ids), whole(ids), rtol=1e-5, atol=1e-5)
        assert (grouped(ids) - fixed(ids)).abs().max() > 1e-3


class _PrependsAToken(torch.nn.Module):
    """Attention over a learned token followed by the embedded tokens: n + 1 positions."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(256, 16)
        self.first = torch.nn.Parameter(torch.zeros(1, 1, 16))

    def forward(self, input_ids):
        x = torch.cat([self.first.expand(input_ids.shape[0], -1, -1), self.embed(input_ids)], dim=1)
        q = x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_boundaries_that_apply_to_no_site_are_refused_at_rewrite():
    """Every site attends over another sequence than the token input's (here n + 1 positions):
    boundaries would apply to none, a one-line error."""
    ids = zoo.byte_tokens(zoo.real_text(), 40)
    with pytest.raises(ValueError, match=r"boundaries apply to no attention site: each attends over another sequence "
                                         r"than the model's token input \(40 tokens; .*: 41 tokens\)"):
        mr.rewrite(_PrependsAToken(), (ids,), config=mr.MTAConfig(8), boundaries=mr.Boundaries((DOT,)))
    assert mr.count_mta_nodes(mr.rewrite(_PrependsAToken(), (ids,), config=mr.MTAConfig(8))) == 1


class _TextAndPatches(torch.nn.Module):
    """Causal attention over the embedded tokens and, apart, attention over image patches (a
    vision tower's): two sequences, one of them the token ids'."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(256, 16)
        self.patch = torch.nn.Linear(12, 16)

    def heads(self, input_ids, pixels):
        x, y = self.embed(input_ids), self.patch(pixels)
        return (x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2), y.view(y.shape[0], y.shape[1], 2, 8).transpose(1, 2))

    def forward(self, input_ids, pixels):
        text, patches = self.heads(input_ids, pixels)
        return (torch.nn.functional.scaled_dot_product_attention(text, text, text, is_causal=True),
                torch.nn.functional.scaled_dot_product_attention(patches, patches, patches))


@pytest.mark.parametrize("length", [40, 24])
def test_sites_over_another_sequence_than_the_token_ids_chunk_by_chunk_size_alone(length):
    """A model with attention over its tokens and over image patches (a vision-language model's
    towers) takes boundaries: the token site chunks by segments, the patch site by chunk_size
    alone, named in a warning, each as the float64 reference, at the example's length and at
    another. Until 2026-12-07 any site over another sequence was an error for the whole rewrite,
    so no vision-language model took boundaries. With 24 tokens the patches' count equals the
    token ids' in the example: the dynamic program still tells them apart (a length symbol, the
    patches' fixed count)."""
    torch.manual_seed(0)
    model, boundaries, cfg = _TextAndPatches().eval(), mr.Boundaries((DOT, NEWLINE)), mr.MTAConfig(4, sinks=1, top_k=1)
    ids, pixels = zoo.byte_tokens(zoo.real_text(), length, batch=2), torch.randn(2, 24, 12)
    with pytest.warns(UserWarning, match=r"boundaries: 1 attention site\(s\) attend over another sequence than the "
                                         rf"model's token input \({length} tokens\) and chunk by chunk_size alone \(.*: "
                                         r"24 tokens\)"):
        fast = mr.rewrite(model, (ids, pixels), config=cfg, boundaries=boundaries)
    for n in (length, 57):
        ids = zoo.byte_tokens(zoo.real_text()[300:], n, batch=2)
        assert rule_segments(ids, {DOT, NEWLINE}).max() > 0  # (the text has sentences: segments matter)
        text, patches = model.heads(ids, pixels)
        want_text = mr.mta_attention_reference(text, text, text, chunk_size=4, causal=True, sinks=1, top_k=1,
                                               segment_ids=rule_segments(ids, {DOT, NEWLINE}))
        want_patches = mr.mta_attention_reference(patches, patches, patches, chunk_size=4, sinks=1, top_k=1)
        got_text, got_patches = fast(ids, pixels)
        torch.testing.assert_close(got_text.double(), want_text, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_patches.double(), want_patches, rtol=1e-5, atol=1e-5)
