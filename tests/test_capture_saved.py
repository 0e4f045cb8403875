"""``mta-rewrite capture``: a model saved with transformers' save_pretrained → a program (and
calibration samples from a text) that the other commands take; one-line errors."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import mta_rewrite as mr
from mta_rewrite.cli import app

transformers = pytest.importorskip("transformers")
runner = CliRunner()
TEXT = " ".join(f"word{i % 37} line{i % 11}" + ("\n" if i % 9 == 0 else "") for i in range(2000))


def saved_llama(folder, with_tokenizer: bool):
    """A 2-layer Llama (random weights, 4 query / 2 key-value heads) saved with save_pretrained,
    with a word-level tokenizer of TEXT's words saved beside it (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    if with_tokenizer:
        words = sorted(set(TEXT.split()))
        vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return model


def test_capture_a_saved_model_with_samples_then_calibrate_and_rewrite(tmp_path):
    model = saved_llama(tmp_path / "llama", with_tokenizer=True)
    (tmp_path / "text.txt").write_text(TEXT)
    program, samples = tmp_path / "llama.pt2", tmp_path / "samples.pt"
    result = runner.invoke(app, ["capture", str(tmp_path / "llama"), "-o", str(program), "--tokens", "32",
                                 "--text", str(tmp_path / "text.txt"), "--samples", "4", "--samples-output", str(samples)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "model.layers.0.self_attn" in out and "model.layers.1.self_attn" in out, out
    assert "captured on 2 window(s) of 32 tokens" in out and "inputs: input_ids, attention_mask" in out, out
    # the samples are the text's windows, tokenised by the saved tokenizer, one sequence each
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "llama"))
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    rows = torch.load(samples, weights_only=True)
    assert len(rows) == 4 and all(set(r) == {"input_ids", "attention_mask"} for r in rows)
    for i, r in enumerate(rows):
        assert torch.equal(r["input_ids"], ids[i * 32:(i + 1) * 32][None]) and r["attention_mask"].all()
    # the program is the model, at another batch and length
    ep = mr.load_program(program)
    x = torch.randint(0, 64, (3, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ep.module()(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
        want = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # what the other commands take
    plan = tmp_path / "plan.json"
    calibrated = runner.invoke(app, ["calibrate", str(program), "--data", str(samples), "--budget", "0.5", "-o",
                                     str(plan)])
    assert calibrated.exit_code == 0, calibrated.output
    rewritten = runner.invoke(app, ["rewrite", str(program), "-o", str(tmp_path / "mta.pt2"), "--chunk-size", "8"])
    assert rewritten.exit_code == 0 and "2 site(s) now call mta.attention" in rewritten.output, rewritten.output


def test_capture_without_a_tokenizer_uses_random_ids(tmp_path):
    saved_llama(tmp_path / "llama", with_tokenizer=False)
    result = runner.invoke(app, ["capture", str(tmp_path / "llama"), "-o", str(tmp_path / "p.pt2"), "--tokens", "16"])
    assert result.exit_code == 0, result.output
    assert "captured on random token ids" in " ".join(result.output.split())
    # longer than the model's positions: a warning (a rotary model still captures)
    with pytest.warns(UserWarning, match="more than the model's max_position_embeddings"):
        longer = runner.invoke(app, ["capture", str(tmp_path / "llama"), "-o", str(tmp_path / "q.pt2"), "--tokens", "300"])
    assert longer.exit_code == 0, longer.output
    assert "2 × 16" in " ".join(result.output.split())
    assert mr.count_mta_nodes(mr.rewrite(mr.load_program(tmp_path / "p.pt2"), config=mr.MTAConfig(4))) == 2


def test_capture_an_encoder_decoder(tmp_path):
    """The decoder gets the example's ids too (as a separate input: its cross-attention stays
    cross-attention) and the program takes a decoder input of another length."""
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                  max_position_embeddings=128)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "bart")
    result = runner.invoke(app, ["capture", str(tmp_path / "bart"), "-o", str(tmp_path / "p.pt2"), "--tokens", "16"])
    assert result.exit_code == 0, result.output
    ep = mr.load_program(tmp_path / "p.pt2")
    sites = mr.find_attention(ep)
    assert [s.rewritable for s in sites] == [True, True, False], [(s.name, s.reason) for s in sites]
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 64, (3, 20), generator=gen), torch.randint(0, 64, (3, 9), generator=gen)
    kwargs = dict(input_ids=x, attention_mask=torch.ones_like(x), decoder_input_ids=y, use_cache=False)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(**kwargs).logits, model(**kwargs).logits, rtol=1e-5, atol=1e-5)


