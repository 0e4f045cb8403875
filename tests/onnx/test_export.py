"""ONNX export: one mta node per site with its function, run by stock onnxruntime (CPU), equal to
the PyTorch rewritten model at sequence lengths other than the export's."""

from __future__ import annotations

import itertools
import os
import warnings

import numpy as np
import onnx
import pytest
import torch

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.onnx import DOMAIN, OP_TYPE, export_onnx, onnx_session
from mta_rewrite.onnx.export import _bool_source
from mta_rewrite.passes.lower import EXACT_CHUNK
from mta_rewrite.onnx.function import LEARNED_OP_TYPE, PREPARED_OP_TYPE, SIMPLIFY_BOOL_OP_TYPE, SIMPLIFY_OP_TYPE

from ..zoo_programs import captured

HAS_TRANSFORMERS = True
try:
    import transformers  # noqa: F401
except ImportError:  # pragma: no cover
    HAS_TRANSFORMERS = False

CASES = {
    "scores_div_masked_fill": mr.MTAConfig(8, 2, 2, 1),
    "bmm_3d_where": mr.MTAConfig(8, 1, 3, 2),
    "four_d_scores_bmm_with_v": mr.MTAConfig(8, 1, 2, 1),  # v and the mask viewed into the scores' [B, H] frame
    "einsum_gqa_repeat_interleave": mr.MTAConfig(5, 2, 0, 2),
    "einsum_heads_after_tokens": mr.MTAConfig(8, 1, 2, 1),  # q, k, v permuted for the op, its output back
    "gqa_expand_causal_buffer": mr.MTAConfig(8, 2, 2, 1),
    "sdpa_causal_gqa": mr.MTAConfig(4),
    "sdpa_fused_qkv_contiguous_view": mr.MTAConfig(8, 2, 2, 1),  # the rewrite restores a layout
    "two_layers": mr.MTAConfig(6, 1, 1, 1),
    "nn.MultiheadAttention": mr.MTAConfig(8, 2, 2, 1),
    "llama (sdpa)": mr.MTAConfig(8, 2, 4, 2),
    "gpt2 (eager)": mr.MTAConfig(4, 2, 2, 1),
    "bert (sdpa)": mr.MTAConfig(8, 1, 0, 1),
    "t5-encoder (eager)": mr.MTAConfig(8, 1, 2, 1),
    "bloom (eager)": mr.MTAConfig(8, 2, 2, 1),
    "falcon (sdpa)": mr.MTAConfig(8, 1, 0, 1),
    "soft_cap_tanh": mr.MTAConfig(8, 2, 2, 1),  # a soft-cap (the op's softcap) before an additive mask
    "gemma2 (eager)": mr.MTAConfig(4, 2, 2, 1),  # soft-caps, sliding-window layers beside global ones
    "openai-gpt (eager)": mr.MTAConfig(8, 1, 2, 1),  # a multiplicative mask: w * b + -1e4 * (1 - b), b a float buffer
}


def feeds(session, args, kwargs):
    values = list(args) + list(kwargs.values())
    return {inp.name: v.numpy() for inp, v in zip(session.get_inputs(), values)}


def first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def assert_runs_like(session, case, reference, real_only: bool = False):
    """onnxruntime gives ``reference``'s first output at two lengths other than the export's
    (``real_only``: on positions the attention mask keeps, when the case has one)."""
    for n in (case.lengths[0] + 7, case.lengths[1] + 13):
        a, kw = case.inputs(n)
        got = session.run(None, feeds(session, a, kw))[0]
        with torch.no_grad():
            want = first(reference(*a, **kw)).numpy()
        real = kw["attention_mask"].bool().numpy() if real_only and "attention_mask" in kw else slice(None)
        np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_onnxruntime_matches_the_rewritten_model(name, tmp_path):
    case = next(c for c in zoo.all_cases() if c.name == name)
    if case.family == "transformers" and not HAS_TRANSFORMERS:
        pytest.skip("transformers not installed")
    config = CASES[name]
    program, args, kwargs = captured(case).program, captured(case).args, captured(case).kwargs
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(program, args, path, kwargs, config=config)
        rewritten = mr.rewrite(program, config=config)
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type in (OP_TYPE, PREPARED_OP_TYPE)]
    assert len(nodes) == case.rewritable
    # the model carries exactly the functions its mta nodes call, directly or through each other
    from mta_rewrite.onnx.export import _mta_calls

    called = set(_mta_calls(proto.graph.node)) | {t for f in proto.functions for t in _mta_calls(f.node)}
    assert {f.name for f in proto.functions} == called
    assert PREPARED_OP_TYPE in called and "RecogniseMask" in called
    alone = [n.input[3] for n in nodes if n.op_type == OP_TYPE]
    assert len(alone) == len(set(alone)), "sites that share a mask recognise it once"
    producers = {out: n for n in proto.graph.node for out in n.output}
    assert all(_bool_source(mask, producers, proto.graph) is None for mask in alone), \
        "a site on a bool mask recognises the bool mask"
    recognitions = [n for n in proto.graph.node if n.op_type in (SIMPLIFY_OP_TYPE, SIMPLIFY_BOOL_OP_TYPE)]
    assert all(n.input[0] not in producers or producers[n.input[0]].op_type != "Where"  # (or a model input)
               for n in recognitions if n.op_type == SIMPLIFY_BOOL_OP_TYPE)
    assert sorted({tuple(n.input[3:5]) for n in nodes if n.op_type == PREPARED_OP_TYPE}) == \
        sorted(tuple(n.output) for n in recognitions)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["chunk_size"] == config.chunk_size and attrs["top_k"] == config.top_k
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert_runs_like(onnx_session(path), case, rewritten)


