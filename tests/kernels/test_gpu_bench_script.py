"""benchmarks/gpu_bench.py --dry-run: the prepared GPU benchmark runs every step end to end (on the
CPU, in Triton's interpreter, at tiny sizes) and reports each of them. It measures nothing here;
what it checks is that the one call a lent GPU gets will not die on a script error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, benchmarks/run_gpu.sh runs the benchmark itself")


def test_dry_run_reports_every_step(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself before importing triton
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    (result,) = tmp_path.glob("gpu_*.json")
    report = json.loads(result.read_text())
    assert report["complete"]
    assert {(r["n"], r["mode"]) for r in report["rows"]} == {(n, m) for n in (128, 256) for m in ("causal", "full")}
    for row in report["rows"]:  # every chunk size and variant timed, and close to the portable implementation
        assert all(row[f"mta_c{c}_ms"] > 0 for c in (16, 32)), row
        assert all(row[f"mta_c{c}_rel_err"] < 1e-2 for c in (16, 32)), row
    for c, sweep in report["sweep"].items():
        assert {r["kind"] for r in sweep["results"]} == {"prepass", "one_loop", "tma", "fused", "fused_chunk_major"}
        assert all("ms" in r and r["rel_err_vs_prepass"] < 1e-2 for r in sweep["results"]), sweep
    # on the CPU only cuDNN is missing
    assert [k for k in report["extras"] if k.endswith("_error") and "cudnn" not in k] == []
    assert {"contiguous_qkv_ms", "transposed_qkv_ms", "fwd_bwd_ms", "bwd_summary_kernel_ms", "boundary_chunks_ms", "boundary_chunks_slots_ms",
            "boundary_padded_over_n", "boundary_unpadded_portable_ms", "clustered_prepass_K64_ms",
            "clustered_K64_full_ms", "chunks_full_ms", "boundary_bwd_ms", "boundary_bwd_slots_ms",
            "clustered_K64_bwd_ms", "clustered_K64_bwd_recompute_ms", "bwd_learned_ms", "sink_logits_gptoss_ms",
            "sink_logits_gptoss_without_ms", "continued_2048_after_n_rows_from_ms"} <= set(report["extras"])
    (flex,) = report["flex"]
    assert "error" not in flex and flex["rel_err_vs_mta"] < 1e-2 and flex["graphs_compiled_while_timing"] == 0
    assert [m["model"].split()[:2] for m in report["models"]] == [["TinyCausalLM", "d=32,"], ["transformers", "LlamaModel"]]
    for model in report["models"]:  # the built-in causal LM and a transformers Llama (its mask recognised)
        assert "error" not in model and model["mta_ms"] > 0 and model["logits_rel_diff"] < 0.1, model
    assert (tmp_path / result.name.replace(".json", ".md")).read_text().count("|") > 50
    # compiling ahead (benchmarks/precompile.py, tested in test_triton_compile.py) is for the GPU;
    # here each step says what it would have compiled
    assert [(e["step"], e["skipped"]) for e in report["compiled_ahead"]] == [
        (step, "no compiler in the interpreter") for step in ("step 2", "step 3", "step 4", "step 5")]
    assert all(e["calls"] > 0 for e in report["compiled_ahead"])
    assert report["skipped_for_budget"] == []


def test_dry_run_within_a_spent_budget_still_reports(tmp_path):
    """--budget: work that would start with too little time left is skipped, and said so; the run
    still ends with a complete report (here everything after the copy rate)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--dry-run", "--budget", "0",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    (result,) = tmp_path.glob("gpu_*.json")
    report = json.loads(result.read_text())
    assert report["complete"] and report["rows"] == [] and report["sweep"] == {} and report["models"] == []
    assert report["skipped_for_budget"] == ["step 2: n=128", "step 3", "step 3: pre-pass blocks", "step 4",
                                            "step 5", "step 6: n=256", "step 7: TinyCausalLM"]
    assert "Skipped, the --budget spent: step 2: n=128;" in (tmp_path / result.name.replace(".json", ".md")).read_text()