def saved_gpt_oss(folder):
    """A 2-layer GPT-OSS (random weights; eager attention only in transformers, learned sink
    logits, 2 experts, a sliding window on its second layer) saved with save_pretrained."""
    small = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256, num_local_experts=2,
                 num_experts_per_tok=1, sliding_window=16)
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**small)).eval()
    model.save_pretrained(folder)
    return model


def test_capture_picks_eager_attention_where_transformers_has_no_sdpa(tmp_path):
    """``--attn`` defaulted to sdpa, and a saved GPT-OSS (eager attention only in transformers)
    failed with transformers' multi-line refusal, cut at 300 characters. ``auto``, the default,
    loads it with eager attention and says so; an explicit ``--attn sdpa`` is a one-line error
    that names the option to use."""
    model = saved_gpt_oss(tmp_path / "gpt-oss")
    result = runner.invoke(app, ["capture", str(tmp_path / "gpt-oss"), "-o", str(tmp_path / "p.pt2"), "--tokens", "24"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "GptOssForCausalLM (eager attention)" in out, out
    ep = mr.load_program(tmp_path / "p.pt2")
    assert [s.rewritable for s in mr.find_attention(ep) if s.is_attention] == [True, True]
    x = torch.randint(0, 64, (3, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ep.module()(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
        want = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    refused = runner.invoke(app, ["capture", str(tmp_path / "gpt-oss"), "-o", str(tmp_path / "q.pt2"), "--attn", "sdpa"])
    assert refused.exit_code == 2 and not (tmp_path / "q.pt2").exists(), refused.output
    assert " ".join(refused.output.split()) == ("error: GptOssForCausalLM has no SDPA attention in transformers: "
                                                "capture it with --attn eager (or auto, which picks eager for it)")


def test_capture_with_batched_experts_exports_a_mixture_of_experts_model(tmp_path):
    """transformers' default experts of GPT-OSS call its grouped-products operator (float32), which
    torch.onnx cannot translate, or aten's (bfloat16), whose translation refuses offsets: ``export``
    said "Failed to convert the exported program to an ONNX model" with colour codes; it names the
    operator and how to capture instead. ``capture --experts batched_mm`` loads the model with
    transformers' batched products, and that program exports (its attention as mta nodes) and
    runs in onnxruntime as the rewritten program runs."""
    import numpy as np

    from mta_rewrite.onnx import onnx_session

    saved_gpt_oss(tmp_path / "gpt-oss")
    for name, extra in (("grouped", []), ("batched", ["--experts", "batched_mm"]),
                        ("grouped_bf16", ["--dtype", "bfloat16"])):
        result = runner.invoke(app, ["capture", str(tmp_path / "gpt-oss"), "-o", str(tmp_path / f"{name}.pt2"),
                                     "--tokens", "24", *extra])
        assert result.exit_code == 0, result.output
    for name, says in (("grouped", "it has no ONNX translation for the operator transformers.grouped_mm_fallback"),
                       ("grouped_bf16", "its translation of the operator aten._grouped_mm failed: NotImplementedError:")):
        refused = runner.invoke(app, ["export", str(tmp_path / f"{name}.pt2"), "-o", str(tmp_path / "g.onnx"),
                                      "--chunk-size", "8"])
        assert refused.exit_code == 2 and not (tmp_path / "g.onnx").exists(), refused.output
        line = " ".join(refused.output.split())
        assert says in line and "capture the model with --experts batched_mm" in line, line
        assert "\x1b" not in refused.output and "Traceback" not in refused.output, refused.output
    exported = runner.invoke(app, ["export", str(tmp_path / "batched.pt2"), "-o", str(tmp_path / "b.onnx"),
                                   "--chunk-size", "8"])
    assert exported.exit_code == 0 and "2 MTA site(s) as mta nodes" in " ".join(exported.output.split()), exported.output
    x = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(3))
    feeds = {"input_ids": x.numpy(), "attention_mask": np.ones_like(x.numpy())}
    got = onnx_session(tmp_path / "b.onnx").run(None, feeds)[0]
    rewritten = mr.rewrite(mr.load_program(tmp_path / "batched.pt2"), config=mr.MTAConfig(8))
    with torch.no_grad():
        want = rewritten(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)


def test_a_program_whose_length_torch_export_fixed_says_so(tmp_path):
    """Jamba's Mamba layers loop over the tokens in PyTorch, so torch.export fixes the sequence
    length: the program captured at 24 tokens takes no other, and nothing said so until
    calibration failed with a hint (capture from a size that is not 0 or 1) that did not apply.
    ``capture`` warns; calibrate's one-line error says that the model's code depends on the size."""
    torch.manual_seed(0)
    cfg = transformers.JambaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1,
                                   expert_layer_period=4, expert_layer_offset=3, mamba_d_state=4, mamba_expand=2)
    transformers.JambaForCausalLM(cfg).eval().save_pretrained(tmp_path / "jamba")
    program = tmp_path / "jamba.pt2"
    with pytest.warns(UserWarning, match=r"the program takes input_ids of 24 tokens only: torch.export fixed the "
                                         r"length \(the model's code depends on it\)"):
        result = runner.invoke(app, ["capture", str(tmp_path / "jamba"), "-o", str(program), "--tokens", "24"])
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 64, (1, 37), generator=torch.Generator().manual_seed(1))
    torch.save([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], tmp_path / "samples.pt")
    calibrated = runner.invoke(app, ["calibrate", str(program), "--data", str(tmp_path / "samples.pt"), "--budget",
                                     "0.1", "-o", str(tmp_path / "plan.json")])
    line = " ".join(calibrated.output.split())
    assert calibrated.exit_code == 2 and "sample 0 does not fit the captured program, which requires" in line, line
    assert line.endswith("== 24 (a size torch.export fixed when it captured the model: give inputs of that shape; "
                         "the model's code depends on it, so the program takes no other)"), line


def test_capture_a_saved_image_model(tmp_path):
    """``capture`` refused every model without input_ids ("the command line captures text
    models"): a saved ViT (or Swin, DINOv2 …) is captured on random pixel values at its
    configuration's image size, the program equals the model at another batch, and the other
    commands take it; --text and --samples, which are for text, are a one-line error."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_attention_heads=4,
                                 intermediate_size=64, num_hidden_layers=2)
    model = transformers.ViTModel(cfg).eval()
    model.save_pretrained(tmp_path / "vit")
    program = tmp_path / "vit.pt2"
    result = runner.invoke(app, ["capture", str(tmp_path / "vit"), "-o", str(program)])
    assert result.exit_code == 0, result.output
    assert "captured on random pixel values, 2 × 3 × 32 × 32; inputs: pixel_values" in " ".join(result.output.split())
    ep = mr.load_program(program)
    assert [s.rewritable for s in mr.find_attention(ep) if s.is_attention] == [True, True]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(pixel_values=x).last_hidden_state, model(pixel_values=x).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    rewritten = runner.invoke(app, ["rewrite", str(program), "-o", str(tmp_path / "mta.pt2"), "--chunk-size", "8"])
    assert rewritten.exit_code == 0 and "2 site(s) now call mta.attention" in rewritten.output, rewritten.output
    (tmp_path / "text.txt").write_text(TEXT)
    refused = runner.invoke(app, ["capture", str(tmp_path / "vit"), "-o", str(tmp_path / "p.pt2"), "--text",
                                  str(tmp_path / "text.txt")])
    assert refused.exit_code == 2 and not (tmp_path / "p.pt2").exists(), refused.output
    assert "ViTModel is an image model: --text and --samples are for text models" in " ".join(refused.output.split())


def test_capture_a_saved_vision_language_model_captures_its_text_and_says_so(tmp_path):
    """A saved LLaVA (a vision-language model: its language model reads ``use_cache`` from its
    ``text_config``) failed to capture ("its output holds a DynamicCache … call the model with
    use_cache=False", which the command line does not let a user do): capture turns the cache off
    in nested configurations too. The command line gives token ids only, so a warning says the
    program runs the model's text alone; the program equals the model on text at another batch and
    length, and rewrite takes it."""
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                             intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256),
        vision_config=transformers.CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=32, num_attention_heads=2,
                                                    intermediate_size=64, num_hidden_layers=2),
        image_token_id=3, vision_feature_layer=-1)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "llava")
    program = tmp_path / "llava.pt2"
    with pytest.warns(UserWarning, match=r"LlavaForConditionalGeneration also takes images \(pixel_values\), which the "
                                         r"command line does not give it: the program runs its text alone"):
        result = runner.invoke(app, ["capture", str(tmp_path / "llava"), "-o", str(program), "--tokens", "24"])
    assert result.exit_code == 0, result.output
    ep = mr.load_program(program)
    assert [s.rewritable for s in mr.find_attention(ep) if s.is_attention] == [True, True]
    ids = torch.randint(4, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits,
                                   model(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    rewritten = runner.invoke(app, ["rewrite", str(program), "-o", str(tmp_path / "mta.pt2"), "--chunk-size", "8"])
    assert rewritten.exit_code == 0 and "2 site(s) now call mta.attention" in rewritten.output, rewritten.output


@pytest.mark.parametrize("case,argv,message", [
    ("no config", lambda t: ["capture", str(t), "-o", str(t / "p.pt2")], "neither a folder saved with transformers"),
    ("missing", lambda t: ["capture", str(t / "nothing"), "-o", str(t / "p.pt2")], "no such file or folder"),
    ("samples without text", lambda t: ["capture", str(t / "llama"), "-o", str(t / "p.pt2"), "--samples", "2",
                                        "--samples-output", str(t / "s.pt")], "--samples needs --text"),
    ("text without tokenizer", lambda t: ["capture", str(t / "llama"), "-o", str(t / "p.pt2"), "--text",
                                          str(t / "text.txt")], "has no tokenizer saved beside it"),
    ("output is the input", lambda t: ["capture", str(t / "llama"), "-o", str(t / "text.txt"), "--text",
                                       str(t / "text.txt")], "outputs never overwrite inputs"),
    ("bad attention", lambda t: ["capture", str(t / "llama"), "-o", str(t / "p.pt2"), "--attn", "flash"],
     "--attn must be auto, sdpa or eager, not 'flash'"),
    ("samples over the program", lambda t: ["capture", str(t / "llama"), "-o", str(t / "p.pt2"), "--text",
                                            str(t / "text.txt"), "--samples", "2", "--samples-output", str(t / "p.pt2")],
     "p.pt2 is given for two outputs: one would replace the other"),
    # beyond torch's int64: "randint(): argument 'size' failed to unpack … Overflow when unpacking long long"
    # and torch's C++ frames, over several lines
    ("tokens beyond int64", lambda t: ["capture", str(t / "llama"), "-o", str(t / "p.pt2"), "--tokens", str(2 ** 64)],
     "--tokens must be ≥ 2, below 2**63, got 18446744073709551616"),
    ("batch beyond int64", lambda t: ["capture", str(t / "llama"), "-o", str(t / "p.pt2"), "--batch", str(2 ** 63)],
     "--batch must be ≥ 1, below 2**63"),
    ("an empty output", lambda t: ["capture", str(t / "llama"), "-o", ""], "cannot write an empty path"),
    ("bad dtype", lambda t: ["capture", str(t / "llama"), "-o", str(t / "p.pt2"), "--dtype", "float8"],
     "--dtype must be one of float32, bfloat16, float16, not 'float8'"),
    ("config not JSON", lambda t: ["capture", str(t / "bad_config"), "-o", str(t / "p.pt2")],
     "bad_config: transformers cannot read its configuration: "),
    ("no weights", lambda t: ["capture", str(t / "no_weights"), "-o", str(t / "p.pt2")],
     "no_weights: transformers cannot load it as LlamaForCausalLM: "),
    ("a folder named .gguf", lambda t: ["capture", str(t / "model.gguf"), "-o", str(t / "p.pt2")],
     "model.gguf is not a GGUF file"),
    ("text is a folder", lambda t: ["capture", str(t / "llama"), "-o", str(t / "p.pt2"), "--text", str(t / "llama")],
     "llama: Is a directory"),
    ("samples output without samples", lambda t: ["capture", str(t / "llama"), "-o", str(t / "p.pt2"),
                                                  "--samples-output", str(t / "s.pt")], "--samples-output needs --samples N"),
])
def test_capture_errors_are_one_line(tmp_path, case, argv, message):
    saved_llama(tmp_path / "llama", with_tokenizer=False)
    (tmp_path / "text.txt").write_text(TEXT)
    for name in ("bad_config", "no_weights", "model.gguf"):
        (tmp_path / name).mkdir()
    (tmp_path / "bad_config" / "config.json").write_text("{")
    (tmp_path / "no_weights" / "config.json").write_bytes((tmp_path / "llama" / "config.json").read_bytes())
    before = (tmp_path / "text.txt").read_bytes()
    result = runner.invoke(app, argv(tmp_path))
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert message in line and "Traceback" not in result.output, result.output
    assert (tmp_path / "text.txt").read_bytes() == before and not (tmp_path / "p.pt2").exists()


def test_an_example_longer_than_learned_positions_is_one_line_error_at_batch_one(tmp_path):
    """GPT-2's positions are a table: an example longer than it fails in the model. Captured from
    one sequence, the capture ran the model on it to check the program widened to batch 2 and let
    the model's IndexError out as a traceback (exit code 1); now a one-line error names the model
    and its failure, and nothing is written (not the output's folder either: the check before the
    work made it, and a failed run left it empty). At batch 2 the same since 2026-12-07 (capture
    checks every program against the model on its example; before, nothing ran the model there,
    torch.export traces shapes, and a program that fails as the model does was written), after the
    warning about max_position_embeddings, given at both."""
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=32, n_head=2, n_layer=1,
                                                         n_positions=64)).save_pretrained(tmp_path / "gpt2")
    argv = ["capture", str(tmp_path / "gpt2"), "-o", str(tmp_path / "new" / "p.pt2"), "--tokens", "100"]
    result = runner.invoke(app, argv + ["--batch", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.rstrip("\n").splitlines()[-1] == \
        "error: GPT2LMHeadModel fails on the example: IndexError: index out of range in self", result.output
    assert not (tmp_path / "new").exists(), "the output's folder was made by a run that failed"
    with pytest.warns(UserWarning, match=r"--tokens 100 is more than the model's max_position_embeddings \(64\)"):
        result = runner.invoke(app, argv + ["--batch", "2"])
    assert result.exit_code == 2 and result.output.rstrip("\n").splitlines()[-1] == \
        "error: GPT2LMHeadModel fails on the example: IndexError: index out of range in self", result.output
    assert not (tmp_path / "new").exists()


def generated_with_mta(model, folder, tokens: int, new: int, **use_mta):
    """(the saved tokenizer, the ``new`` tokens greedy ``generate`` gives after the first ``tokens``
    of TEXT once ``use_mta(model, **use_mta)``): what the CLI's generate must print."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :tokens]
    with torch.no_grad():
        mr.use_mta(model, **use_mta)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
    return tok, out[0, tokens:]


def test_generate_from_a_saved_model_with_mta_on_the_prompt(tmp_path):
    """``generate`` prints what the model generates after ``use_mta`` (the prompt through the op,
    decoding exact over the cache), the original's time and agreement with --compare; one-line
    errors for a model without a tokenizer and without a configuration."""
    model = saved_llama(tmp_path / "llama", with_tokenizer=True)
    (tmp_path / "text.txt").write_text(TEXT)
    config = mr.MTAConfig(8, 1, 2, 0)
    result = runner.invoke(app, ["generate", str(tmp_path / "llama"), "--prompt", str(tmp_path / "text.txt"),
                                 "--tokens", "40", "--max-new-tokens", "5", "--chunk-size", "8", "--sinks", "2",
                                 "--compare"])
    assert result.exit_code == 0, result.output
    tok, new = generated_with_mta(model, tmp_path / "llama", 40, 5, config=config)
    out = " ".join(result.output.split())
    assert "LlamaForCausalLM (sdpa attention)" in out and "40 prompt tokens, 5 generated with MTA (c8·L1·s2·k0)" in out, out
    assert "; the original model " in out and "tokens as its" in out, out
    assert result.output.rstrip("\n").splitlines()[-1] == tok.decode(new.tolist()), result.output
    saved_llama(tmp_path / "bare", with_tokenizer=False)
    for args, message in [
        (["generate", str(tmp_path / "bare"), "--prompt", str(tmp_path / "text.txt"), "--chunk-size", "8"],
         f"error: {tmp_path / 'bare'} has no tokenizer saved beside it: generate needs one for the prompt and the "
         "output"),
        (["generate", str(tmp_path / "llama"), "--prompt", str(tmp_path / "text.txt")],
         "error: give either --chunk-size (one configuration for all sites) or --plan"),
        (["generate", str(tmp_path / "llama"), "--prompt", str(tmp_path / "text.txt"), "--chunk-size", "8",
          "--tokens", "100000"], "error: the prompt has 4000 tokens, fewer than --tokens 100000"),
    ]:
        refused = runner.invoke(app, args)
        assert refused.exit_code == 2 and " ".join(refused.output.split()) == message, refused.output


def test_generate_decodes_with_mta(tmp_path):
    """``generate --decode``: the tokens of ``use_mta(..., decode=True)``'s generate (each new token
    through MTA over the cache's chunk summaries), and the line says in how many layers (a layer
    whose steps stayed exact, GPT-NeoX's until 2026-12-05, would show there)."""
    model = saved_llama(tmp_path / "llama", with_tokenizer=True)
    (tmp_path / "text.txt").write_text(TEXT)
    result = runner.invoke(app, ["generate", str(tmp_path / "llama"), "--prompt", str(tmp_path / "text.txt"),
                                 "--tokens", "40", "--max-new-tokens", "12", "--chunk-size", "8", "--top-k", "1",
                                 "--decode"])
    assert result.exit_code == 0, result.output
    tok, new = generated_with_mta(model, tmp_path / "llama", 40, 12, config=mr.MTAConfig(8, 1, 0, 1), decode=True)
    assert "12 generated with MTA (c8·L1·s0·k1; MTA decoding in 2 of 2 layers)" in " ".join(result.output.split()), \
        result.output
    assert result.output.rstrip("\n").splitlines()[-1] == tok.decode(new.tolist()), result.output


def test_generate_prefills_in_pieces(tmp_path):
    """``generate --prefill-chunk P``: the prompt in pieces of P tokens, each after the first
    continued over the cache with the op: without top-k, the text of the prompt in one piece, with
    boundary chunks too; a one-line error for P < 1."""
    saved_llama(tmp_path / "llama", with_tokenizer=True)
    (tmp_path / "text.txt").write_text(TEXT)
    common = ["generate", str(tmp_path / "llama"), "--prompt", str(tmp_path / "text.txt"), "--tokens", "96",
              "--max-new-tokens", "5", "--chunk-size", "8", "--local-chunks", "2", "--sinks", "2"]
    whole = runner.invoke(app, common)
    pieces = runner.invoke(app, common + ["--prefill-chunk", "48"])
    assert whole.exit_code == 0 and pieces.exit_code == 0, pieces.output
    assert "; prefilled in pieces of 48 tokens" in " ".join(pieces.output.split()), pieces.output
    assert pieces.output.rstrip("\n").splitlines()[-1] == whole.output.rstrip("\n").splitlines()[-1]
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "llama"))
    separators = ",".join(str(i) for i in tok.convert_tokens_to_ids(["line0", "line5"]))
    whole = runner.invoke(app, common + ["--separators", separators])
    pieces = runner.invoke(app, common + ["--prefill-chunk", "48", "--separators", separators])
    assert whole.exit_code == 0 and pieces.exit_code == 0, pieces.output
    assert pieces.output.rstrip("\n").splitlines()[-1] == whole.output.rstrip("\n").splitlines()[-1]
    refused = runner.invoke(app, common + ["--prefill-chunk", "0"])
    assert refused.exit_code == 2 and " ".join(refused.output.split()) == "error: --prefill-chunk must be ≥ 1, got 0"


def test_generate_refuses_a_plan_for_another_model_before_generating(tmp_path, monkeypatch):
    """A plan naming layers the model lacks is the first thing ``generate --compare`` says, not
    after the original model's generation (minutes at long prompts)."""
    saved_llama(tmp_path / "llama", with_tokenizer=True)
    (tmp_path / "text.txt").write_text(TEXT)
    mr.Plan({"model.layers.7.self_attn": mr.MTAConfig(8)}).save(tmp_path / "plan.json")
    generated = []
    monkeypatch.setattr(transformers.LlamaForCausalLM, "generate", lambda *a, **k: generated.append(1))
    refused = runner.invoke(app, ["generate", str(tmp_path / "llama"), "--prompt", str(tmp_path / "text.txt"),
                                  "--plan", str(tmp_path / "plan.json"), "--compare"])
    assert refused.exit_code == 2 and not generated, refused.output
    assert " ".join(refused.output.split()) == ("error: the plan names 1 module(s) this LlamaForCausalLM lacks "
                                                "(model.layers.7.self_attn): a plan for another model?")


def test_generate_with_boundary_chunks(tmp_path, monkeypatch):
    """``generate --separators`` and a plan that carries boundaries (as ``calibrate --separators``
    writes it) chunk the prompt by its segments: every layer's prompt attention is given the
    segment ids of the prompt's tokens (``use_mta`` with boundaries equals the rewritten graph:
    test_use_mta.py), and the text is use_mta's with those boundaries."""
    from mta_rewrite import interface
    from mta_rewrite.passes.lower import segment_ids_from_separators

    model = saved_llama(tmp_path / "llama", with_tokenizer=True)
    (tmp_path / "text.txt").write_text(TEXT)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "llama"))
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :120]
    boundaries = mr.Boundaries(tuple(tok.convert_tokens_to_ids(["line0", "line5"])))
    config = mr.MTAConfig(16, 1, 0, 1)
    with torch.no_grad():
        mr.use_mta(model, config=config, boundaries=boundaries)
        want = tok.decode(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                                         do_sample=False, pad_token_id=0)[0, 120:].tolist())
    read, segment_ids = [], interface._segment_ids

    def spy(module, query):  # what each prompt's attention is given
        read.append(segment_ids(module, query))
        return read[-1]

    monkeypatch.setattr(interface, "_segment_ids", spy)
    mr.Plan({f"model.layers.{i}.self_attn": config for i in range(2)}, boundaries=boundaries).save(tmp_path / "plan.json")
    common = ["generate", str(tmp_path / "llama"), "--prompt", str(tmp_path / "text.txt"), "--tokens", "120",
              "--max-new-tokens", "6"]
    separators = ",".join(str(i) for i in boundaries.separators)
    for options in (["--chunk-size", "16", "--top-k", "1", "--separators", separators],
                    ["--plan", str(tmp_path / "plan.json")]):
        read.clear()
        result = runner.invoke(app, common + options)
        assert result.exit_code == 0, result.output
        assert f"; {boundaries})" in " ".join(result.output.split()), result.output
        assert result.output.rstrip("\n").splitlines()[-1] == want, result.output
        prompts = [segments for segments in read if segments.shape[1] == 120]  # (the warm-up's prompt: 8 tokens)
        assert len(prompts) == 2 and all(torch.equal(segments, segment_ids_from_separators(ids, boundaries.separators))
                                         for segments in prompts), read


