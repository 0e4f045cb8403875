"""Complex arithmetic in the ONNX export (``onnx/complex.py``): written as pairs of reals, run by
onnxruntime, equal to the PyTorch model; the program itself left as it was; an operator the export
cannot write is a one-line error."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch

import mta_rewrite as mr
from mta_rewrite import zoo
from mta_rewrite.capture import capture
from mta_rewrite.onnx import DOMAIN, PREPARED_OP_TYPE, export_onnx, onnx_session

try:
    import transformers  # noqa: F401
    HAS_TRANSFORMERS = True
except ImportError:  # pragma: no cover
    HAS_TRANSFORMERS = False


def _c(x):
    """[2, 5, 8] reals → [2, 5, 4] complex numbers (consecutive pairs, as rotary code makes them)."""
    return torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))


def _rotary(x):
    """Llama-4's rotary positions: a polar table scaled by a float, unsqueezed, times q's pairs."""
    n = x.shape[1]
    angles = torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor([1.0, 0.3, 0.1, 0.01])
    table = torch.polar(torch.ones_like(angles), angles) * 0.9
    return torch.view_as_real(_c(x).unsqueeze(1) * table[None, None, :, :][:, 0][:, None]).flatten(3)


# name → a function of x [2, 5, 8] (float32); a complex result is compared as pairs
FORMS = {
    "llama4_rotary": _rotary,
    "times_complex_broadcast": lambda x: _c(x) * _c(x)[:1, :, :1],
    "times_float": lambda x: _c(x) * 0.5,
    "times_complex_number": lambda x: _c(x) * (2 - 1j),
    "times_real_tensor": lambda x: _c(x) * x[..., :4],
    "real_tensor_times_complex_number": lambda x: x * 1j,
    "over_complex": lambda x: _c(x) / (_c(x).flip(1) + 3),
    "over_real_tensor": lambda x: _c(x) / (x[..., :4].abs() + 1),
    "over_complex_number": lambda x: _c(x) / (1 + 2j),
    "number_over_complex": lambda x: 2 / (_c(x) + 3),
    "real_over_complex": lambda x: x[..., :4] / (1 + 2j) + x[..., 4:] / (_c(x) + 3),
    "plus_minus": lambda x: (_c(x) + _c(x).flip(0)) - 2 + x[..., :4] - (0.5 - 1j),
    "sub_alpha": lambda x: torch.sub(_c(x), _c(x).flip(2), alpha=3),
    "neg_conj_exp": lambda x: torch.exp(-_c(x).conj() * 0.1),
    "polar_and_complex": lambda x: torch.polar(x[..., :4].abs(), x[..., 4:]) + torch.complex(x[..., 4:], x[:1, :1, :4]),
    "abs_real_imag": lambda x: _c(x).abs() + _c(x).real * 2 - _c(x).imag,
    "casts": lambda x: _c(x).to(torch.complex128).to(torch.complex64) + x[..., :4].to(torch.complex64),
    "to_real_takes_the_real_part": lambda x: _c(x).to(torch.float32) * 3,
    "shapes": lambda x: _c(x).permute(2, 0, 1).transpose(0, -1).reshape(5, -1)[1:, ::2].unsqueeze(-1).expand(4, 4, 3),
    "select_narrow_squeeze": lambda x: _c(x)[:, 2].narrow(-1, 1, 2).unsqueeze(1).squeeze(1).flip(-1),
    "cat_stack": lambda x: torch.cat([torch.stack([_c(x), _c(x) * 2], -1), _c(x)[..., None]], dim=-1),
    "sum_mean": lambda x: _c(x).sum(-1) + _c(x).mean(dim=1, keepdim=True)[:, :, 0],
    "split_unbind": lambda x: (lambda a, b: torch.cat([b, a * 2j], -1))(*torch.split(_c(x), [1, 3], dim=-1))
    * sum(_c(x).split(2, dim=-1))[..., :1] + torch.stack(_c(x).unbind(-1)[::-1], -1),
    "index_and_where": lambda x: torch.where(x[..., :4] > 0, _c(x), _c(x) * 1j)[torch.tensor([1, 0])][:, [4, 0]],
}

# forms whose capture fixes the sequence length (their shapes, or torch.export's complex mean)
FIXED_LENGTH = ("shapes", "index_and_where", "select_narrow_squeeze", "sum_mean")


class _Form(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, x):
        return FORMS[self.name](x)


def _pairs(t: torch.Tensor) -> np.ndarray:
    return (torch.view_as_real(t) if t.is_complex() else t).numpy()


def _export(module, args, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_onnx(module, args, path, **kw)


@pytest.mark.parametrize("name", list(FORMS))
def test_complex_arithmetic_exports_as_real_pairs(name, tmp_path):
    """Each form onnxruntime runs as PyTorch does, at a length other than the export's (a
    complex output comes out as its pairs, as torch.onnx represents complex values); the ONNX
    graph holds no complex type."""
    module = _Form(name)
    proto = _export(module, (torch.randn(2, 5, 8),), tmp_path / "m.onnx")
    assert "COMPLEX" not in str(onnx.shape_inference.infer_shapes(proto).graph.value_info).upper()
    n = 5 if name in FIXED_LENGTH else 9
    x = torch.randn(2, n, 8, generator=torch.Generator().manual_seed(1))
    got = onnx_session(tmp_path / "m.onnx").run(None, {"x": x.numpy()})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (casting complex to real discards the imaginary part: a warning)
        want = _pairs(module(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class _ComplexBuffer(torch.nn.Module):
    """A complex table kept as a buffer (Meta's Llama reference code keeps freqs_cis so), a
    complex output beside a real one."""

    def __init__(self):
        super().__init__()
        angles = torch.arange(16, dtype=torch.float32)[:, None] * torch.tensor([1.0, 0.5, 0.25, 0.125])
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles))

    def forward(self, x):
        rotated = _c(x) * self.freqs_cis[: x.shape[1]]
        return rotated, torch.view_as_real(rotated).flatten(2)


def test_complex_buffers_enter_and_complex_outputs_leave_as_pairs(tmp_path):
    module = _ComplexBuffer()
    _export(module, (torch.randn(2, 5, 8),), tmp_path / "b.onnx")
    x = torch.randn(2, 11, 8)
    got = onnx_session(tmp_path / "b.onnx").run(None, {"x": x.numpy()})
    want = module(x)
    np.testing.assert_allclose(got[0], _pairs(want[0]), atol=1e-5)
    np.testing.assert_allclose(got[1], want[1].numpy(), atol=1e-5)


def test_the_program_exported_is_left_as_it_was(tmp_path):
    """A program given to the export is rewritten only while torch.onnx reads it."""
    program = capture(_Form("llama4_rotary"), (torch.randn(2, 5, 8),))
    code = program.graph_module.code
    _export(program, (torch.randn(2, 5, 8),), tmp_path / "p.onnx")
    assert program.graph_module.code == code
    x = torch.randn(2, 7, 8)
    np.testing.assert_array_equal(program.module()(x).numpy(), _rotary(x).numpy())


def test_complex_arithmetic_the_export_cannot_write_is_a_one_line_error(tmp_path):
    """A complex operator outside the table (a square root) names itself; nothing is written."""
    class _Root(torch.nn.Module):
        def forward(self, x):
            return torch.view_as_real(torch.sqrt(_c(x)))

    with pytest.raises(ValueError) as raised:
        _export(_Root(), (torch.randn(2, 5, 8),), tmp_path / "r.onnx")
    assert str(raised.value) == ("the model computes with complex numbers through aten.sqrt.default, which the ONNX "
                                 "export cannot write as real arithmetic (docs/onnx.md lists the operators it writes)")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_llama4_exports_with_mta_and_onnxruntime_runs_it_as_pytorch(tmp_path):
    """Llama-4 (a config, random weights: chunked-attention layers beside a global NoPE layer,
    rotary positions in complex numbers) exported with MTA sites: onnxruntime gives the
    rewritten model's hidden states at a length other than the export's. Before the complex
    pass, torch.onnx failed at the rotary positions' unsqueeze."""
    case = next(c for c in zoo.survey_cases() if c.name == "llama4-text (sdpa)")
    model = case.build()
    args, kwargs = case.inputs(24)
    config = mr.MTAConfig(8, 1, 2, 1)
    proto = _export(model, args, tmp_path / "l4.onnx", kwargs=kwargs, config=config)
    assert [n.op_type for n in proto.graph.node if n.domain == DOMAIN].count(PREPARED_OP_TYPE) == case.rewritable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten = mr.rewrite(model, args, kwargs, config=config)
    args, kwargs = case.inputs(37)
    session = onnx_session(tmp_path / "l4.onnx")
    got = session.run(None, {i.name: kwargs[i.name].numpy() for i in session.get_inputs()})[0]
    with torch.no_grad():
        want = rewritten(*args, **kwargs)
    want = want.last_hidden_state if hasattr(want, "last_hidden_state") else want[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)
