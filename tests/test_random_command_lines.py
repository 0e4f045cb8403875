"""Command lines drawn at random from good and bad values for every command (tests/test_cli.py and
tests/test_capture_saved.py test each mistake on its own): programs that are real, missing, folders,
junk, truncated or another kind of file; plans valid, for other sites, invalid, not JSON, not UTF-8;
calibration samples of every wrong type and shape; numbers out of range (0, −1, 2**63, 2**64), not
numbers, empty; outputs that are the input, a folder, empty, under a file. Each run must end with
exit code 0, or 2 and one line ``error: …`` (typer's own usage errors included) and no traceback;
its inputs are unchanged, and a failed run leaves no output file nor temporary file. A failure names
its seed and command line; ``MTA_RANDOM_COMMANDS`` runs more. The first such search (2026-12-06,
about 1,200 command lines) found a chunk size of 2**64 passed to the op as a traceback, a seed of
2**64 as "Overflow when unpacking long long", ``-o ''`` failing after the work with "Device or
resource busy", a plan not in UTF-8 without its file's name, and usage errors as a framed box.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import traceback
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.cli import app
from tests.test_capture_saved import TEXT, saved_llama

COMMANDS = int(os.environ.get("MTA_RANDOM_COMMANDS", "48"))
PER_TEST = 8
BIG = [str(2 ** 63), str(2 ** 64), "99999999999999999999"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Every input file the command lines draw from, in one folder (name → path)."""
    tmp = tmp_path_factory.mktemp("inputs")
    case = next(c for c in zoo.hand_written_cases() if c.name == "two_layers")
    args, kwargs = case.inputs(24)
    f = {"program": tmp / "model.pt2"}
    mr.save_program(case.build(), f["program"], args, kwargs)
    f["junk"] = tmp / "junk.pt2"
    f["junk"].write_text("not a program")
    f["empty"] = tmp / "empty"
    f["empty"].write_bytes(b"")
    f["folder"] = tmp / "folder"
    f["folder"].mkdir()
    f["truncated"] = tmp / "truncated.pt2"
    f["truncated"].write_bytes(f["program"].read_bytes()[:2000])
    f["other_zip"] = tmp / "other.pt2"
    with zipfile.ZipFile(f["other_zip"], "w") as z:
        z.writestr("a.txt", "x")
    plans = {"unknown_site": {"nope": {"chunk_size": 4}}, "list": [1, 2], "empty_object": {},
             "no_format": {"sites": {"layers.0": {"config": {"chunk_size": 4}}}}}
    for name, value in plans.items():
        f[f"plan_{name}"] = tmp / f"plan_{name}.json"
        f[f"plan_{name}"].write_text(json.dumps(value))
    f["plan"] = mr.Plan({"layers.0": "exact", "layers.1": mr.MTAConfig(4, 2)}).save(tmp / "plan.json")
    f["plan_one_site"] = mr.Plan({"layers.0": mr.MTAConfig(4, 1, 2, 1)}).save(tmp / "plan_one_site.json")
    f["plan_not_json"] = tmp / "plan_not_json.json"
    f["plan_not_json"].write_text("{")
    f["plan_not_utf8"] = tmp / "plan_not_utf8.json"
    f["plan_not_utf8"].write_bytes(b"\xff\xfe\x00")
    x = args[0]
    data = {"samples": [args] * 4, "tensors": [x] * 4, "none": [], "tensor": x, "dict": {"a": x},
            "short_features": [(x[..., :3],)] * 4, "integers": [(x.long(),)] * 4, "keywords": [{"bogus": x}] * 4,
            "too_many": [(x, x, x, x)] * 4, "nones": [None] * 4, "strings": ["abc"] * 4,
            "lengths": [args, tuple(a[:, :10] for a in args)] * 2, "one": [args], "number": 5}
    for name, value in data.items():
        f[f"data_{name}"] = tmp / f"data_{name}.pt"
        torch.save(value, f[f"data_{name}"])
    f["cost_model_bad"] = tmp / "cost.json"
    f["cost_model_bad"].write_text('{"bogus": 1}')
    f["llama"] = tmp / "llama"
    saved_llama(f["llama"], with_tokenizer=True)
    f["bare"] = tmp / "bare"
    saved_llama(f["bare"], with_tokenizer=False)
    f["llama_plan"] = mr.Plan({"model.layers.0.self_attn": mr.MTAConfig(4, 1),
                               "model.layers.1.self_attn": "exact"}).save(tmp / "llama_plan.json")
    f["bad_config"] = tmp / "bad_config"
    f["bad_config"].mkdir()
    (f["bad_config"] / "config.json").write_text("{")
    f["gguf"] = tmp / "model.gguf"
    f["gguf"].write_text("not gguf")
    f["text"] = tmp / "text.txt"
    f["text"].write_text(TEXT * 8)
    f["text_empty"] = tmp / "text_empty.txt"
    f["text_empty"].write_text("")
    f["text_not_utf8"] = tmp / "text_not_utf8.txt"
    f["text_not_utf8"].write_bytes(b"\xff\xfe\x00\x01")
    return f