def test_separators_prints_the_ids_of_tokens_ending_so(tmp_path):
    """``separators MODEL --end TEXT``: the ids of the tokens whose text ends with TEXT, comma-
    separated on stdout (for --separators); escapes understood; one-line errors."""
    saved_llama(tmp_path / "llama", with_tokenizer=True)
    saved_llama(tmp_path / "bare", with_tokenizer=False)
    vocab = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "llama")).get_vocab()
    result = CliRunner().invoke(app, ["separators", str(tmp_path / "llama"), "--end", "0", "--end", "e5"])
    assert result.exit_code == 0, result.output
    want = sorted(i for word, i in vocab.items() if word.endswith(("0", "e5")))
    assert len(want) == 7 and result.stdout.strip() == ",".join(map(str, want)), result.output
    assert f"7 of {len(vocab)} tokens end with '0' or 'e5'" in result.stderr
    for args, message in [
        (["separators", str(tmp_path / "llama")], r"error: no token of {}'s tokenizer ends with '\n'"),
        (["separators", str(tmp_path / "llama"), "--end", r"\t"], r"error: no token of {}'s tokenizer ends with '\t'"),
        (["separators", str(tmp_path / "bare")], "error: {} has no tokenizer saved beside it: its token ids cannot be "
                                                 "read"),
        (["separators", str(tmp_path / "nothing")], "error: no such file or folder: {}"),
    ]:
        refused = CliRunner().invoke(app, args)
        assert refused.exit_code == 2 and " ".join(refused.output.split()) == message.format(args[1]), refused.output