def test_the_original_exact_model_exports_too(tmp_path):
    case = next(c for c in zoo.hand_written_cases() if c.name == "scores_div_masked_fill")
    model = case.build()
    args, kwargs = case.inputs(24)
    proto = export_onnx(model, args, tmp_path / "exact.onnx", kwargs)
    assert not [n for n in proto.graph.node if n.domain == DOMAIN] and not proto.functions
    session = onnx_session(tmp_path / "exact.onnx")
    a, kw = case.inputs(31)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, feeds(session, a, kw))[0], model(*a, **kw).numpy(), atol=1e-5)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_weights_over_the_threshold_go_beside_the_model(tmp_path, monkeypatch):
    """A model whose weights exceed ``EXTERNAL_DATA_ABOVE`` (1.5 GB) is saved with them in
    ``<name>.data`` beside it (ONNX external data): protobuf serialises no message over 2 GB, and
    a float32 Llama of 582M parameters failed ("EncodeError: Failed to serialize proto") after
    the whole export. The threshold lowered to 0 here runs that path on a small model: onnxruntime
    reads the weights from beside the model and gives the rewritten model's output; a second
    export replaces both files; nothing else is left in the folder; a third, the weights inside,
    removes the replaced model's weights file."""
    from mta_rewrite.onnx import export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 0)
    case = next(c for c in zoo.transformers_cases() if c.name == "llama (sdpa)")
    program, args, kwargs = captured(case).program, captured(case).args, captured(case).kwargs
    config = mr.MTAConfig(8, 2, 4, 2)
    path = tmp_path / "out" / "model.onnx"
    weights = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):  # (the second over the first's files)
            proto = export_onnx(program, args, path, kwargs, config=config)
            assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
            # (tensors under 1 KB, the norms' weights, stay in the model)
            assert (path.parent / "model.onnx.data").stat().st_size > 0.9 * weights
            inline = onnx.load(path, load_external_data=False).graph.initializer
            assert all(t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) < 1024 for t in inline)
        rewritten = mr.rewrite(program, config=config)
    # (the proto returned refers to the weights beside it, as the file does)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(str(path), full_check=True)
    assert_runs_like(onnx_session(path), case, rewritten)
    # exported again where the weights fit inside: the replaced model's .data goes with it; a .data
    # beside a file that does not read it (anyone else's) stays
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_ABOVE", 1536 * 1024 * 1024)
    other = tmp_path / "other.onnx"
    other.write_bytes(b"not a model")
    (tmp_path / "other.onnx.data").write_bytes(b"someone's")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for target in (path, other):
            export_onnx(program, args, target, kwargs, config=config)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]
    assert (tmp_path / "other.onnx.data").read_bytes() == b"someone's"
    assert_runs_like(onnx_session(path), case, rewritten)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_a_model_under_use_mta_exports_as_it_runs(tmp_path):
    """``export_onnx`` of a transformers model under ``use_mta`` (no config: its attention calls
    ``mta.attention`` already; boundary chunks from its token ids, one layer exact by its plan):
    onnxruntime gives the model's logits at another batch and length, left padding included."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    plan = mr.Plan({"model.layers.1.self_attn": mr.MTAConfig(8, 1, 2, 1)}, boundaries=mr.Boundaries((5, 7)))
    mr.use_mta(model, plan=plan)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(model, (ids,), tmp_path / "model.onnx", dict(attention_mask=torch.ones_like(ids),
                                                                         use_cache=False))
    sites = [n.op_type for n in proto.graph.node if n.domain == DOMAIN and n.op_type.startswith(OP_TYPE)]
    assert len(sites) == 1 and "Segmented" in sites[0]  # (one site, boundary chunks: the other layer exact)
    other = torch.randint(0, 128, (3, 75), generator=torch.Generator().manual_seed(2))
    other[1, 30:40] = 5  # (separators: boundary chunks)
    mask = torch.ones_like(other)
    mask[0, :6] = 0
    got = onnx_session(tmp_path / "model.onnx").run(None, {"input_ids": other.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        want = model(input_ids=other, attention_mask=mask, use_cache=False).logits
    kept = mask.bool()  # (a padded position's row is the model's own business)
    np.testing.assert_allclose(got[0][kept.numpy()], want[kept].numpy(), atol=1e-5, rtol=1e-5)
    mr.use_mta(model, plan=mr.Plan(plan.sites))  # (the boundaries mattered: without them, other logits)
    with torch.no_grad():
        assert (model(input_ids=other, attention_mask=mask, use_cache=False).logits - want)[kept].abs().max() > 1e-4


def test_the_api_prints_no_log_lines_of_the_libraries_it_calls(tmp_path, capfd):
    """``rewrite`` and ``export_onnx`` through the API write nothing to stderr where torch.export
    and torch.onnx would warn about their own choices for our calls (before: "dimension
    inputs['mask'].shape[1] 0/1 specialized; Dim.AUTO was specified …" at every capture of a model
    with a size-1 dimension, "torchvision is not installed. Skipping torchvision::nms" and three
    more lines at every export). The loggers are as they were after; one a user turned up stays so."""
    import logging

    from mta_rewrite.capture import LIBRARY_LOGGERS

    logs = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.NOTSET)  # (as a fresh process has them; the suite's other modules quiet some)
    try:
        case = next(c for c in zoo.hand_written_cases() if c.name == "two_layers")
        model, (args, kwargs) = case.build(), case.inputs(24)
        capfd.readouterr()
        mr.rewrite(model, args, kwargs, config=mr.MTAConfig(8))
        export_onnx(model, args, tmp_path / "m.onnx", kwargs, config=mr.MTAConfig(8))
        assert capfd.readouterr().err == ""
        assert [log.level for log in logs] == [logging.NOTSET] * len(logs)
        # a logger a user turned up keeps its level, and its records
        logs[0].setLevel(logging.INFO)
        mr.rewrite(model, args, kwargs, config=mr.MTAConfig(8))
        assert logs[0].level == logging.INFO
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def test_files_written_with_companions_appear_together_or_not_at_all(tmp_path):
    """``atomic_write(..., companions=True)`` (an ONNX model and its weights): every file written
    beside the temporary one is renamed beside the path, with a plain file's permissions or the
    replaced file's own; a failure leaves the files as they were and no temporary folder."""
    from pathlib import Path

    from mta_rewrite.config import atomic_write

    def write(tmp, text="new"):
        Path(tmp).write_text(text)
        Path(tmp + ".data").write_text(text * 2)

    path = tmp_path / "m.onnx"
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write(path, write, companions=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert path.read_text() == "new" and (tmp_path / "m.onnx.data").read_text() == "newnew"
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o666 & ~umask}
    os.chmod(tmp_path / "m.onnx.data", 0o640)

    def failing(tmp):
        write(tmp, "half")
        raise RuntimeError("failed after writing")

    with pytest.raises(RuntimeError, match="failed after writing"):
        atomic_write(path, failing, companions=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert path.read_text() == "new" and (tmp_path / "m.onnx.data").read_text() == "newnew"
    atomic_write(path, lambda tmp: write(tmp, "again"), companions=True)
    assert (tmp_path / "m.onnx.data").read_text() == "againagain"
    assert (tmp_path / "m.onnx.data").stat().st_mode & 0o777 == 0o640  # (the replaced file's own)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_sdpa_sites_with_a_float_mask_export_as_they_are(tmp_path):
    """T5's SDPA sites (a float position bias as the mask), left as they are, failed in torch.onnx
    ("Cannot view a tensor with shape …": its decompositions dropped the ``contiguous()`` after
    SDPA's transposed output), the original program and any plan leaving them exact alike. They
    export, onnxruntime gives the model's outputs at other lengths, and the program given to
    export_onnx is unchanged (its ``contiguous`` calls were copies during the export only)."""
    case = next(c for c in zoo.all_cases() if c.name == "t5-encoder (sdpa)")
    program = captured(case).program
    before = program.graph_module.code
    export_onnx(program, captured(case).args, tmp_path / "exact.onnx", captured(case).kwargs)
    assert program.graph_module.code == before
    assert any(n.target is torch.ops.aten.contiguous.default for n in program.graph.nodes)
    assert_runs_like(onnx_session(tmp_path / "exact.onnx"), case, captured(case).model, real_only=True)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_an_example_of_one_sequence_exports_a_model_for_any_batch(tmp_path):
    """Exported from one sequence (the usual example for a language model), the ONNX model claimed
    a dynamic batch, yet onnxruntime failed at batch 3 ("Attempting to broadcast an axis by a
    dimension other than 1": transformers' mask code traced for a batch of one), the exact model
    and the rewritten one alike. The export captures through ``capture``, which widens a batch of
    one to two: both now run at any batch, as the model and the rewritten model do."""
    model = zoo._hf(lambda t: t.LlamaConfig(vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=64, num_hidden_layers=1, max_position_embeddings=256),
                    "LlamaForCausalLM", "sdpa")()
    gen = torch.Generator().manual_seed(4)
    ids, batch = torch.randint(0, 100, (1, 40), generator=gen), torch.randint(0, 100, (3, 29), generator=gen)
    config = mr.MTAConfig(8, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, (ids,), tmp_path / "exact.onnx")
        export_onnx(model, (ids,), tmp_path / "mta.onnx", config=config)
        rewritten = mr.rewrite(mr.capture(model, (ids,)), config=config)
    with torch.no_grad():
        want = {"exact": model(batch).logits, "mta": rewritten(batch).logits}
    assert not torch.allclose(want["exact"], want["mta"], atol=1e-3)
    for name, reference in want.items():
        session = onnx_session(tmp_path / f"{name}.onnx")
        assert [i.name for i in session.get_inputs()] == ["input_ids"]
        assert [o.name for o in session.get_outputs()] == ["logits"]
        got = session.run(None, {"input_ids": batch.numpy()})[0]
        np.testing.assert_allclose(got, reference.numpy(), rtol=0, atol=1e-4)


class _Returns(torch.nn.Module):
    """Outputs in every structure ONNX names are taken from."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form

    def forward(self, x):
        y = x * 2
        if self.form == "tuple":  # one value twice, and the input itself (torch.onnx renamed the input x_orig)
            return y, y, x
        if self.form == "tensor":
            return y
        # keys that are names torch.onnx gave: the input's ("x") and an intermediate value's ("mul")
        return {"x": y + 1, "mul": [y - 1, {"z": x.sum(-1)}]}


@pytest.mark.parametrize("form, inputs, outputs", [
    ("tuple", ["x"], ["output_0", "output_1", "output_2"]),
    ("tensor", ["x"], ["output"]),
    ("dict", ["x"], ["x_output", "mul.0", "mul.1.z"]),
])
def test_onnx_names_are_the_models_own(form, inputs, outputs, tmp_path):
    """The ONNX model's inputs and outputs carry the names the model gives them: outputs by their
    place in its output structure (torch.onnx named them after the nodes computing them,
    ``linear_14``; a transformers model's ``logits``, below), an input by its parameter name even
    when the model also returns it (torch.onnx fed ``x_orig``); an input keeps its name over an
    output's, an intermediate value gives way."""
    model = _Returns(form)
    export_onnx(model, (torch.randn(2, 5),), tmp_path / "m.onnx")
    session = onnx_session(tmp_path / "m.onnx")
    assert [i.name for i in session.get_inputs()] == inputs
    assert [o.name for o in session.get_outputs()] == outputs
    x = torch.randn(3, 4)
    got = session.run(None, {"x": x.numpy()})
    want = torch.utils._pytree.tree_leaves(model(x))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=1e-6)


def test_a_bfloat16_model_on_the_cpu_provider_is_one_clear_error(tmp_path):
    """onnxruntime's CPU provider lacks bfloat16 kernels of common operators: a bfloat16 model's
    session failed with "NOT_IMPLEMENTED : Could not find an implementation for Mul(14)" alone.
    The error now says why and what to do, and the export warns; the same model in float16 runs
    as the rewritten one."""
    case = next(c for c in zoo.hand_written_cases() if c.name == "scale_split_on_q_k")
    args, kwargs = case.inputs(24)
    config = mr.MTAConfig(chunk_size=8, sinks=2)
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        model = case.build().to(dtype)
        a = tuple(x.to(dtype) if x.is_floating_point() else x for x in args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_onnx(model, a, tmp_path / "m.onnx", kwargs, config=config)
        # said at export already (the command line exported a bfloat16 SmolLM2 in 77 s, then the session failed)
        said = [str(w.message) for w in caught if "onnxruntime's CPU provider has no bfloat16" in str(w.message)]
        assert said == ([f"{tmp_path / 'm.onnx'} computes in bfloat16: onnxruntime's CPU provider has no bfloat16 "
                         "kernels of common operators such as Mul; for the CPU, export the model in float32 (capture "
                         "--dtype float32)"] if dtype is torch.bfloat16 else []), said
        if dtype is torch.bfloat16:
            with pytest.raises(RuntimeError, match=r"cannot run .*Mul.* \(the model computes in bfloat16, .* export "
                                                   r"the model in float32 or float16"):
                onnx_session(tmp_path / "m.onnx")
            continue
        session = onnx_session(tmp_path / "m.onnx")
        with torch.no_grad():
            want = mr.rewrite(model, a, kwargs, config=config)(*a, **kwargs).float().numpy()
        np.testing.assert_allclose(session.run(None, feeds(session, a, kwargs))[0].astype(np.float32), want, atol=2e-3)


def test_the_opset_asked_for_or_a_clear_error(tmp_path):
    """``opset=``: the model is written at that opset (functions included) and runs as the
    rewritten model does; below the functions' opset 18 or beyond onnx's newest, a ValueError
    before any export (torch.onnx otherwise writes its own opset 18 when it cannot convert)."""
    case = next(c for c in zoo.hand_written_cases() if c.name == "scores_div_masked_fill")
    model = case.build()
    args, kwargs = case.inputs(24)
    config = mr.MTAConfig(chunk_size=8, sinks=2)
    proto = export_onnx(model, args, tmp_path / "m.onnx", kwargs, config=config, opset=21)
    assert {(o.domain, o.version) for o in proto.opset_import} >= {("", 21), (DOMAIN, 1)}
    assert proto.functions and all(("", 21) in {(o.domain, o.version) for o in f.opset_import}
                                   for f in proto.functions if any(o.domain == "" for o in f.opset_import))
    assert_runs_like(onnx_session(tmp_path / "m.onnx"), case, mr.rewrite(model, args, kwargs, config=config))
    for bad in (17, onnx.defs.onnx_opset_version() + 1, True, 20.0):
        with pytest.raises(ValueError, match=f"opset must be from 18 .* to {onnx.defs.onnx_opset_version()}"):
            export_onnx(model, args, tmp_path / "bad.onnx", kwargs, config=config, opset=bad)
    assert not (tmp_path / "bad.onnx").exists()


def test_the_path_and_the_inputs_swapped_are_a_clear_error_before_any_work(tmp_path):
    """export_onnx(model, args, path, kwargs) called with the path where the inputs go (rewrite's
    order, ``(model, args, kwargs)``) or no path: a one-line TypeError that gives the order, before
    the model runs. Until 2026-12-07 the path reached the model as its first input ("fails on the
    example: forward() got multiple values for argument 'input_ids'"), and a path that is no path
    failed only after the whole export ("expected str, bytes or os.PathLike object")."""
    case = next(c for c in zoo.hand_written_cases() if c.name == "scores_div_masked_fill")
    model = case.build()
    args, kwargs = case.inputs(24)
    calls = [(str(tmp_path / "m.onnx"), args), (tmp_path / "m.onnx", args)]
    for path, inputs in calls:
        with pytest.raises(TypeError, match=r"^args must be the model's positional inputs \(a tuple, a list or one "
                                            r"tensor\), got \w+ '.*m.onnx' \(export_onnx takes its path after them: "
                                            r"export_onnx\(model, args, path, kwargs\)\)$"):
            export_onnx(model, path, inputs, kwargs, config=mr.MTAConfig(chunk_size=8))
    for path in (None, "", 3):
        with pytest.raises(TypeError, match=r"^path must be the ONNX file to write \(a str or os.PathLike\), got "):
            export_onnx(model, args, path, kwargs, config=mr.MTAConfig(chunk_size=8))
    assert list(tmp_path.iterdir()) == []


def test_outputs_that_are_not_tensors_are_left_out_with_a_warning(tmp_path):
    """A model whose output holds constants beside its tensors (sentence-transformers' features
    dict: the inputs, ``"modality": "text"``, the embeddings) exports its tensors, named as they
    would be, and onnxruntime runs them as the rewritten model at another batch and length; a
    warning names what is left out. Until 2026-12-07 torch.onnx failed on the constant ("'str'
    object has no attribute 'name'", a ConversionError of several screens). Exported from the module
    and from its captured program (the command line's route)."""

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = next(c for c in zoo.hand_written_cases() if c.name == "scale_split_on_q_k").build()

        def forward(self, features: dict):
            x = features["x"]
            return {"x": x, "modality": "text", "heads": 2, "embedding": self.attention(x).mean(1)}

    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(2, 32, 32)
    config = mr.MTAConfig(chunk_size=8, sinks=2)
    rewritten = mr.rewrite(model, ({"x": x},), config=config)
    other = torch.randn(3, 45, 32)
    want = rewritten({"x": other})["embedding"]
    for source in (model, mr.capture(model, ({"x": x},))):
        path = tmp_path / f"{type(source).__name__}.onnx"
        with pytest.warns(UserWarning, match=r"^the model's outputs modality \('text'\), heads \(2\) are constants, "
                                             r"not tensors: an ONNX graph outputs tensors only"):
            export_onnx(source, ({"x": x},), path, config=config if source is model else None)
        session = onnx_session(path)
        assert [i.name for i in session.get_inputs()] == ["features_x"]
        assert [o.name for o in session.get_outputs()] == ["x", "embedding"]
        got = dict(zip(["x", "embedding"], session.run(None, {"features_x": other.numpy()})))
        reference = want if source is model else model({"x": other})["embedding"]
        np.testing.assert_allclose(got["embedding"], reference.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(got["x"], other.numpy())


class _ChecksItsTokens(torch.nn.Module):
    """Attention after an input check as transformers writes it in vision-language models
    (``torch_compilable_check``: "Image features and image tokens do not match"): a tensor that
    must be all true, ``aten._is_all_true`` in the graph."""

    def __init__(self):
        super().__init__()
        self.attention = next(c for c in zoo.hand_written_cases() if c.name == "scale_split_on_q_k").build()

    def forward(self, x, tokens):
        torch._check_tensor_all_with(ValueError, tokens >= 0, lambda: "token ids must not be negative")
        return self.attention(x)


def test_an_input_check_that_a_tensor_is_all_true_exports(tmp_path):
    """torch.onnx has no translation for ``aten._is_all_true``; export_onnx hands it one (the
    minimum of the elements), so Gemma-3, PaliGemma and Idefics3 called with images export:
    until 2026-12-07 each failed at torch.onnx's step 3 ("No ONNX function found for
    <OpOverload(op='aten._is_all_true' …"). onnxruntime runs the model as the rewritten module
    at another batch and length."""
    torch.manual_seed(0)
    model = _ChecksItsTokens().eval()
    x, tokens = torch.randn(2, 32, 32), torch.arange(32).repeat(2, 1)
    config = mr.MTAConfig(chunk_size=8, sinks=2)
    program = mr.capture(model, (x, tokens))
    assert any(node.target is torch.ops.aten._is_all_true.default for node in program.graph.nodes)
    export_onnx(model, (x, tokens), tmp_path / "checked.onnx", config=config)
    other, other_tokens = torch.randn(3, 45, 32), torch.arange(45).repeat(3, 1)
    got = onnx_session(tmp_path / "checked.onnx").run(None, {"x": other.numpy(), "tokens": other_tokens.numpy()})[0]
    want = mr.rewrite(model, (x, tokens), config=config)(other, other_tokens)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_docs_name_every_operator_the_functions_use():
    """docs/onnx.md lists the standard operators of the function bodies (what an onnxruntime-gpu
    user checks against its kernel list): every one the bodies use, If branches included, and
    none they do not."""
    import re
    from pathlib import Path

    from mta_rewrite.onnx.function import function_protos

    used = set()

    def walk(nodes):
        for node in nodes:
            if node.domain in ("", "ai.onnx"):
                used.add(node.op_type)
            for attribute in node.attribute:
                walk(attribute.g.node)

    for fn in function_protos():
        walk(fn.node)
    text = (Path(__file__).parents[2] / "docs" / "onnx.md").read_text()
    sentence = re.search(r"The body uses only standard opset-18 operators:(.*?)\(`tests/onnx`", text, re.S).group(1)
    sentence = re.sub(r"(\w+)\{([^}]*)\}", lambda m: ", ".join(m.group(1) + x for x in m.group(2).split(",")), sentence)
    listed = {name.strip() for name in sentence.replace("\n", " ").split(",") if name.strip()}
    assert used == listed, f"used, not listed: {sorted(used - listed)}; listed, not used: {sorted(listed - used)}"


@pytest.mark.parametrize("name", ["two_layers", "einsum_gqa_repeat_interleave", "bmm_3d_where", "gpt2 (eager)",
                                  "llama (sdpa)"])
def test_exact_sites_of_a_rewritten_program_export_as_plain_attention(name, tmp_path):
    """A program whose sites all run the op's exact path (``rewrite(plan=Plan({}))``: hand-written
    forms, GQA, 3-D bmm, transformers' masks) exports without mta nodes, and onnxruntime gives the
    original model's outputs at other lengths."""
    case = next(c for c in zoo.all_cases() if c.name == name)
    if case.family == "transformers" and not HAS_TRANSFORMERS:
        pytest.skip("transformers not installed")
    model, args, kwargs = captured(case).model, captured(case).args, captured(case).kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = mr.rewrite(captured(case).program, plan=mr.Plan({}))
        assert mr.api.count_exact_nodes(program) == case.rewritable
        proto = export_onnx(program, args, tmp_path / "exact.onnx", kwargs)
    assert not [n for n in proto.graph.node if n.domain == DOMAIN] and not proto.functions
    assert_runs_like(onnx_session(tmp_path / "exact.onnx"), case, model, real_only=True)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_site_zeroes_a_query_with_nothing_to_attend_to(causal, tmp_path):
    """One chunk, a float mask whose forbidden entries are float32's minimum (transformers' form)
    and a query row with every key forbidden: onnxruntime outputs zeros there, as the op does."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 9, 9)
    mask[..., 4, :] = torch.finfo(torch.float32).min
    mask[..., :, 7] = torch.finfo(torch.float32).min
    module = _OneSite("float", chunk_size=EXACT_CHUNK, causal=causal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(module, (q, k, v, mask), tmp_path / "site.onnx", dynamic=False)
    session = onnx_session(tmp_path / "site.onnx")
    got = session.run(None, {x.name: t.numpy() for x, t in zip(session.get_inputs(), (q, k, v, mask))})[0]
    want = module(q, k, v, mask).numpy()
    assert not want[..., 4, :].any()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


class _OneSite(torch.nn.Module):
    def __init__(self, mask_kind, summary_weight=None, **config):
        super().__init__()
        self.mask_kind, self.config = mask_kind, config
        self.register_buffer("summary_weight", summary_weight)

    def forward(self, q, k, v, mask):
        return torch.ops.mta.attention(q, k, v, None if self.mask_kind == "none" else mask, self.summary_weight,
                                       **self.config)


MASKS = ["none", "key_padding_bool", "causal_padding_4d_min", "alibi_bias", "random_bool_per_head",
         "causal_padding_4d_bool", "key_padding_4d_materialised",  # (these two: recognised as key padding)
         "sink_columns_vary"]  # (blocks uniform but for their sinks' columns)


def test_the_suites_reused_torchlib_registry_exports_what_a_fresh_one_exports(tmp_path, monkeypatch):
    """tests/conftest.py builds torch.onnx's torchlib registry once per process and gives each
    export a copy: two exports with it (our op registered in each copy) and one with a fresh
    registry are the same model, byte for byte."""
    from torch.onnx._internal.exporter import _registration

    from tests.conftest import reuse_torchlib_registry

    assert reuse_torchlib_registry()
    reused = _registration.ONNXRegistry.__dict__["from_torchlib"]
    assert hasattr(reused.__func__, "__wrapped__")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 11, 8, generator=g) for h in (4, 2, 2))
    module = _OneSite("none", chunk_size=4, causal=True, local_chunks=1, sinks=2, top_k=1)

    def exported(name: str) -> onnx.ModelProto:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return export_onnx(module, (q, k, v, torch.zeros(1)), tmp_path / name, dynamic=False)

    first, second = exported("a.onnx"), exported("b.onnx")
    # our op went into the exports' copies, never into the registry they are copied from
    opset = next(o.version for o in first.opset_import if o.domain == "")
    built = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
    assert built.functions and torch.ops.mta.attention.default.name() not in built.functions
    first, second = first.SerializeToString(), second.SerializeToString()
    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(reused.__func__.__wrapped__))
    fresh = exported("c.onnx").SerializeToString()
    assert first == second == fresh
    assert b"MultiTokenAttention" in fresh


class _Sites(torch.nn.Module):
    """Several one-site modules (one per configuration) exported once for all of them: an export
    costs ~0.8 s here whatever its size. Each site reads its own mask input, as the site of a
    one-site export does: no mask recognition is shared between them (share_mask_preparation
    groups sites by the mask they read). Inputs: q, k, v, a mask per site, then what every site
    reads after its mask (segment ids)."""

    def __init__(self, sites):
        super().__init__()
        self.sites = torch.nn.ModuleList(sites)

    def forward(self, q, k, v, *rest):
        masks, after = rest[:len(self.sites)], rest[len(self.sites):]
        return tuple(site(q, k, v, mask, *after) for site, mask in zip(self.sites, masks))

    def inputs(self, q, k, v, mask, *after):
        return (q, k, v, *(mask.clone() for _ in self.sites), *after)


def _run_sites(module, inputs, path, configs):
    """``module`` (a _Sites) exported at ``path`` and run by onnxruntime on ``inputs`` (other
    inputs than the export's where given), each site's output against the op's; the export."""
    session = onnx_session(path)
    got = session.run(None, {x.name: t.numpy() for x, t in zip(session.get_inputs(), inputs)})
    with torch.no_grad():
        want = module(*inputs)
    assert len(got) == len(want) == len(configs)
    for config, out, ref in zip(configs, got, want):
        np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=2e-5, err_msg=str(config))


def _computed_by_mta(proto) -> list[bool]:
    """For each graph output: whether an mta-domain node computes it, directly or upstream."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    seen: set[int] = set()  # nodes found without one upstream (a search stops at the first it finds)

    def upstream(name):
        node = producers.get(name)
        if node is None or id(node) in seen:
            return False
        seen.add(id(node))
        return node.domain == DOMAIN or any(upstream(x) for x in node.input)

    out = []
    for output in proto.graph.output:
        seen.clear()
        out.append(upstream(output.name))
    return out


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_function_equals_the_op_on_every_branch(mask_kind, learned, tmp_path):
    """The function alone, across configurations and mask kinds, against the PyTorch op (with
    mean and with learned summaries); one site per configuration in one export. A site with one
    chunk (exact attention) is plain ONNX ops, no mta node upstream of its output."""
    from tests.ops.test_attention import make_mask

    B, Hq, Hkv, n, d = 2, 4, 2, 13, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, d, generator=g) for h in (Hq, Hkv, Hkv))
    weight = torch.randn(Hkv, d, generator=g) if learned else None
    mask = make_mask(mask_kind, B, Hq, n)
    mask = torch.zeros(1) if mask is None else (mask if mask.dtype == torch.bool else mask.float())
    shapes = [(4, 1, 0, 0), (3, 2, 2, 1), (5, 1, 7, 2), (100, 1, 0, 0), (1, 1, 0, 0), (EXACT_CHUNK, 2, 3, 1)]
    configs = [dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
               for causal, (c, L, s, top_k) in itertools.product([False, True], shapes[:3] if learned else shapes)]
    module = _Sites([_OneSite(mask_kind, weight, **config) for config in configs])
    inputs = module.inputs(q, k, v, mask)
    path = tmp_path / "sites.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(module, inputs, path, dynamic=False)
    assert _computed_by_mta(proto) == [config["chunk_size"] != EXACT_CHUNK for config in configs]
    if learned:
        assert sum(n.op_type in (LEARNED_OP_TYPE, "SummaryLogits") for n in proto.graph.node) == len(configs), \
            [n.op_type for n in proto.graph.node]
    _run_sites(module, inputs, path, configs)


@pytest.mark.parametrize("name", ["llama (sdpa)", "two_layers"])  # sites sharing a bool mask; sites without a mask
def test_learned_summaries_export_and_match_the_rewritten_model(name, tmp_path):
    """A plan with learned summaries at one site (and means at the others) exports, and onnxruntime
    gives what the rewritten model gives at other lengths."""
    case = next(c for c in zoo.all_cases() if c.name == name)
    if case.family == "transformers" and not HAS_TRANSFORMERS:
        pytest.skip("transformers not installed")
    program, args, kwargs = captured(case).program, captured(case).args, captured(case).kwargs
    sites = [s for s in mr.find_attention(program) if s.rewritable]
    config = mr.MTAConfig(6, 1, 2, 1)
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(sites[0].kv_heads, sites[0].head_dim, generator=g) * 2
    plan = mr.Plan({sites[0].name: mr.Learned.from_tensor(config, weight), sites[1].name: config})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(program, args, tmp_path / "m.onnx", kwargs, plan=plan)
        rewritten = mr.rewrite(program, plan=plan)
        means = mr.rewrite(program, config=config)
    kinds = [n.op_type for n in proto.graph.node if n.domain == DOMAIN]
    assert kinds.count("SummaryLogits") + kinds.count(LEARNED_OP_TYPE) == 1, kinds
    session = onnx_session(tmp_path / "m.onnx")
    a, kw = case.inputs(case.lengths[1] + 5)
    got = session.run(None, feeds(session, a, kw))[0]
    with torch.no_grad():
        want, mean = first(rewritten(*a, **kw)).numpy(), first(means(*a, **kw)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(want - mean).max() > 1e-3  # the learned site's summaries are not the means


def test_cuda_session_is_a_clear_error_without_the_cuda_provider(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    case = next(c for c in zoo.hand_written_cases() if c.name == "scale_split_on_q_k")
    args, kwargs = case.inputs(16)
    export_onnx(case.build(), args, tmp_path / "m.onnx", kwargs, config=mr.MTAConfig(4))
    with pytest.raises(RuntimeError, match="CUDA provider"):
        onnx_session(tmp_path / "m.onnx", device="cuda")
    with pytest.raises(ValueError, match="device"):
        onnx_session(tmp_path / "m.onnx", device="tpu")


def test_session_options_reach_the_session(tmp_path):
    """``onnx_session(options=)``: onnxruntime's SessionOptions are the session's (a benchmark turns
    the threads' spinning off, a user sets threads), and the model still runs as exported."""
    import onnxruntime as ort

    case = next(c for c in zoo.hand_written_cases() if c.name == "scale_split_on_q_k")
    args, kwargs = case.inputs(16)
    model = case.build()
    export_onnx(model, args, tmp_path / "m.onnx", kwargs, config=mr.MTAConfig(4))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnx_session(tmp_path / "m.onnx", options=options)
    assert session.get_session_options().intra_op_num_threads == 1
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert_runs_like(session, case, mr.rewrite(model, args, kwargs, config=mr.MTAConfig(4)))


def test_per_head_group_plan_exports_one_node_per_group(tmp_path):
    case = next(c for c in zoo.hand_written_cases() if c.name == "einsum_gqa_repeat_interleave")
    model = case.build()
    (x,), _ = case.inputs(40)
    plan = mr.Plan({"root": mr.HeadGroups(((mr.MTAConfig(6, sinks=2, top_k=1), (0, 3)), (None, (1, 2))))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(model, (x,), tmp_path / "hg.onnx", plan=plan)
    assert sum(n.domain == DOMAIN for n in proto.graph.node) == 1  # the exact group is plain attention
    # the groups' outputs put back in head order by a constant permutation (an argsort of the
    # constant order ran as a TopK on every call, which onnxscript's optimiser warned it left unfolded)
    assert not [n.op_type for n in proto.graph.node if n.op_type in ("TopK", "ArgMax", "ArgMin")]
    session = onnx_session(tmp_path / "hg.onnx")
    x2 = torch.randn(2, 53, 32)
    with torch.no_grad():
        want = mr.rewrite(model, (x,), plan=plan)(x2).numpy()
    np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x2.numpy()})[0], want, atol=1e-4)


def _recognition_session(op_type: str, elem_type: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from mta_rewrite.onnx.function import function_protos

    node = helper.make_node(op_type, ["mask"], ["out", "triangle"], domain=DOMAIN)
    graph = helper.make_graph([node], "simplify", [helper.make_tensor_value_info("mask", elem_type, list("BHQK"))],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("triangle", TensorProto.BOOL, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                              functions=function_protos())
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _recognition_masks(B, Hq, n):
    """The op tests' mask kinds at rank 4, and the forms the recognition must tell apart."""
    from tests.ops.test_attention import MASKS as OP_MASKS, make_mask

    g = torch.Generator().manual_seed(1)
    tri = torch.ones(n, n, dtype=torch.bool).tril()
    keep = torch.rand(B, 1, 1, n, generator=g) > 0.3
    first_only = torch.zeros(B, 1, 1, n, dtype=torch.bool)
    first_only[..., 0] = True
    masks = {kind: make_mask(kind, B, Hq, n) for kind in OP_MASKS}
    masks.update({
        "triangle": tri.view(1, 1, n, n),
        "triangle_and_padding": tri & keep,
        "padding_materialised": keep.expand(B, Hq, n, n),
        "first_key_only (both forms)": first_only.expand(B, 1, n, n),
        "triangle_then_one_head_differs": (tri & keep).expand(B, Hq, n, n).clone().index_put_(
            (torch.tensor(0), torch.tensor(Hq - 1), torch.tensor(n - 2), torch.tensor(n - 1)), torch.tensor(True)),
        "one_query_row": keep,
        "not_square": torch.ones(1, 1, n, n + 3, dtype=torch.bool).tril(),
        "nothing_allowed": torch.zeros(1, 1, n, n, dtype=torch.bool),
    })
    for kind, mask in masks.items():
        if mask is None:
            continue
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        yield kind, mask


def test_mask_recognition_in_onnx_equals_the_ops():
    """mta::SimplifyMask (the function's run-time mask recognition) and mta::SimplifyBoolMask (the
    same on the bool mask a model built) against ops.masks.simplify_mask: same verdict, same key
    padding, same causality, on the op tests' mask kinds and the forms the check tells apart."""
    from onnx import TensorProto

    from mta_rewrite.ops.masks import simplify_mask

    on_float = _recognition_session("SimplifyMask", TensorProto.FLOAT)
    on_bool = _recognition_session("SimplifyBoolMask", TensorProto.BOOL)
    B, Hq, n = 2, 4, 13
    recognised = checked_bool = 0
    for kind, mask in _recognition_masks(B, Hq, n):
        as_float = torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask.float()
        runs = [on_float.run(None, {"mask": as_float.numpy()})]
        if mask.dtype == torch.bool:
            runs.append(on_bool.run(None, {"mask": mask.numpy()}))
            checked_bool += 1
        want, causal = simplify_mask(mask, B, Hq, mask.shape[-2], False) if mask.shape[-2] == mask.shape[-1] \
            else (mask, False)
        for got, triangle in runs:
            if want is mask:  # not recognised: the mask comes back as it is (as 0 / −inf)
                np.testing.assert_array_equal(got, as_float.numpy(), err_msg=kind)
                assert not triangle, kind
                continue
            keep = torch.ones(mask.shape[0], 1, 1, n, dtype=torch.bool) if want is None else want
            assert got.shape == tuple(keep.shape), kind
            np.testing.assert_array_equal(got == 0, keep.numpy(), err_msg=kind)
            assert bool(triangle) == causal, kind
        recognised += want is not mask
    assert recognised >= 7 and checked_bool >= 10  # materialised key padding, the triangle with and without padding


def test_sites_sharing_a_mask_recognise_it_once(tmp_path, monkeypatch):
    """A transformers decoder hands every layer the same [1, 1, n, n] bool mask: the export
    recognises it once, on the bool mask (one SimplifyBoolMask node, every site on its outputs,
    no float n×n mask left in the graph), and onnxruntime gives what the export without sharing
    gives (each site turning the mask to 0 / −inf and recognising it itself), bit for bit."""
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers not installed")
    import onnxruntime as ort

    from mta_rewrite.onnx import export as export_module

    case = next(c for c in zoo.transformers_cases() if c.name == "llama (sdpa)")
    assert case.rewritable >= 2
    program, args, kwargs = captured(case).program, captured(case).args, captured(case).kwargs
    config = mr.MTAConfig(8, 1, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shared = export_onnx(program, args, tmp_path / "shared.onnx", kwargs, config=config)
        with monkeypatch.context() as patch:
            patch.setattr(export_module, "share_mask_preparation", lambda graph: 0)
            unshared = export_onnx(program, args, tmp_path / "unshared.onnx", kwargs, config=config)
    sites = [n for n in shared.graph.node if n.domain == DOMAIN and n.op_type == PREPARED_OP_TYPE]
    recognitions = [n for n in shared.graph.node if n.domain == DOMAIN and n.op_type not in (OP_TYPE, PREPARED_OP_TYPE)]
    assert [n.op_type for n in recognitions] == [SIMPLIFY_BOOL_OP_TYPE] and len(sites) == case.rewritable
    assert all(list(n.input[3:5]) == list(recognitions[0].output) for n in sites)
    unshared_sites = [n for n in unshared.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in unshared_sites] == [OP_TYPE] * case.rewritable
    # without sharing, the sites read Where(mask, 0, −inf); with it, that Where is gone and the
    # recognition reads its condition
    producers = {out: n for n in unshared.graph.node for out in n.output}
    where = producers[unshared_sites[0].input[3]]
    assert where.op_type == "Where" and recognitions[0].input[0] == where.input[0]
    assert not [n for n in shared.graph.node if list(n.output) == list(where.output)]
    a, kw = case.inputs(case.lengths[1])
    outs = []
    for path in (tmp_path / "shared.onnx", tmp_path / "unshared.onnx"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs.append(session.run(None, feeds(session, a, kw))[0])
    np.testing.assert_array_equal(outs[0], outs[1])


class _SegmentedSite(torch.nn.Module):
    def __init__(self, mask_kind, summary_weight=None, **config):
        super().__init__()
        self.mask_kind, self.config = mask_kind, config
        self.register_buffer("summary_weight", summary_weight)

    def forward(self, q, k, v, mask, segment_ids):
        return torch.ops.mta.attention(q, k, v, None if self.mask_kind == "none" else mask, self.summary_weight,
                                       segment_ids, **self.config)


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "causal_padding_4d_min", "alibi_bias",
                                       "random_bool_per_head"])
def test_boundary_chunks_function_equals_the_op(mask_kind, tmp_path):
    """``MultiTokenAttentionSegmented`` (and …SegmentedLearned) alone against the PyTorch op: the
    chunk slots computed in ONNX ops, key padding, masks varying per query, sinks, top-k; on other
    inputs and segment ids than the export's."""
    from mta_rewrite.onnx.function import SEGMENTED_LEARNED_OP_TYPE, SEGMENTED_OP_TYPE, SEGMENTED_PREPARED_OP_TYPE
    from tests.ops.test_attention import make_mask
    from tests.ops.test_segments import segments

    B, Hq, Hkv, d = 2, 4, 2, 8
    g = torch.Generator().manual_seed(0)

    def inputs(n, seed):
        q, k, v = (torch.randn(B, h, n, d, generator=g) for h in (Hq, Hkv, Hkv))
        mask = make_mask(mask_kind, B, Hq, n)
        mask = torch.zeros(1) if mask is None else (mask if mask.dtype == torch.bool else mask.float())
        return q, k, v, mask, segments(B, n, rate=0.25, seed=seed)

    weight = torch.randn(Hkv, d, generator=g)
    sites = [(False, (4, 1, 0, 0), False), (True, (3, 2, 2, 1), False), (True, (5, 1, 7, 2), True),
             (False, (2, 2, 1, 1), True)]
    configs = [dict(chunk_size=c, causal=causal, local_chunks=L, sinks=s, top_k=top_k)
               for causal, (c, L, s, top_k), _ in sites]
    module = _Sites([_SegmentedSite(mask_kind, weight if learned else None, **config)
                     for config, (*_, learned) in zip(configs, sites)])
    path = tmp_path / "sites.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(module, module.inputs(*inputs(13, 1)), path, dynamic=False)
    kinds = [n.op_type for n in proto.graph.node if n.domain == DOMAIN]
    # a site each (a bool mask is recognised by its own node: the site is then …SegmentedPrepared)
    assert sum(kind in (SEGMENTED_OP_TYPE, SEGMENTED_LEARNED_OP_TYPE, SEGMENTED_PREPARED_OP_TYPE) for kind in kinds) \
        == len(sites), kinds
    assert sum(kind in (SEGMENTED_LEARNED_OP_TYPE, "SummaryLogits") for kind in kinds) == 2, kinds  # the learned ones
    # other segment ids (the lengths vary in the model tests below)
    _run_sites(module, module.inputs(*inputs(13, 2)), path, configs)


@pytest.mark.parametrize("name", ["llama (sdpa)", "gpt2 (eager)"])
def test_boundary_chunks_export_and_match_the_rewritten_model(name, tmp_path):
    """Boundaries in a transformers model (segment ids computed in the exported graph from the
    token ids, sites sharing one mask recognition, one site learned): onnxruntime gives what the
    rewritten model gives, at other lengths."""
    from mta_rewrite.onnx.function import SEGMENTED_PREPARED_OP_TYPE

    case = next(c for c in zoo.all_cases() if c.name == name)
    program, args, kwargs = captured(case).program, captured(case).args, captured(case).kwargs
    sites = [s for s in mr.find_attention(program) if s.rewritable]
    config = mr.MTAConfig(4, 2, 2, 1)
    weight = torch.randn(sites[0].kv_heads, sites[0].head_dim, generator=torch.Generator().manual_seed(1))
    plan = mr.Plan({sites[0].name: mr.Learned.from_tensor(config, weight), sites[1].name: config},
                   boundaries=mr.Boundaries((3, 5, 7, 11, 13, 17)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(program, args, tmp_path / "m.onnx", kwargs, plan=plan)
        rewritten = mr.rewrite(program, plan=plan)
    kinds = [n.op_type for n in proto.graph.node if n.domain == DOMAIN]
    assert kinds.count(SEGMENTED_PREPARED_OP_TYPE) == 2 and kinds.count("SummaryLogits") == 1, kinds
    assert_runs_like(onnx_session(tmp_path / "m.onnx"), case, rewritten)
    # boundaries alone (no configuration or plan to rewrite with) are a one-line error, nothing written
    with pytest.raises(ValueError, match="^boundaries apply when rewriting: give config= or plan= too$"):
        export_onnx(program, args, tmp_path / "b.onnx", kwargs, boundaries=mr.Boundaries((3, 5)))
    assert not (tmp_path / "b.onnx").exists()


class _ConstantMaskSite(torch.nn.Module):
    """A site whose mask is a buffer: at static shapes every recognition test on it is a constant."""

    def __init__(self, mask, **config):
        super().__init__()
        self.config = config
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        return torch.ops.mta.attention(q, k, v, self.mask, **self.config)


@pytest.mark.parametrize("kind", ["bias_per_head", "padding_4d_min", "causal_padding_4d_min", "causal_padding_4d_bool"])
def test_constant_masks_fold(kind, tmp_path):
    """A mask the exported graph computes from constants (buffers, static shapes: Swin's relative
    position bias and shifted-window masks) makes every ``If`` of the mask recognition foldable;
    onnxruntime (1.32) inlines such an ``If``'s branch at session creation and crashed (a
    segmentation fault, from the survey's Swin on) when one sat inside another's branch. The
    recognitions' ``If`` nodes are now sequential: the session is created with every
    optimisation and gives the op's output, for each verdict (a bias: not recognised; padding; the
    triangle ∧ padding, float and bool)."""
    from tests.ops.test_attention import make_mask

    B, Hq, Hkv, n, d = 2, 4, 2, 13, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, d, generator=g) for h in (Hq, Hkv, Hkv))
    mask = {"bias_per_head": torch.randn(1, Hq, n, n, generator=g),
            "padding_4d_min": make_mask("key_padding_4d_materialised", B, Hq, n),
            "causal_padding_4d_min": make_mask("causal_padding_4d_min", B, Hq, n),
            "causal_padding_4d_bool": make_mask("causal_padding_4d_bool", B, Hq, n)}[kind]
    mask = mask if mask.dtype == torch.bool else mask.float()
    if kind == "padding_4d_min":
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    module = _ConstantMaskSite(mask, chunk_size=4, local_chunks=1, sinks=2, top_k=1)
    path = tmp_path / "constant.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(module, (q, k, v), path, dynamic=False)
    session = onnx_session(path)  # (every graph optimisation: onnxruntime's default)
    got = session.run(None, {x.name: t.numpy() for x, t in zip(session.get_inputs(), (q, k, v))})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(q, k, v).numpy(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "causal_padding_4d_min", "alibi_bias"])
def test_soft_capped_function_equals_the_op(mask_kind, tmp_path):
    """Soft-capped sites (the op's ``softcap``, the functions' attribute, ``CapScores``) against the
    PyTorch op: mean and learned summaries, boundary chunks, clustered summaries (non-causal, no
    top-k), and the exact path (plain ONNX ops); onnxruntime's optimised graph runs ``Tanh`` for
    them and, for the same sites without a cap, none (the ``If`` on the attribute folded away)."""
    import onnxruntime as ort

    from tests.ops.test_attention import make_mask
    from tests.ops.test_segments import segments

    B, Hq, Hkv, n, d = 2, 4, 2, 13, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(B, h, n, d, generator=g) for h in (Hq, Hkv, Hkv))
    mask = make_mask(mask_kind, B, Hq, n)
    mask = torch.zeros(1) if mask is None else (mask if mask.dtype == torch.bool else mask.float())
    ids = segments(B, n, rate=0.25)
    weight = torch.randn(Hkv, d, generator=g)
    mu = torch.randn(Hkv, 3, d, generator=g)

    class _Plain(_OneSite):  # (fixed chunks: the segment ids every site of _Sites is handed are not read)
        def forward(self, q, k, v, mask, segment_ids):
            return super().forward(q, k, v, mask)

    def sites(cap):
        capped = dict(softcap=cap) if cap else {}
        return [_Plain(mask_kind, None, chunk_size=4, causal=True, local_chunks=1, sinks=2, top_k=1, **capped),
                _Plain(mask_kind, weight, chunk_size=3, causal=False, local_chunks=2, sinks=0, top_k=1, **capped),
                _Plain(mask_kind, None, chunk_size=EXACT_CHUNK, causal=True, **capped)]

    class _Boundary(torch.nn.Module):  # boundary chunks, clustered summaries: the op's other forms
        def __init__(self, cap):
            super().__init__()
            self.cap = dict(softcap=cap) if cap else {}
            self.register_buffer("mu", mu)

        def forward(self, q, k, v, mask, segment_ids):
            m = None if mask_kind == "none" else mask
            out = torch.ops.mta.attention(q, k, v, m, None, segment_ids, chunk_size=3, causal=True, sinks=1, top_k=1,
                                          **self.cap)
            if mask_kind in ("none", "key_padding_bool"):
                out = out + torch.ops.mta.attention(q, k, v, m, None, None, self.mu, chunk_size=4, sinks=1, **self.cap)
            return out

    tanh = []
    for cap in (1.5, 0.0):
        module = _Sites(sites(cap) + [_Boundary(cap)])
        inputs = module.inputs(q, k, v, mask, ids)
        path = tmp_path / f"sites{cap}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(module, inputs, path, dynamic=False)
        session = onnx_session(path)
        got = session.run(None, {x.name: t.numpy() for x, t in zip(session.get_inputs(), inputs)})
        with torch.no_grad():
            want = module(*inputs)
            if cap:  # (the cap bends these logits: the outputs are not the uncapped ones)
                plain = _Sites(sites(0.0) + [_Boundary(0.0)])(*inputs)
                assert all((w - p).abs().max() > 1e-2 for w, p in zip(want, plain))
        for out, ref in zip(got, want):
            np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=2e-5)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"optimised{cap}.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        tanh.append(sum(node.op_type == "Tanh" for node in onnx.load(options.optimized_model_filepath).graph.node))
    assert tanh[0] > 0 and tanh[1] == 0, tanh


class _ClusteredSite(torch.nn.Module):
    def __init__(self, mask_kind, centroids, **config):
        super().__init__()
        self.mask_kind, self.config = mask_kind, config
        self.register_buffer("centroids", centroids)

    def forward(self, q, k, v, mask):
        return torch.ops.mta.attention(q, k, v, None if self.mask_kind == "none" else mask, None, None, self.centroids,
                                       **self.config)


@pytest.mark.parametrize("mask_kind", ["none", "key_padding_bool", "key_padding_min", "per_head_key_padding"])
def test_clustered_function_equals_the_op(mask_kind, tmp_path):
    """``MultiTokenAttentionClustered`` alone against the PyTorch op: GQA, key padding (per head
    too), windows, sinks inside and beyond the first chunk, partial last chunk, one chunk."""
    from mta_rewrite.onnx.function import CLUSTERED_OP_TYPE
    from tests.ops.test_attention import make_mask

    B, Hq, Hkv, n, d = 2, 4, 2, 13, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, d, generator=g) for h in (Hq, Hkv, Hkv))
    mask = make_mask(mask_kind, B, Hq, n)
    mask = torch.zeros(1) if mask is None else (mask if mask.dtype == torch.bool else mask.float())
    configs = [dict(chunk_size=c, local_chunks=L, sinks=s, clusters=K)
               for c, L, s, K in [(4, 1, 0, 3), (3, 2, 2, 5), (5, 1, 7, 1), (100, 1, 0, 2), (2, 3, 1, 4)]]
    module = _Sites([_ClusteredSite(mask_kind, torch.randn(Hkv, config["clusters"], d, generator=g),
                                    **{key: value for key, value in config.items() if key != "clusters"})
                     for config in configs])
    inputs = module.inputs(q, k, v, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(module, inputs, tmp_path / "sites.onnx", dynamic=False)
    assert [n.op_type for n in proto.graph.node if n.domain == DOMAIN].count(CLUSTERED_OP_TYPE) == len(configs)
    _run_sites(module, inputs, tmp_path / "sites.onnx", configs)


_SINK_CONFIG = mr.MTAConfig(6, 2, 2, 1)


@pytest.mark.parametrize("entry,mta_nodes", [
    (_SINK_CONFIG, 1), (mr.HeadGroups(((_SINK_CONFIG, (0, 2)), (None, (1, 3)))), 1),
    (mr.Learned.from_tensor(_SINK_CONFIG, torch.randn(4, 8, generator=torch.Generator().manual_seed(1))), 1),
    (None, 0)], ids=["config", "head_groups", "learned", "left_exact"])
def test_learned_sink_logits_export_and_match_the_rewritten_model(tmp_path, entry, mta_nodes):
    """A site with learned sink logits (GPT-OSS) exports like any other: its extra token is built
    in the graph around one mta node (per-head groups: one for the approximated group; learned
    summaries: their weight with the extra dimension; left exact, the op's exact path, plain
    attention over the extra token), and onnxruntime gives what the rewritten model gives."""
    model = zoo.SinkLogits().eval()
    plan = mr.Plan({} if entry is None else {"root": mr.PlanEntry(entry)})
    x, mask = zoo.sink_inputs(24)
    proto = export_onnx(model, (x, mask), tmp_path / "sink.onnx", plan=plan)
    assert len([n for n in proto.graph.node if n.domain == DOMAIN]) == mta_nodes
    assert {n.op_type for n in proto.graph.node if n.domain == DOMAIN} <= {OP_TYPE, PREPARED_OP_TYPE, LEARNED_OP_TYPE}
    rewritten = mr.rewrite(model, (x, mask), plan=plan)
    session = onnx_session(tmp_path / "sink.onnx")
    x, mask = zoo.sink_inputs(37, B=3, seed=3)
    with torch.no_grad():
        want = rewritten(x, mask).numpy()
        if entry is None:
            np.testing.assert_allclose(want, model(x, mask).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(session.run(None, {"x": x.numpy(), "mask": mask.numpy()})[0], want, rtol=0, atol=1e-5)




def test_learned_sink_logits_with_boundary_chunks_export(tmp_path):
    """A sink site with boundary chunks exports as a segmented node, the extra token's segment id
    (the first token's) built in the graph; onnxruntime gives what the rewritten model gives at
    another batch and length."""
    from ..test_rewrite import _TokensThenSinkLogits

    torch.manual_seed(0)
    model = _TokensThenSinkLogits().eval()
    ids = torch.randint(0, 20, (2, 30), generator=torch.Generator().manual_seed(1))
    _, mask = zoo.sink_inputs(30)
    kw = dict(config=mr.MTAConfig(5, 1, 1, 1), boundaries=mr.Boundaries((7,)))
    proto = export_onnx(model, (ids, mask), tmp_path / "sink.onnx", **kw)
    assert [n.op_type for n in proto.graph.node if n.domain == DOMAIN] == ["MultiTokenAttentionSegmented"]
    rewritten = mr.rewrite(model, (ids, mask), **kw)
    ids = torch.randint(0, 20, (3, 41), generator=torch.Generator().manual_seed(2))
    _, mask = zoo.sink_inputs(41, B=3, seed=3)
    got = onnx_session(tmp_path / "sink.onnx").run(None, {"input_ids": ids.numpy(), "mask": mask.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, rewritten(ids, mask).numpy(), rtol=0, atol=1e-5)


class _KthValue(torch.nn.Module):
    """An operator torch.onnx has no translation for."""

    def forward(self, x):
        return torch.kthvalue(x, 2).values


def test_the_exporters_failure_is_one_line_that_names_the_operator(tmp_path):
    """torch.onnx's error opens with generic advice in terminal colours ("Failed to convert the
    exported program to an ONNX model. This is step 3/3 …"); ``exporter_failure`` (what
    ``mta-rewrite export`` prints) names the operator. (Until 2026-12-05 the example was Llama-4's
    complex rotary positions, which now export: tests/onnx/test_complex.py.)"""
    from mta_rewrite.onnx.export import exporter_failure

    with pytest.raises(torch.onnx.OnnxExporterError) as raised:
        export_onnx(_KthValue(), (torch.randn(2, 5, 8),), tmp_path / "k.onnx")
    assert "\x1b[" in str(raised.value) or "Failed to convert" in str(raised.value)
    assert exporter_failure(raised.value) == "it has no ONNX translation for the operator aten.kthvalue"


class _TopTwo(torch.nn.Module):
    """A mixture-of-experts router's choice: the two largest scores (ONNX's TopK takes no bfloat16)."""

    def forward(self, x):
        return torch.topk(x, 2).values


def test_a_model_that_onnx_checker_refuses_is_a_one_line_error(tmp_path):
    """torch.onnx writes TopK on bfloat16 (GPT-OSS's router in bfloat16), which ONNX's TopK does
    not take: onnx's checker raised its InferenceError, a traceback out of ``export``. It is a
    one-line ValueError that says what to change, and nothing is written."""
    x = torch.randn(2, 6, 4).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"^torch.onnx wrote a model that onnx's checker refuses: .*TopK.*bfloat16.* "
                                         r"\(the model computes in bfloat16, which that ONNX operator does not take: "
                                         r"export it in float32, e\.g\. capture --dtype float32\)$"):
        export_onnx(_TopTwo(), (x,), tmp_path / "top.onnx")
    assert not list(tmp_path.iterdir())

class _RmsNorm(torch.nn.Module):
    """Helium's RMSNorm: x · rsqrt(mean(x²) + 1e-8)."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)


def test_a_small_epsilon_survives_the_export(tmp_path):
    """torch.onnx's optimiser (onnxscript's no-op rules, which match 0 within 1e-8) deleted the
    ``+ 1e-8`` of Helium's RMSNorm: a zero row (a padding token's embedding) became inf, and NaN
    through every later layer, in the exact export as in the rewritten one. The export now runs
    the optimiser without the rules that delete the addition of a small constant."""
    x = torch.randn(2, 5, 8)
    x[0, 1] = 0.0
    export_onnx(_RmsNorm(), (x,), tmp_path / "norm.onnx")
    got = onnx_session(tmp_path / "norm.onnx").run(None, {"x": x.numpy()})[0]
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, _RmsNorm()(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["bert", "triu"])
def test_masks_of_a_finite_masked_score_export_as_masks(form, tmp_path):
    """The masks the matcher reads as masks although their masked value is finite (−1e4, −1e9:
    tests/test_rewrite.py): ``(1 − mask)·−10000`` added (its −10000s made −inf in the graph) and
    ``triu(full(−1e9), 1)`` added (a bool mask): exported, onnxruntime runs them at another length
    and padding as the rewritten model does."""
    from tests.test_rewrite import _FilledMask, _ScaledComplement

    g = torch.Generator().manual_seed(3)
    model = (_ScaledComplement("bert") if form == "bert" else _FilledMask("triu")).eval()

    def example(n):
        x = torch.randn(2, n, 32, generator=g)
        if form == "bert":
            mask = torch.ones(2, n, dtype=torch.long)
            mask[0, n - 9:] = 0
        else:
            mask = torch.ones(2, 1, n, n, dtype=torch.bool)
        return x, mask

    config = mr.MTAConfig(chunk_size=6, local_chunks=1, sinks=2, top_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, example(40), tmp_path / "m.onnx", config=config)
        fast = mr.rewrite(model, example(40), config=config)
    session = onnx_session(tmp_path / "m.onnx")
    x, mask = example(53)
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, mask))})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, fast(x, mask).numpy(), rtol=0, atol=2e-5)


class _RandomSites(torch.nn.Module):
    """Sites of the op, one per configuration, all reading one mask (or none), learned summaries'
    weight and segment ids (or none)."""

    def __init__(self, configs, masked, weight, segmented):
        super().__init__()
        self.configs, self.masked, self.segmented = configs, masked, segmented
        self.register_buffer("weight", weight)

    def forward(self, q, k, v, mask, segment_ids):
        return tuple(torch.ops.mta.attention(q, k, v, mask if self.masked else None, self.weight,
                                             segment_ids if self.segmented else None, **config)
                     for config in self.configs)


def _random_mask(kind, B, Hq, n, g):
    if kind == "key_padding":
        mask = torch.rand(B, 1, 1, n, generator=g) > 0.3
        mask[..., -1] = True
        return mask
    if kind == "causal_padding_min":
        pad = torch.rand(B, 1, 1, n, generator=g) > 0.3
        pad[0, ..., :2] = False
        return torch.where(torch.ones(n, n, dtype=torch.bool).tril() & pad, 0.0, torch.finfo(torch.float32).min)
    if kind == "random_bool_per_head":
        return torch.rand(B, Hq, n, n, generator=g) > 0.3
    if kind == "alibi_per_head":
        i = torch.arange(n)
        return -(i[None] - i[:, None]).abs().float().expand(1, Hq, n, n) * torch.linspace(0.2, 0.5, Hq).view(1, Hq, 1, 1)
    if kind == "band":
        i = torch.arange(n)
        return (i[:, None] - i[None]).abs() < 5
    return torch.zeros(1)


MTA_RANDOM_EXPORTS = int(os.environ.get("MTA_RANDOM_EXPORTS", "4"))


@pytest.mark.parametrize("seed", range(MTA_RANDOM_EXPORTS))
def test_random_sites_export_and_run_as_the_reference(seed, tmp_path):
    """Six sites with seeded random configurations (chunk size, window, sinks, top-k, causality,
    scale, soft-cap) sharing a random mask kind, learned summaries or boundary chunks, exported once
    with a dynamic batch and length and run by onnxruntime at four batches and lengths (one token
    included) against the float64 reference. ``MTA_RANDOM_EXPORTS`` runs more (the first search,
    2026-12-06: 200 exports, all equal to the reference)."""
    import random

    from mta_rewrite.ops import mta_attention_reference

    r = random.Random(seed)
    Hkv, G, d = r.choice([1, 2]), r.choice([1, 2, 3]), r.choice([4, 8])
    Hq = Hkv * G
    kind = r.choice(["none", "key_padding", "causal_padding_min", "random_bool_per_head", "alibi_per_head", "band"])
    segmented = r.random() < 0.3 and kind in ("none", "key_padding", "causal_padding_min", "alibi_per_head")
    weight = torch.randn(Hkv, d, generator=torch.Generator().manual_seed(seed)) if r.random() < 0.3 else None
    softcap = r.choice([0.0, 0.0, 3.0])
    configs = [dict(chunk_size=r.choice([1, 2, 3, 4, 5, 8]), causal=r.random() < 0.5, scale=r.choice([None, 0.5]),
                    local_chunks=r.choice([1, 2, 3]), sinks=r.choice([0, 1, 3, 6]), top_k=r.choice([0, 0, 1, 2]),
                    softcap=softcap) for _ in range(6)]
    module = _RandomSites(configs, kind != "none", weight, segmented)

    def data(B, n):
        g = torch.Generator().manual_seed(seed * 100 + n)
        q, k, v = (torch.randn(B, h, n, d, generator=g) for h in (Hq, Hkv, Hkv))
        return q, k, v, _random_mask(kind, B, Hq, n, g), torch.cumsum((torch.rand(B, n, generator=g) < 0.25).long(), 1)

    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=1, max=4096)
    tokens = {0: batch, 2: length}
    mask_dims = {"key_padding": {0: batch, 3: length}, "causal_padding_min": {0: batch, 2: length, 3: length},
                 "random_bool_per_head": {0: batch, 2: length, 3: length}, "alibi_per_head": {2: length, 3: length},
                 "band": {0: length, 1: length}, "none": None}[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, data(2, 13), strict=False,
                                      dynamic_shapes=(tokens, tokens, tokens, mask_dims, {0: batch, 1: length}))
        export_onnx(program, data(2, 13), tmp_path / "sites.onnx")
    session = onnx_session(tmp_path / "sites.onnx")
    for B, n in [(2, 13), (1, 7), (3, 29), (2, 1)]:
        inputs = data(B, n)
        got = session.run(None, {x.name: t.numpy() for x, t in zip(session.get_inputs(), inputs)})
        q, k, v, mask, segment_ids = inputs
        for out, config in zip(got, configs):
            want = mta_attention_reference(q, k, v, None if kind == "none" else mask, summary_weight=weight,
                                           segment_ids=segment_ids if segmented else None, **config)
            np.testing.assert_allclose(out, want.numpy(), rtol=0, atol=1e-4,
                                       err_msg=f"seed {seed}, mask {kind}, B={B}, n={n}, {config}")