def _pick(r: random.Random, good: list, bad: list, p_bad: float = 0.15):
    return r.choice(bad) if bad and r.random() < p_bad else r.choice(good)


class CommandLines:
    """Random command lines over ``f`` (the inputs) writing under ``out`` (``self.outputs``: the
    fresh output paths a line names, which a failed run must not create)."""

    def __init__(self, r: random.Random, f: dict, out: Path):
        self.r, self.f, self.out, self.outputs = r, f, out, []

    def path(self, good: list[str], bad: list[str], p_bad: float = 0.15) -> str:
        return str(self.f[_pick(self.r, good, bad, p_bad)])

    def output(self, suffix: str, the_input: str) -> str:
        """A fresh path, or a bad one: the command's input, a folder, empty, under a file."""
        fresh = self.out / f"o{len(self.outputs)}{suffix}"
        chosen = _pick(self.r, [str(fresh)], [the_input, str(self.f["folder"]), "", str(self.f["junk"] / f"o{suffix}")])
        if chosen == str(fresh):
            self.outputs.append(fresh)
        return chosen

    def number(self, good: list[str], bad: list[str] = ("0", "-1", "x", "1.5", "")) -> str:
        return _pick(self.r, good, list(bad) + BIG)

    def maybe(self, p: float, *argv: str) -> list[str]:
        return list(argv) if self.r.random() < p else []

    def configuration(self, sites: str) -> list[str]:
        r, argv = self.r, []
        if r.random() < 0.75:
            argv += ["--chunk-size", self.number(["4", "8", "3", "16"])]
            argv += self.maybe(0.4, "--local-chunks", self.number(["1", "2"]))
            argv += self.maybe(0.4, "--sinks", self.number(["0", "2"], ["-1", "x"]))
            argv += self.maybe(0.4, "--top-k", self.number(["0", "1", "2"], ["-1", "x"]))
        if r.random() < (0.25 if argv else 0.7):
            plans = ["llama_plan"] if sites == "llama" else ["plan", "plan_one_site"]
            argv += ["--plan", self.path(plans, ["plan_unknown_site", "plan_list", "plan_empty_object", "plan_no_format",
                                                  "plan_not_json", "plan_not_utf8", "folder", "program"], 0.3)]
        if r.random() < 0.15:
            argv += ["--separators", _pick(r, ["1,2", "3"], ["a,b", ",", "-1", str(2 ** 63)], 0.4)]
        return argv

    def draw(self) -> list[str]:
        r = self.r
        programs = ["program"]
        not_programs = ["junk", "empty", "folder", "truncated", "other_zip", "plan", "data_samples", "missing"]
        command = r.choice(["find", "rewrite", "rewrite", "export", "calibrate", "calibrate", "capture", "separators",
                            "generate"])
        if command == "find":
            return ["find", self.path(programs, not_programs, 0.5)]
        if command in ("rewrite", "export"):
            program = self.path(programs, not_programs)
            argv = [command, program, "-o", self.output(".pt2" if command == "rewrite" else ".onnx", program)]
            argv += self.configuration("program")
            if command == "rewrite":
                argv += self.maybe(0.2, "--keep-exact")
            else:
                argv += self.maybe(0.2, "--opset", _pick(r, ["18", "20"], ["17", "-1", "99", "x"], 0.5))
            argv += self.maybe(0.05, "--segment-input", r.choice(["input_ids", "x", ""]))
            return argv
        if command == "calibrate":
            program = self.path(programs, not_programs)
            argv = ["calibrate", program, "--data",
                    self.path(["data_samples", "data_tensors", "data_one"],
                              [k for k in self.f if k.startswith("data_")] + ["program", "junk", "missing", "folder"], 0.3),
                    "--budget", self.number(["0.1", "0.5", "1e9", "0"], ["-1", "nan", "x", ""]), "-o",
                    self.output(".json", program)]
            argv += self.maybe(0.3, "--metric", _pick(r, ["rel_l2", "cosine", "kl"], ["bogus"]))
            argv += self.maybe(0.3, "--holdout", _pick(r, ["0", "0.5", "0.25"], ["1", "-1", "nan", "2"], 0.4))
            argv += self.maybe(0.2, "--seed", _pick(r, ["0", "-1", "7"], BIG + [str(-2 ** 63 - 1)], 0.5))
            argv += self.maybe(0.2, "--last-positions", self.number(["1", "4"]))
            argv += self.maybe(0.2, "--cost-model", _pick(r, ["cpu", "work"], ["gpu", str(self.f["cost_model_bad"]),
                                                                              str(self.f["missing"])], 0.5))
            argv += self.maybe(0.1, r.choice(["--measure-costs", "--model-costs"]))
            argv += self.maybe(0.1, "--separators", _pick(r, ["1,2"], ["a", str(2 ** 64)], 0.5))
            argv += self.maybe(0.1, "--device", r.choice(["cpu", "tpu"]))
            return argv
        models = ["llama"]
        not_models = ["bare", "bad_config", "folder", "gguf", "missing", "text"]
        texts = ["text"]
        not_texts = ["text_empty", "text_not_utf8", "missing", "llama"]
        if command == "capture":
            model = self.path(models, not_models)
            argv = ["capture", model, "-o", self.output(".pt2", model),
                    "--tokens", self.number(["16", "32"], ["0", "1", "-1", "x"]), "--batch", self.number(["1", "2"])]
            if r.random() < 0.4:
                text = self.path(texts, not_texts, 0.3)
                argv += ["--text", text]
                if r.random() < 0.6:
                    argv += ["--samples", self.number(["2", "3"], ["-1", "1000"]), "--samples-output",
                             self.output(".pt", text)]
            argv += self.maybe(0.2, "--attn", _pick(r, ["sdpa", "eager", "auto"], ["flash", "x"], 0.4))
            argv += self.maybe(0.2, "--dtype", _pick(r, ["float32", "bfloat16"], ["int8", "x"], 0.4))
            return argv
        if command == "separators":
            argv = ["separators", self.path(models, not_models)]
            for _ in range(r.randrange(3)):
                argv += ["--end", _pick(r, ["\\n", ".", "word1"], ["", "\\t"], 0.3)]
            return argv
        argv = ["generate", self.path(models, not_models), "--prompt", self.path(texts, not_texts),
                "--max-new-tokens", self.number(["2", "3"])]
        argv += self.maybe(0.6, "--tokens", self.number(["16", "24"], ["0", "1", "-1", "100000"]))
        argv += self.configuration("llama")
        argv += self.maybe(0.2, "--compare")
        argv += self.maybe(0.3, "--prefill-chunk", self.number(["4", "8"]))
        argv += self.maybe(0.3, "--decode")
        argv += self.maybe(0.2, "--attn", _pick(r, ["sdpa", "eager", "auto"], ["x"], 0.4))
        return argv


