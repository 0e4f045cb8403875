"""The mta-rewrite command line: real runs on saved programs, and one-line errors."""

from __future__ import annotations

import numpy as np
import onnx
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.cli import app

runner = CliRunner()


def saved_program(tmp_path):
    case = next(c for c in zoo.hand_written_cases() if c.name == "two_layers")
    model = case.build()
    args, kwargs = case.inputs(24)
    path = tmp_path / "model.pt2"
    mr.save_program(model, path, args, kwargs)
    return model, path


def test_find_and_rewrite_a_saved_program(tmp_path):
    model, path = saved_program(tmp_path)
    found = runner.invoke(app, ["find", str(path)])
    assert found.exit_code == 0, found.output
    assert "layers.0" in found.output and "layers.1" in found.output
    before = path.read_bytes()
    out = tmp_path / "model_mta.pt2"
    result = runner.invoke(app, ["rewrite", str(path), "-o", str(out), "--chunk-size", "8", "--sinks", "2"])
    assert result.exit_code == 0, result.output
    assert path.read_bytes() == before  # the input is never touched
    ep = torch.export.load(str(out))
    assert mr.count_mta_nodes(ep) == 2
    found = runner.invoke(app, ["find", str(out)])
    # the op calls are listed by layer with their configuration (they were counted only, in a line
    # under an empty table, and a program captured again named them all as the model's root)
    rows = [line.split("│")[1:-1] for line in found.output.splitlines() if line.startswith("│")]
    assert found.exit_code == 0 and [[cell.strip() for cell in row] for row in rows] == [
        [f"layers.{i}", "2·4/4·24·8", mask, "no", "c8·L1·s2·k0"] for i, mask in ((0, "bool"), (1, "additive"))], \
        found.output
    assert "already rewritten: 2 site(s) call mta.attention with MTA, 0 the op's exact path" in \
        " ".join(found.output.split()), found.output
    mr.Plan({"layers.0": "exact", "layers.1": mr.MTAConfig(4, 2)}).save(tmp_path / "plan.json")
    planned = tmp_path / "planned.pt2"
    assert runner.invoke(app, ["rewrite", str(path), "-o", str(planned), "--plan", str(tmp_path / "plan.json")]).exit_code == 0
    found = " ".join(runner.invoke(app, ["find", str(planned)]).output.split())
    assert "│ layers.0 │" in found and "exact (the op's exact path)" in found and "c4·L2·s0·k0" in found, found
    assert "1 site(s) call mta.attention with MTA, 1 the op's exact path" in found
    torch.save([zoo.hand_written_cases()[-1].inputs(24)[0]], tmp_path / "samples.pt")
    for argv in (["rewrite", str(out), "-o", str(tmp_path / "again.pt2"), "--chunk-size", "4"],
                 ["export", str(out), "-o", str(tmp_path / "again.onnx"), "--chunk-size", "4"],
                 ["calibrate", str(out), "--data", str(tmp_path / "samples.pt"), "--budget", "0.1", "-o",
                  str(tmp_path / "again.json")]):  # its sites' configurations cannot change: say so
        again = runner.invoke(app, argv)
        assert again.exit_code == 2 and "the model is already rewritten: 2 site(s) call mta.attention" in \
            " ".join(again.output.split()), (argv, again.output)
    assert not list(tmp_path.glob("again*"))
    args, kwargs = zoo.hand_written_cases()[-1].inputs(50)  # another length: dynamic
    with torch.no_grad():
        reference = mr.rewrite(model, args, kwargs, config=mr.MTAConfig(8, sinks=2))(*args, **kwargs)
        torch.testing.assert_close(ep.module()(*args, **kwargs), reference)


def test_find_lists_sites_with_learned_sink_logits_as_planned(tmp_path):
    """A rewritten GPT-OSS site calls the op with its sink logit as one more token and dimension:
    ``find`` listed it as n + 1, d + 1 and one more sink than the plan gave (``c8·L1·s1`` for
    ``sinks=0``). It lists the site's own shape and configuration, marked "+ sink logits", for an
    MTA site and one on the exact path, saved or in memory."""
    from mta_rewrite.passes.sites import describe_op_calls

    model = zoo.SinkLogits().eval()
    x, mask = zoo.sink_inputs(24)
    for plan, want in ((mr.Plan({"root": mr.MTAConfig(8, top_k=1)}), "c8·L1·s0·k1"), (mr.Plan({}), "exact")):
        module = mr.rewrite(model, (x, mask), plan=plan)
        path = tmp_path / f"{want}.pt2"
        mr.save_program(module, path, (x, mask))
        assert [(c.config, c.sink_logits) for c in describe_op_calls(module.graph)] == [(want, True)]
        calls = describe_op_calls(mr.load_program(path).graph)
        assert [(c.seq_len, c.head_dim, c.config, c.sink_logits) for c in calls] == [(24, 8, want, True)]
        found = runner.invoke(app, ["find", str(path)])
        cells = [cell.strip() for line in found.output.splitlines() if line.startswith("│") for cell in line.split("│")]
        shown = "exact (the op's exact path)" if want == "exact" else want
        assert found.exit_code == 0 and cells[:5] == ["", "root", "2·4/4·24·8", "additive", "no"], found.output
        assert cells[5] in (shown, f"{shown} + sink logits"), found.output
        assert "+ sink logits" in " ".join(found.output.split()), found.output


class _RoutedLayers(torch.nn.Module):
    """Two layers, each a softmax router (a mixture of experts' gate: not attention) and attention."""

    def __init__(self):
        super().__init__()
        self.routers = torch.nn.ModuleList(torch.nn.Linear(8, 2) for _ in range(2))

    def forward(self, x):
        for router in self.routers:
            x = x * torch.softmax(router(x), dim=-1)[..., :1]
            x = x + torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x
        return x