def test_a_peft_adapter_is_captured_and_generates_merged_into_its_base(tmp_path):
    """A LoRA adapter saved with PEFT's ``save_pretrained`` (``adapter_config.json``, its base model
    named by a path relative to it): ``capture`` takes its folder as the base model with the adapter
    merged (the program equals PEFT's ``merge_and_unload`` at another batch and length), ``generate``
    prints what the merged model generates with MTA, ``separators`` reads the base's tokenizer.
    Until 2026-12-07 each refused it ("is neither a folder saved with transformers' save_pretrained
    … nor a .gguf file"). One-line errors: a base not saved here, an adapter that adds tokens
    instead of merging (prefix tuning)."""
    import json

    peft = pytest.importorskip("peft")
    base = saved_llama(tmp_path / "llama", with_tokenizer=True)
    (tmp_path / "text.txt").write_text(TEXT)
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    wrapped.save_pretrained(tmp_path / "adapter")
    settings = tmp_path / "adapter" / "adapter_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "base_model_name_or_path": "../llama"}))
    merged = wrapped.merge_and_unload().eval()
    program = tmp_path / "adapter.pt2"
    result = runner.invoke(app, ["capture", str(tmp_path / "adapter"), "-o", str(program), "--tokens", "32"])
    assert result.exit_code == 0, result.output
    assert "with the LORA adapter" in " ".join(result.output.split()), result.output
    x = torch.randint(0, 64, (3, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = mr.load_program(program).module()(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
        want = merged(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits
        plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama")(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # (the adapter is in it)
    generated = runner.invoke(app, ["generate", str(tmp_path / "adapter"), "--prompt", str(tmp_path / "text.txt"),
                                    "--tokens", "40", "--max-new-tokens", "5", "--chunk-size", "8", "--sinks", "2"])
    assert generated.exit_code == 0, generated.output
    tok, new = generated_with_mta(merged, tmp_path / "llama", 40, 5, config=mr.MTAConfig(8, 1, 2, 0))
    assert generated.output.rstrip("\n").splitlines()[-1] == tok.decode(new.tolist()), generated.output
    separators = CliRunner().invoke(app, ["separators", str(tmp_path / "adapter"), "--end", "0"])
    assert separators.exit_code == 0 and separators.stdout.strip(), separators.output
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "adapter_config.json").write_text(
        json.dumps({**json.loads(settings.read_text()), "base_model_name_or_path": "org/not-here"}))
    prefix = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama"),
                                 peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    prefix.save_pretrained(tmp_path / "prefix")
    settings = tmp_path / "prefix" / "adapter_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "base_model_name_or_path": str(tmp_path / "llama")}))
    for folder, message in [
        ("elsewhere", "error: {} is a PEFT adapter whose base model ('org/not-here') is not saved here (nothing is "
                      "downloaded): set base_model_name_or_path in its adapter_config.json to the base model's folder, "
                      "or merge it (merge_and_unload) and save the model with save_pretrained"),
        ("prefix", "error: {} is a PREFIX_TUNING adapter, which does not merge into the model's weights: mta-rewrite "
                   "takes adapters that do (LoRA and its kin, IA3)"),
    ]:
        refused = runner.invoke(app, ["capture", str(tmp_path / folder), "-o", str(tmp_path / "p.pt2")])
        assert refused.exit_code == 2 and " ".join(refused.output.split()) == message.format(tmp_path / folder), \
            refused.output
        assert not (tmp_path / "p.pt2").exists()
