"""The zoo's models, each built and captured once per test process, for the tests that are about
what comes after capture.

torch.export is most of what a zoo test costs: 86% of the time of tests/test_rewrite.py and
tests/calibration/test_walk.py (572 of 661 s over 362 exports, this project's 2-core AMD EPYC
box, 2026-12-04), 1–5 s a model, a dynamic capture about four times a static one. ``rewrite``,
``find_attention`` and ``Probe`` take an ``ExportedProgram`` as they take a module (the API's
capture-once path: ``rewrite`` unlifts a fresh GraphModule from it every time and never changes
it), so these tests capture each case once and rewrite or probe that program as often as they
need. Each test still starts from the module somewhere: ``test_zoo_found_and_rewritten_exactly``
(every case, ``find_attention`` and ``rewrite`` of the model), the CLI's tests, and the ONNX
exports of a module with a config or plan (``test_cuda_session_…``, ``test_per_head_group_…``).
tests/onnx/test_export.py uses these programs too (its time 213 → 173 s, -n 2, same box).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

import mta_rewrite as mr
from mta_rewrite.zoo import ZooCase


@dataclass(frozen=True)
class Captured:
    model: torch.nn.Module  # what the program was captured from (its outputs are the reference)
    program: torch.export.ExportedProgram  # dynamic sequence length, as ``rewrite`` captures
    args: tuple  # the example the program was captured with: the case at its first length
    kwargs: dict


_CAPTURED: dict[str, Captured] = {}


def captured(case: ZooCase) -> Captured:
    """``case``'s model (built after ``torch.manual_seed(0)``) and its program, captured on the
    first call in this process. Callers must not change the model's weights."""
    if case.name not in _CAPTURED:
        torch.manual_seed(0)
        model = case.build()
        args, kwargs = case.inputs(case.lengths[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = mr.capture(model, args, kwargs)
        _CAPTURED[case.name] = Captured(model, program, args, kwargs)
    return _CAPTURED[case.name]