def test_find_sums_up_softmaxes_that_are_not_attention(tmp_path):
    """A mixture of experts has a softmax router per layer: ``find`` gave each a table row of no
    shape ("None·None/None…") between the attention rows. The table lists the attention; one line
    per reason says how many softmaxes are not attention, and names a few."""
    path = tmp_path / "routed.pt2"
    mr.save_program(_RoutedLayers(), path, (torch.randn(2, 6, 8),))
    found = runner.invoke(app, ["find", str(path)])
    assert found.exit_code == 0, found.output
    rows = [line.split("│")[1].strip() for line in found.output.splitlines() if line.startswith("│")]
    assert len(rows) == 2 and "None" not in found.output, found.output  # the two attention sites only
    line = " ".join(found.output.split())
    assert line.endswith("not attention: 2 softmax(es) (root, root#3): softmax output feeds mul.Tensor, not a product "
                         "with v"), line


def test_find_shows_a_sites_soft_cap_and_rewrite_keeps_it(tmp_path):
    """A soft-capped site (Gemma-2's tanh) is listed with its cap; ``rewrite`` writes a program
    whose op call carries it, listed the same way, and which equals the float64 reference op."""
    from mta_rewrite.ops import mta_attention_reference

    case = next(c for c in zoo.hand_written_cases() if c.name == "soft_cap_tanh")
    model = case.build()
    args, _ = case.inputs(24)
    path, out = tmp_path / "capped.pt2", tmp_path / "capped_mta.pt2"
    mr.save_program(model, path, args)
    found = runner.invoke(app, ["find", str(path)])
    assert found.exit_code == 0 and "softcap" in found.output and "1.5" in found.output, found.output  # (cells wrap)
    done = runner.invoke(app, ["rewrite", str(path), "--output", str(out), "--chunk-size", "6", "--local-chunks", "2",
                               "--sinks", "2", "--top-k", "1"])
    assert done.exit_code == 0, done.output
    listed = runner.invoke(app, ["find", str(out)])
    assert listed.exit_code == 0 and all(x in listed.output for x in ("c6·L2·s2·k1", "softcap", "1.5")), listed.output
    x, mask = case.inputs(40)[0]
    with torch.no_grad():
        want = model.merge(mta_attention_reference(*model.heads(x), mask, scale=model.dh ** -0.5, softcap=model.cap,
                                                   chunk_size=6, local_chunks=2, sinks=2, top_k=1).float())
        torch.testing.assert_close(mr.load_program(out).module()(x, mask), want, rtol=1e-5, atol=1e-5)


def test_find_says_when_there_is_no_attention(tmp_path):
    path = tmp_path / "mlp.pt2"
    mr.save_program(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), path, (torch.randn(2, 8),))
    found = runner.invoke(app, ["find", str(path)])
    assert found.exit_code == 0 and f"no attention (and no softmax) found in {path}" in " ".join(found.output.split())
    _, attention = saved_program(tmp_path)
    assert "no attention" not in runner.invoke(app, ["find", str(attention)]).output


def test_rewrite_with_a_plan(tmp_path):
    _, path = saved_program(tmp_path)
    plan = mr.Plan({"layers.1": mr.MTAConfig(chunk_size=4)}).save(tmp_path / "plan.json")
    out = tmp_path / "planned.pt2"
    result = runner.invoke(app, ["rewrite", str(path), "-o", str(out), "--plan", str(plan)])
    assert result.exit_code == 0, result.output
    assert "1 site(s) now call mta.attention, 1 exact site(s) the op's exact path" in " ".join(result.output.split())
    ep = torch.export.load(str(out))
    assert mr.count_mta_nodes(ep) == 1 and mr.api.count_exact_nodes(ep) == 1  # layers.0 left exact: the op's SDPA
    kept = tmp_path / "kept.pt2"
    result = runner.invoke(app, ["rewrite", str(path), "-o", str(kept), "--plan", str(plan), "--keep-exact"])
    assert result.exit_code == 0, result.output
    ep_kept = torch.export.load(str(kept))
    assert mr.count_mta_nodes(ep_kept) == 1 and mr.api.count_exact_nodes(ep_kept) == 0
    args, kwargs = zoo.hand_written_cases()[-1].inputs(50)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args, **kwargs), ep_kept.module()(*args, **kwargs), rtol=1e-5, atol=1e-5)


def test_export_a_saved_program_to_onnx(tmp_path):
    """`export` on the original with a configuration, and on a program `rewrite` saved: onnxruntime
    runs both at another length and gives the rewritten model's output; the original exports exact."""
    import numpy as np

    from mta_rewrite.onnx import DOMAIN, onnx_session

    model, path = saved_program(tmp_path)
    before = path.read_bytes()
    args, kwargs = zoo.hand_written_cases()[-1].inputs(50)  # another length: dynamic
    with torch.no_grad():
        want = mr.rewrite(model, args, kwargs, config=mr.MTAConfig(8, sinks=2))(*args, **kwargs).numpy()
        exact = model(*args, **kwargs).numpy()
    rewritten = tmp_path / "model_mta.pt2"
    assert runner.invoke(app, ["rewrite", str(path), "-o", str(rewritten), "--chunk-size", "8", "--sinks", "2"]).exit_code == 0
    runs = {
        "configured.onnx": (["--chunk-size", "8", "--sinks", "2"], path, want, 2),
        "from_rewritten.onnx": ([], rewritten, want, 2),
        "exact.onnx": ([], path, exact, 0),
    }
    for name, (options, source, expected, sites) in runs.items():
        result = runner.invoke(app, ["export", str(source), "-o", str(tmp_path / name), *options])
        assert result.exit_code == 0, result.output
        assert f"{sites} MTA site(s)" in result.output
        assert "inputs: x, mask, pad; outputs: output" in result.output  # the feed's names, the model's own
        proto = onnx.load(tmp_path / name)
        assert sum(n.domain == DOMAIN and "Attention" in n.op_type for n in proto.graph.node) == sites
        session = onnx_session(tmp_path / name)
        got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4, err_msg=name)
    assert path.read_bytes() == before  # the input is never touched