def _digests(paths) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if Path(p).is_file()}


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.parametrize("seed", range(max(1, COMMANDS // PER_TEST)))
def test_random_command_lines_exit_cleanly(inputs, tmp_path, seed):
    runner = CliRunner()
    f = dict(inputs, missing=tmp_path / "missing.pt2")
    watched = _files_under(f["program"].parent)
    before = _digests(watched)
    r = random.Random(seed)
    for i in range(PER_TEST):
        out = tmp_path / f"run{i}"
        out.mkdir()
        lines = CommandLines(r, f, out)
        argv = lines.draw()
        result = runner.invoke(app, argv)
        where = f"seed {seed}, line {i}: mta-rewrite {' '.join(repr(a) if not a or ' ' in a else a for a in argv)}"
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            pytest.fail(f"{where}\n" + "".join(traceback.format_exception(*result.exc_info)))
        text = result.output.strip().splitlines()
        errors = [line for line in text if line.startswith("error:")]
        assert result.exit_code in (0, 2), f"{where}: exit {result.exit_code}\n{result.output}"
        if result.exit_code == 2:
            # one line, the last (warnings may come before it), and nothing written
            assert len(errors) == 1 and text[-1] == errors[0], f"{where}\n{result.output}"
            assert not any(p.exists() for p in lines.outputs), f"{where}: a failed run wrote {lines.outputs}"
        else:
            assert not errors and all(p.is_file() for p in lines.outputs), f"{where}\n{result.output}"
        assert not [p for p in _files_under(out) if ".tmp" in p.name], f"{where}: a temporary file is left"
        assert _digests(watched) == before, f"{where}: an input changed"