def test_export_of_a_large_model_says_where_its_weights_are(tmp_path, monkeypatch):
    """Weights over 1.5 GB go beside the model, in ``<output>.data`` (threshold lowered here): the
    command says so, and refuses, before the work, an output whose ``.data`` file is an input."""
    from mta_rewrite.onnx import export as onnx_export, onnx_session

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 0)
    model, path = saved_program(tmp_path)
    out = tmp_path / "big.onnx"
    result = runner.invoke(app, ["export", str(path), "-o", str(out), "--chunk-size", "8"])
    assert result.exit_code == 0, result.output
    # (rich wraps the line at 80 columns here, a long path too)
    assert "".join(f"(its weights in {out}.data beside it: keep the two together)".split()) in "".join(result.output.split())
    args, kwargs = zoo.hand_written_cases()[-1].inputs(50)
    with torch.no_grad():
        want = mr.rewrite(model, args, kwargs, config=mr.MTAConfig(8))(*args, **kwargs).numpy()
    session = onnx_session(out)
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    # exported again where the weights fit in the model: the .data of the model it replaced goes
    # (until 2026-12-07 it was left beside the new model, read by nothing), and the command says so
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 1536 * 1024 * 1024)
    result = runner.invoke(app, ["export", str(path), "-o", str(out), "--chunk-size", "8"])
    assert result.exit_code == 0, result.output
    assert "".join(f"(removed {out}.data, the weights of the model it replaced)".split()) in "".join(result.output.split())
    assert sorted(p.name for p in tmp_path.glob("big.onnx*")) == ["big.onnx"]
    session = onnx_session(out)
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    clash = tmp_path / "clash.onnx"
    data = path.with_name("clash.onnx.data")
    data.write_bytes(path.read_bytes())
    result = runner.invoke(app, ["export", str(data), "-o", str(clash), "--chunk-size", "8"])
    assert result.exit_code == 2 and result.output.strip() == f"error: {data} is an input: outputs never overwrite " \
        "inputs (give another output)", result.output
    assert not clash.exists() and data.read_bytes() == path.read_bytes()


def test_results_piped_keep_site_names_and_paths_whole(tmp_path):
    """With stdout a pipe (a log, ``| tee``), rich laid the results out for 80 columns: site names
    folded inside the table ("model.layers.0.self_att" over "n": names users copy into plans) and
    a long output path broken across lines, in the table's title and in "saved …". Run as a user
    runs it, in a process of its own with stdout a pipe and no COLUMNS."""
    import os
    import subprocess
    import sys

    _, program = saved_transformers_lm(tmp_path)
    out = tmp_path / ("a_folder_with_a_long_name_" * 3) / "the_rewritten_program.pt2"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    run = subprocess.run([sys.executable, "-m", "mta_rewrite", "rewrite", str(program), "-o", str(out),
                          "--chunk-size", "8"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"{program} → {out}" and lines[-1].endswith(f"saved {out}"), run.stdout
    for name in ("model.layers.0.self_attn", "model.layers.1.self_attn"):
        assert any(f"│ {name} " in line for line in lines), run.stdout


def test_user_mistakes_are_one_line_errors(tmp_path):
    _, path = saved_program(tmp_path)
    junk = tmp_path / "junk.pt2"
    junk.write_text("not a program")
    bad_plan = tmp_path / "bad.json"
    bad_plan.write_text("{")
    not_utf8 = tmp_path / "latin1.json"
    not_utf8.write_bytes('{"format": "mta-rewrite-plan", "sites": {"é": "exact"}}'.encode("latin-1"))
    samples = tmp_path / "samples.pt"
    torch.save([next(c for c in zoo.hand_written_cases() if c.name == "two_layers").inputs(24)[0]], samples)
    report = tmp_path / "s.report.md"
    report.write_bytes(samples.read_bytes())
    one_sample = tmp_path / "one.pt"
    torch.save({"x": torch.zeros(1, 24, 32)}, one_sample)
    before = {p: p.read_bytes() for p in (path, samples, report)}
    cases = [
        (["find", str(tmp_path / "missing.pt2")], "no such file"),
        (["find", str(junk)], "not a program"),
        (["rewrite", str(path), "-o", str(path), "--chunk-size", "8"], "is an input: outputs never overwrite inputs"),
        (["rewrite", str(path), "-o", str(tmp_path / "o.pt2")], "either --chunk-size"),
        (["rewrite", str(path), "-o", str(tmp_path / "o.pt2"), "--chunk-size", "8", "--local-chunks", "0"], "local_chunks"),
        (["rewrite", str(path), "-o", str(tmp_path / "o.pt2"), "--chunk-size", "0"], "chunk_size must be an integer ≥ 1"),
        (["export", str(path), "-o", str(tmp_path / "o.onnx"), "--chunk-size", "-4"], "chunk_size must be an integer ≥ 1"),
        (["rewrite", str(path), "-o", str(tmp_path / "o.pt2"), "--plan", str(bad_plan)], "not valid JSON"),
        (["export", str(path), "-o", str(path)], "is an input: outputs never overwrite inputs"),
        (["export", str(path), "-o", str(tmp_path / "o.onnx"), "--chunk-size", "8", "--plan", str(bad_plan)], "not both"),
        (["export", str(path), "-o", str(tmp_path / "o.onnx"), "--plan", str(bad_plan)], "not valid JSON"),
        (["export", str(junk), "-o", str(tmp_path / "o.onnx")], "not a program"),
        (["export", str(path), "-o", str(tmp_path / "o.onnx"), "--opset", "-3"], "--opset"),
        (["export", str(path), "-o", str(tmp_path / "o.onnx"), "--opset", "17"], "opset must be from 18"),
        (["export", str(path), "-o", str(tmp_path / "o.onnx"), "--chunk-size", "8", "--opset", "99"],
         "opset must be from 18"),
        (["demo", "--model", "gpt5"], "--model must be"),
        (["rewrite", str(path), "-o", str(path.parent / "junk.pt2" / "o.pt2"), "--chunk-size", "8"],
         f"cannot write {junk / 'o.pt2'}: Not a directory"),  # (it was "File exists", of junk.pt2)
        (["export", str(path), "-o", str(path.parent / "junk.pt2" / "o.onnx")], "cannot write"),
        (["calibrate", str(path), "--data", str(path), "--budget", "0.1", "-o", str(path.parent / "junk.pt2" / "p.json")],
         "Not a directory"),  # before loading anything
        # a run that fails after the outputs' check (in a folder not made yet) leaves no folder behind
        (["export", str(junk), "-o", str(tmp_path / "new" / "o.onnx")], "not a program"),
        (["rewrite", str(junk), "-o", str(tmp_path / "new" / "deeper" / "o.pt2"), "--chunk-size", "8"], "not a program"),
        (["calibrate", str(path), "--data", str(tmp_path / "missing.pt"), "--budget", "0.1", "-o",
          str(tmp_path / "p.json")], f"no such file: {tmp_path / 'missing.pt'}"),
        (["calibrate", str(path), "--data", str(junk), "--budget", "0.1", "-o", str(tmp_path / "p.json")],
         f"{junk} is not a torch.save file of samples"),
        (["calibrate", str(path), "--data", str(one_sample), "--budget", "0.1", "-o", str(tmp_path / "p.json")],
         f"{one_sample} must hold a list of samples, got dict"),
        (["demo", "--device", "tpu"], "--device must be cpu or cuda"),
        (["calibrate", str(path), "--data", str(path), "--budget", "0.1", "-o", str(tmp_path / "p.json"), "--device",
          "tpu"], "--device must be cpu or cuda"),
        # found by tests/test_random_command_lines.py: calibrate wrote its plan over the program or the
        # samples named as --output; -o '' and -o <folder> failed after the work ("Device or resource
        # busy"); numbers beyond int64 reached torch ("expected int, found int"; "Overflow when unpacking
        # long long"); a plan not in UTF-8 was an error without its file's name
        (["calibrate", str(path), "--data", str(samples), "--budget", "0.1", "-o", str(path)], "is an input"),
        (["calibrate", str(path), "--data", str(samples), "--budget", "0.1", "-o", str(samples)], "is an input"),
        (["calibrate", str(path), "--data", str(report), "--budget", "0.1", "-o", str(tmp_path / "s.json")],
         f"{report} is an input"),  # the report beside the plan would replace the samples
        (["rewrite", str(path), "-o", "", "--chunk-size", "8"], "cannot write an empty path"),
        (["export", str(path), "-o", ""], "cannot write an empty path"),
        (["calibrate", str(path), "--data", str(samples), "--budget", "0.1", "-o", ""], "cannot write an empty path"),
        (["rewrite", str(path), "-o", str(tmp_path), "--chunk-size", "8"], "Is a directory"),
        (["export", str(path), "-o", str(tmp_path)], "Is a directory"),
        (["rewrite", str(path), "-o", str(tmp_path / "o.pt2"), "--chunk-size", str(2 ** 64)], "below 2**63"),
        (["export", str(path), "-o", str(tmp_path / "o.onnx"), "--chunk-size", "8", "--sinks", str(2 ** 63)],
         "below 2**63"),
        (["rewrite", str(path), "-o", str(tmp_path / "o.pt2"), "--chunk-size", "8", "--separators", str(2 ** 63),
          "--segment-input", "x"], "below 2**63"),
        (["calibrate", str(path), "--data", str(samples), "--budget", "0.1", "-o", str(tmp_path / "p.json"), "--seed",
          str(2 ** 64)], "seed must be an integer a torch.Generator takes"),
        (["rewrite", str(path), "-o", str(tmp_path / "o.pt2"), "--plan", str(not_utf8)], f"plan {not_utf8} is not a"),
        # typer's usage errors, one line too, naming the help to read (they were a framed box of lines)
        (["rewrite", str(path), "-o", str(tmp_path / "o.pt2"), "--chunk-size", "x"],
         "Invalid value for '--chunk-size': "),
        (["rewrite", str(path), "--chunk-size", "8"], "Missing option '--output' / '-o'; see root rewrite --help"),
        (["rewrite", "-o", str(tmp_path / "o.pt2")], "Missing argument 'program'; see root rewrite --help"),
        (["rewrite", str(path), "-o", str(tmp_path / "o.pt2"), "--chunk-sise", "8"],
         "No such option: --chunk-sise"),  # (click may add "(Possible options: --chunk-size, …)")
        (["frob", str(path)], "No such command 'frob'; see root --help"),
        (["rewirte", str(path)], "No such command 'rewirte'"),  # (click may add ". Did you mean 'rewrite'?")
        (["--verbose", "find", str(path)], "No such option: --verbose; see root --help"),
    ]
    if not torch.cuda.is_available():
        cases.append((["demo", "--model", "builtin", "--device", "cuda"], "no CUDA GPU is available"))
        cases.append((["calibrate", str(path), "--data", str(path), "--budget", "0.1", "-o", str(tmp_path / "p.json"),
                       "--device", "cuda"], "no CUDA GPU is available"))
    for argv, message in cases:
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        lines = result.output.strip().splitlines()
        # one line, whatever its length (rich wrapped errors at 80 columns when not on a terminal)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, result.output)
    assert not (tmp_path / "o.pt2").exists() and not (tmp_path / "o.onnx").exists()
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "new").exists()
    assert {p: p.read_bytes() for p in (path, samples, report)} == before  # the inputs are never touched


def test_load_program_moves_it_to_a_device(tmp_path):
    """``load_program(path, device)`` (calibrate --device): parameters, buffers and the devices the
    graph names move; on the meta device the program runs as shapes alone."""
    model, path = saved_program(tmp_path)
    args, kwargs = next(c for c in zoo.hand_written_cases() if c.name == "two_layers").inputs(24)
    moved = mr.load_program(path, "meta")
    assert {t.device.type for t in moved.state_dict.values()} == {"meta"}
    out = moved.module()(*[a.to("meta") for a in args], **{k: v.to("meta") for k, v in kwargs.items()})
    assert out.device.type == "meta" and out.shape == model(*args, **kwargs).shape
    with torch.no_grad():
        assert torch.equal(mr.load_program(path).module()(*args, **kwargs), model(*args, **kwargs))


def saved_on_gpu(path, out):
    """The saved program at ``path`` as a GPU machine would have saved it: every tensor's device in
    the archive's metadata says cuda (what torch.export.load moves it back to)."""
    import zipfile

    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith(".json"):
                data = data.replace(b'"type": "cpu"', b'"type": "cuda"')
            dst.writestr(info, data)
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_a_program_saved_on_a_gpu_is_a_one_line_error_without_one(tmp_path):
    _, path = saved_program(tmp_path)
    gpu = saved_on_gpu(path, tmp_path / "gpu.pt2")
    with pytest.raises(ValueError, match="saved on a CUDA device and this machine has none"):
        mr.load_program(gpu)
    args, _ = next(c for c in zoo.hand_written_cases() if c.name == "two_layers").inputs(24)
    torch.save([args], tmp_path / "samples.pt")
    for argv in (["find", str(gpu)],
                 ["calibrate", str(gpu), "--data", str(tmp_path / "samples.pt"), "--budget", "0.1", "-o",
                  str(tmp_path / "p.json")]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "saved on a CUDA device" in " ".join(result.output.split())


def test_python_dash_m_runs_the_command_line():
    import subprocess
    import sys

    import mta_rewrite

    done = subprocess.run([sys.executable, "-m", "mta_rewrite", "version"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == mta_rewrite.__version__, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "mta_rewrite", "find", "missing.pt2"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "no such file: missing.pt2" in done.stdout + done.stderr



def test_help_lists_each_command_in_flowing_sentences():
    """The commands' descriptions are their docstrings' first paragraphs, re-flowed to the terminal:
    typer's default "rich" markup kept the docstrings' line breaks, so a description broke off
    mid-sentence ("as a program the other" / "commands take") and wrapped raggedly."""
    import re

    result = runner.invoke(app, ["--help"], terminal_width=250, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = [re.sub(r"[│\s]+", " ", line).strip() for line in result.output.splitlines()]
    assert any("as a program the other commands take (and, from a text, its calibration samples)." in line
               for line in lines), result.output
    assert any("for a program that rewrite saved, also its mta.attention calls" in line for line in lines), result.output


def test_warnings_are_one_line_each(tmp_path):
    """A warning from the command line is one line on stderr ("warning: …"), not Python's file,
    line and source of the code that raised it. Here: a program the user captured at batch 1 with
    torch.export, which fixes the batch at 1; the rewrite saves it as it must and says so."""
    import subprocess
    import sys

    model = zoo.ScoresDivMaskedFill().eval()
    x, mask = torch.randn(1, 24, 32), torch.ones(24, 24, dtype=torch.bool).tril()[None, None]
    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO}, None)
    torch.export.save(torch.export.export(model, (x, mask), dynamic_shapes=dims, strict=False), tmp_path / "one.pt2")
    argv = ["rewrite", str(tmp_path / "one.pt2"), "--chunk-size", "8", "-o", str(tmp_path / "fast.pt2")]
    done = subprocess.run([sys.executable, "-m", "mta_rewrite", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: the program takes batches of one only (capture at batch 2 "
                                                   "failed: Guard failed: x.size()[0] == 1)"), done.stderr


class _SeparateKeyValue(torch.nn.Module):
    """nn.MultiheadAttention whose k and v are not its query tensor: its in-projection weights are
    split three ways in the graph, which onnxscript's optimiser logs it cannot fold."""

    def __init__(self):
        super().__init__()
        self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        kv = x * 1.0
        return self.mha(x, kv, kv, need_weights=False)[0]


def test_export_prints_no_log_lines_of_the_libraries_it_uses(tmp_path):
    """``export`` says what it saved on stdout and nothing on stderr: onnxscript's optimiser logs a
    warning for every constant it leaves unfolded ("Skipping constant folding for op Split with
    multiple outputs", four lines here), which is not the user's business (torch.onnx's and
    torch.export's own are silenced the same way). The ONNX model is still the rewritten one."""
    import subprocess
    import sys

    model = _SeparateKeyValue().eval()
    x = torch.randn(2, 24, 16)
    mr.save_program(model, tmp_path / "mha.pt2", (x,))
    argv = ["export", str(tmp_path / "mha.pt2"), "--chunk-size", "4", "-o", str(tmp_path / "mha.onnx")]
    done = subprocess.run([sys.executable, "-m", "mta_rewrite", *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stderr == "", done.stderr
    from mta_rewrite.onnx import onnx_session

    session = onnx_session(tmp_path / "mha.onnx")
    x2 = torch.randn(3, 29, 16)
    with torch.no_grad():
        want = mr.rewrite(model, (x,), config=mr.MTAConfig(4))(x2)
    np.testing.assert_allclose(session.run(None, {"x": x2.numpy()})[0], want.numpy(), atol=1e-5)


def test_exhausted_memory_is_a_one_line_error_and_other_failures_keep_their_traceback(tmp_path, monkeypatch):
    """Memory exhausted by what was asked (torch's CPU allocator, CUDA's OutOfMemoryError, a size
    whose bytes overflow) is ``error: out of memory: …`` on one line; any other RuntimeError is a
    defect of ours and is not dressed up as a user mistake."""
    import mta_rewrite.api as api

    _, path = saved_program(tmp_path)
    argv = ["rewrite", str(path), "-o", str(tmp_path / "o.pt2"), "--chunk-size", "8"]
    failures = [
        (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                      "tried to allocate 140737488355328 bytes.\nframe #0: c10::Error"), "can't allocate memory"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"), "CUDA out of memory"),
        (RuntimeError("Storage size calculation overflowed with sizes=[2, 4611686018427387904]"), "overflowed"),
    ]
    for error, words in failures:
        def load(*_, error=error):
            raise error
        monkeypatch.setattr(api, "load_program", load)
        result = runner.invoke(app, argv)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: out of memory: ") and \
            words in lines[0], result.output
    monkeypatch.setattr(api, "load_program", lambda *_: (_ for _ in ()).throw(RuntimeError("a defect")))
    result = runner.invoke(app, argv)
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError) and "a defect" in str(result.exception)
    assert not (tmp_path / "o.pt2").exists()


def test_errors_and_warnings_print_as_written(capsys):
    """Messages are text, not rich markup: a library's warning such as "[rank0]: ..." lost its
    tag, and one holding "[/]" raised rich's MarkupError from the warning handler."""
    import typer

    from mta_rewrite.cli import _fail, _warn, console

    text = "a [rank0] b [/] c [bold]d [1, 2]"
    _warn(text)
    assert capsys.readouterr().err == f"warning: {text}\n"
    with pytest.raises(typer.Exit) as exit_info:
        _fail(text)
    assert exit_info.value.exit_code == 2 and capsys.readouterr().err == f"error: {text}\n"
    console.print(f"no attention (and no softmax) found in {text}.pt2")  # paths, site names, reasons
    assert capsys.readouterr().out == f"no attention (and no softmax) found in {text}.pt2\n"


def test_demo_builtin_runs_end_to_end():
    result = runner.invoke(app, ["demo", "--model", "builtin", "--long-n", "1024"])
    assert result.exit_code == 0, result.output
    assert "4 of 4 attention sites rewritten" in " ".join(result.output.split())
    assert "KL divergence" in result.output


def saved_lm(tmp_path):
    """The built-in causal LM saved as a program, and 4 samples of 512 bytes of real text saved beside it."""
    model = zoo.TinyCausalLM(d=64, heads=4, layers=2).eval()
    text = zoo.real_text()
    samples = [(zoo.byte_tokens(text[i * 2000:], 512),) for i in range(4)]
    program = tmp_path / "lm.pt2"
    mr.save_program(model, program, samples[0])
    torch.save(samples, tmp_path / "samples.pt")
    return model, samples, program


def test_calibrate_a_saved_program(tmp_path):
    model, samples, program = saved_lm(tmp_path)
    plan_path = tmp_path / "plan.json"
    result = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget", "0.2",
                                 "-o", str(plan_path)])
    assert result.exit_code == 0, result.output
    plan = mr.Plan.load(plan_path)
    assert plan.metadata["holdout_error"] <= 0.2
    assert (tmp_path / "plan.report.md").exists()
    bad = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "nope.pt"), "--budget", "0.2", "-o", "x.json"])
    assert bad.exit_code == 2 and "no such file" in bad.output
    bad = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget", "-1", "-o", "x.json"])
    assert bad.exit_code == 2 and "budget" in bad.output
    bad = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget", "0.2", "-o",
                              "x.json", "--measure-costs", "--cluster-keys"])
    assert bad.exit_code == 2 and "without cluster_keys" in " ".join(bad.output.split())
    assert "modelled" in result.output
    # the default cost model (this project's CPU box) keeps this small model exact at 512 tokens,
    # where the op's per-call costs outweigh what it saves; by the work alone it approximates
    assert plan.metadata["relative_attention_cost"] == 1.0
    # ... and says so: on the command line, in the plan and in its report
    sites = list(plan.sites)
    assert plan.metadata["sites_without_candidates"] == sites and plan.metadata["site_lengths"] == [512]
    assert ("warning: no configuration was cheaper than exact attention at any site at n = 512 under these costs: "
            "every site stays exact; calibrate on longer samples") in " ".join(result.output.split()), result.output
    assert (f"{len(sites)} of {len(sites)} sites had no candidate configuration cheaper than exact attention"
            in (tmp_path / "plan.report.md").read_text())
    work = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget", "0.2",
                               "-o", str(tmp_path / "work.json"), "--cost-model", "work"])
    assert work.exit_code == 0, work.output
    assert mr.Plan.load(tmp_path / "work.json").metadata["relative_attention_cost"] < 1.0
    late = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget", "0.2",
                               "-o", str(tmp_path / "late.json"), "--cost-model", "work", "--last-positions", "64"])
    assert late.exit_code == 0 and "the last 64 positions" in " ".join(late.output.split()), late.output
    assert mr.Plan.load(tmp_path / "late.json").metadata["last_positions"] == 64
    assert "no configuration was cheaper" not in work.output
    assert mr.Plan.load(tmp_path / "work.json").metadata["sites_without_candidates"] == []
    for spec, message in (("gpu", "neither cpu nor work nor a JSON file"), (str(plan_path), "not a cost model")):
        bad = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget", "0.2",
                                  "-o", "x.json", "--cost-model", spec])
        assert bad.exit_code == 2 and message in " ".join(bad.output.split()), bad.output
    assert not (tmp_path / "x.json").exists() and not Path("x.json").exists()


def test_calibrate_with_measured_costs(tmp_path):
    _, _, program = saved_lm(tmp_path)
    plan_path = tmp_path / "plan.json"
    result = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget", "0.2",
                                 "-o", str(plan_path), "--measure-costs"])
    assert result.exit_code == 0, result.output
    plan = mr.Plan.load(plan_path)
    assert plan.metadata["costs"].startswith("measured on") and plan.metadata["holdout_error"] <= 0.2
    assert "costs measured on" in (tmp_path / "plan.report.md").read_text()


def test_learned_summaries_from_calibrate_to_rewrite_and_onnx(tmp_path):
    """calibrate --learn-summaries writes a plan whose learned sites carry their weights; rewrite
    and export apply it, and both reproduce the held-out error calibrate reported."""
    from mta_rewrite.calibration.metrics import output_error
    from mta_rewrite.onnx import onnx_session

    model, samples, program = saved_lm(tmp_path)
    plan_path = tmp_path / "plan.json"
    result = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget", "0.2",
                                 "--learn-summaries", "-o", str(plan_path), "--cost-model", "work"])
    assert result.exit_code == 0, result.output
    plan = mr.Plan.load(plan_path)
    learned = [e.config for e in plan.sites.values() if isinstance(e.config, mr.Learned)]
    assert learned and all(len(c.weight) == 4 and len(c.weight[0]) == 16 for c in learned)  # [Hkv][d] per site
    assert plan.metadata["learned_summaries"] is True
    (hold,) = plan.metadata["holdout_indices"]
    for command, out in (("rewrite", tmp_path / "lm_mta.pt2"), ("export", tmp_path / "lm_mta.onnx")):
        result = runner.invoke(app, [command, str(program), "-o", str(out), "--plan", str(plan_path)])
        assert result.exit_code == 0, result.output
    with torch.no_grad():
        want = model(*samples[hold])
        got = mr.load_program(tmp_path / "lm_mta.pt2").module()(*samples[hold])
        assert output_error("rel_l2", got, want, {}) == pytest.approx(plan.metadata["holdout_error"], rel=1e-4)
    session = onnx_session(tmp_path / "lm_mta.onnx")
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: samples[hold][0].numpy()})[0])
    assert output_error("rel_l2", got, want, {}) == pytest.approx(plan.metadata["holdout_error"], rel=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrate_on_the_gpu(tmp_path):
    """calibrate --device cuda: a program saved on the CPU calibrated on the GPU, costs timed
    there by default; the plan applies to the CPU program and keeps the budget there."""
    from mta_rewrite.calibration.metrics import output_error

    model, samples, program = saved_lm(tmp_path)
    plan_path = tmp_path / "plan.json"
    result = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget", "0.2",
                                 "-o", str(plan_path), "--device", "cuda"])
    assert result.exit_code == 0, result.output
    plan = mr.Plan.load(plan_path)
    assert plan.metadata["costs"].startswith("measured on") and torch.cuda.get_device_name() in plan.metadata["costs"]
    (hold,) = plan.metadata["holdout_indices"]
    result = runner.invoke(app, ["rewrite", str(program), "-o", str(tmp_path / "lm_mta.pt2"), "--plan", str(plan_path)])
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        got = mr.load_program(tmp_path / "lm_mta.pt2").module()(*samples[hold])
        error = output_error("rel_l2", got, model(*samples[hold]), {})
    assert error == pytest.approx(plan.metadata["holdout_error"], rel=1e-2, abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_demo_builtin_runs_on_the_gpu():
    result = runner.invoke(app, ["demo", "--model", "builtin", "--long-n", "2048", "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert "4 of 4 attention sites rewritten" in " ".join(result.output.split())
    assert "KL divergence" in result.output


def saved_transformers_lm(tmp_path):
    """A small transformers causal LM (random weights) saved as the API saves any model: its
    output is a ``CausalLMOutputWithPast``, which torch.export.load can only rebuild once
    transformers has registered it; captured with ``input_ids`` positional and ``use_cache=False``."""
    model = zoo._hf(lambda t: t.LlamaConfig(vocab_size=100, num_hidden_layers=2, num_key_value_heads=2,
                                            max_position_embeddings=512, hidden_size=32, num_attention_heads=4,
                                            intermediate_size=64), "LlamaForCausalLM", "sdpa")()
    ids = torch.randint(0, 100, (1, 96), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "llama.pt2"
    mr.save_program(model, path, (ids,), {"use_cache": False})
    return model, path


OUTPUT_TYPE_MODULE = '''
import dataclasses
import torch

@dataclasses.dataclass
class Out:
    y: torch.Tensor

torch.export.register_dataclass(Out, serialized_type_name="mta_test_output_type.Out")

class Model(torch.nn.Module):
    def forward(self, x):
        return Out(torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ x)
'''


def test_programs_whose_outputs_are_registered_types_load_in_a_fresh_process(tmp_path, monkeypatch):
    """A program returning a type that its module registers with torch's pytree when imported
    (transformers' ModelOutput classes; a user's dataclass) loads in a process that has not
    imported that module: load_program imports the module the saved type name points to. Where
    no importable module registers it, the error is one line that says which type."""
    import subprocess
    import sys

    model, llama = saved_transformers_lm(tmp_path)
    (tmp_path / "types").mkdir()
    (tmp_path / "types" / "mta_test_output_type.py").write_text(OUTPUT_TYPE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "types"))
    import mta_test_output_type

    mr.save_program(mta_test_output_type.Model(), tmp_path / "custom.pt2", (torch.randn(2, 5, 8),))
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.save(model(ids, use_cache=False).logits, tmp_path / "want.pt")
    script = f'''
import sys, torch
import mta_rewrite as mr
assert "transformers" not in sys.modules and "mta_test_output_type" not in sys.modules
ep = mr.load_program({str(llama)!r})
out = ep.module()(torch.load({str(tmp_path / "ids.pt")!r}), use_cache=False)
print(type(out).__name__, torch.equal(out.logits, torch.load({str(tmp_path / "want.pt")!r})))
try:
    mr.load_program({str(tmp_path / "custom.pt2")!r})
except ValueError as exc:
    print("ERROR", exc)
sys.path.insert(0, {str(tmp_path / "types")!r})
print(type(mr.load_program({str(tmp_path / "custom.pt2")!r}).module()(torch.randn(1, 3, 8))).__name__)
'''
    torch.save(ids, tmp_path / "ids.pt")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "CausalLMOutputWithPast True", done.stdout
    assert lines[1].startswith("ERROR ") and "mta_test_output_type.Out" in lines[1], done.stdout
    assert "no importable module registers" in lines[1] and len(lines) == 3, done.stdout
    assert lines[2] == "Out", done.stdout
    assert "Traceback" not in done.stderr and "deserializing" not in done.stderr, done.stderr[-3000:]


CUSTOM_OP_MODULE = '''
import torch


@torch.library.custom_op("mtatest::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x):
    return torch.empty_like(x)


class Model(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x @ x.transpose(-1, -2), dim=-1) @ torch.ops.mtatest.twice(x)
'''


def test_programs_calling_custom_operators_load_in_a_fresh_process(tmp_path, monkeypatch):
    """transformers' mixture-of-experts layers (GPT-OSS, Mixtral …) call a custom operator that
    ``transformers.integrations.moe`` registers when imported: a program ``capture`` saved failed
    to load in the next command ("g.pt2 is not a program saved with torch.export.save"). A program
    ``save_program`` saves names the modules of its custom operators and ``load_program`` imports
    them; one saved otherwise is a one-line error naming the operator; and ``export`` of an
    operator without an ONNX translation says which (not torch.onnx's generic advice). The
    reason torch.export.load logs is read even where a script disabled logging (benchmarks do:
    every load failure read as "not a program saved with torch.export.save")."""
    import subprocess
    import sys

    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "mta_test_custom_op.py").write_text(CUSTOM_OP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "ops"))
    import mta_test_custom_op

    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    ep = mr.save_program(mta_test_custom_op.Model(), tmp_path / "ours.pt2", (x,))
    assert mr.api.custom_op_modules(ep) == ["mta_test_custom_op"]
    torch.export.save(ep, tmp_path / "plain.pt2")
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import logging, sys, torch
logging.disable(logging.WARNING)  # (as scripts do: torch.export.load's reason is logged, and must still be read)
sys.path.insert(0, {str(tmp_path / "ops")!r})
import mta_rewrite as mr
assert "mta_test_custom_op" not in sys.modules
try:
    mr.load_program({str(tmp_path / "plain.pt2")!r})
except ValueError as exc:
    print("ERROR", exc)
x = torch.load({str(tmp_path / "x.pt")!r})
print(torch.equal(mr.load_program({str(tmp_path / "ours.pt2")!r}).module()(x), torch.softmax(x @ x.mT, -1) @ (2 * x)))
print(logging.root.manager.disable == logging.WARNING)  # the script's setting is left as it was
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines() == [
        f"ERROR {tmp_path / 'plain.pt2'} calls torch.ops.mtatest.twice, a custom operator that no module has registered "
        "in this process: import the module that defines it before loading (programs saved by mta-rewrite name it and "
        "have it imported)", "True", "True"], done.stdout
    result = runner.invoke(app, ["export", str(tmp_path / "ours.pt2"), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and not (tmp_path / "m.onnx").exists(), result.output
    line = " ".join(result.output.split())
    assert line.startswith("error: torch.onnx could not export ") and "\x1b" not in result.output, result.output
    assert line.endswith(": it has no ONNX translation for the operator mtatest.twice"), result.output


def test_calibration_samples_bind_to_the_saved_call(tmp_path, monkeypatch):
    """A program captured as ``model(ids, use_cache=False)`` calibrates on samples written as
    keyword dicts ``{"input_ids": ids}``, positional tuples or bare tensors (the flag takes its
    captured value); a sample with an input the program lacks, or without one it takes, of a
    batch size a program captured by torch.export fixed at 1, or one the model fails on (float token ids), is a one-line
    error naming the sample. The plan is written with the permissions of a plain file."""
    import os

    model, program = saved_transformers_lm(tmp_path)
    gen = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, 100, (1, 128), generator=gen) for _ in range(4)]
    forms = {"dicts": [{"input_ids": x} for x in ids], "mixed": [ids[0], (ids[1],), {"input_ids": ids[2]},
                                                                   {"input_ids": ids[3], "use_cache": False}]}
    plans = {}
    for name, samples in forms.items():
        torch.save(samples, tmp_path / f"{name}.pt")
        out = tmp_path / f"{name}.json"
        result = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / f"{name}.pt"), "--budget",
                                     "0.2", "-o", str(out), "--cost-model", "work"])
        assert result.exit_code == 0, result.output
        plans[name] = mr.Plan.load(out)
    assert plans["dicts"].metadata["holdout_error"] == plans["mixed"].metadata["holdout_error"] <= 0.2
    assert plans["dicts"].metadata["relative_attention_cost"] < 1.0  # something approximated: samples ran
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "dicts.json").stat().st_mode & 0o777 == 0o666 & ~umask
    bad = {"extra": [{"input_ids": ids[0], "attention_mask": torch.ones(1, 128)}], "missing": [{"use_cache": False}],
           "too_many": [(ids[0], False, 3)], "batch": [{"input_ids": torch.randint(0, 100, (2, 128))}],
           "floats": [ids[0], ids[1].float()]}
    messages = {"batch": "sample 0 does not fit the captured program, which requires input_ids.size()[0] == 1",
                "floats": "sample 1: the model fails on it with every site exact: RuntimeError: Expected tensor",
                "extra": "sample 0 does not fit the model's call: the captured model takes no input 'attention_mask'",
                "missing": "sample 0 does not fit the model's call: it lacks the input 'input_ids'",
                "too_many": "sample 0 does not fit the model's call: it gives 3 positional arguments, the captured "
                            "model takes 2"}
    # a program captured by the user at batch 1 (mta-rewrite's own capture widens a batch of one to
    # two; torch.export fixes it at 1)
    dims = {"input_ids": {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}, "use_cache": None}
    fixed = tmp_path / "batch_of_one.pt2"
    one = torch.export.export(model, (ids[0],), {"use_cache": False}, dynamic_shapes=dims, strict=False)
    torch.export.save(one, fixed)
    for name, samples in bad.items():
        torch.save(samples, tmp_path / f"{name}.pt")
        saved = fixed if name == "batch" else program
        result = runner.invoke(app, ["calibrate", str(saved), "--data", str(tmp_path / f"{name}.pt"), "--budget",
                                     "0.2", "-o", str(tmp_path / "x.json")])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert messages[name] in " ".join(result.output.split()), result.output
    assert not (tmp_path / "x.json").exists()

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the op")

    # a failure inside the op's exact path is not blamed on the sample: it propagates as it is
    import sys

    monkeypatch.setattr(sys.modules["mta_rewrite.ops.attention"], "simplify_mask", broken)
    result = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "dicts.pt"), "--budget", "0.2",
                                 "-o", str(tmp_path / "x.json")])
    assert isinstance(result.exception, RuntimeError) and "a bug in the op" in str(result.exception)
    assert "sample" not in result.output and not (tmp_path / "x.json").exists()
