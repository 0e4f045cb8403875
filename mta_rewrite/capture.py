"""Model → torch.export program (non-strict), with a dynamic sequence length by default.

Every dimension of every tensor input is marked ``Dim.AUTO``: export keeps dynamic what the
model lets be dynamic (batch, sequence) and specialises the rest (hidden sizes tied to weights)
without failing. Where dynamic capture fails (a model that branches on a length), capture falls
back to the example's static shapes with a warning that says so.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message says why in one line."""


def _auto_dims(value: Any):
    return pytree.tree_map(
        lambda x: {i: Dim.AUTO for i in range(x.dim())} if isinstance(x, torch.Tensor) else None, value
    )


def dynamic_shapes_for(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``Dim.AUTO`` for every dimension of every tensor input, keyed by forward's parameter names."""
    sig = inspect.signature(model.forward)
    bound = sig.bind(*args, **kwargs)
    return {name: _auto_dims(value) for name, value in bound.arguments.items()}


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *, dynamic: bool = True) -> ExportedProgram:
    """Capture ``model(*args, **kwargs)`` with ``torch.export.export(strict=False)``."""
    if isinstance(model, ExportedProgram):
        return model
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module or ExportedProgram, got {type(model).__name__}")
    args = tuple(args) if isinstance(args, (tuple, list)) else (args,)
    kwargs = dict(kwargs or {})
    if dynamic:
        try:
            shapes = dynamic_shapes_for(model, args, kwargs)
            return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # noqa: BLE001  (export raises many types; we fall back and say why)
            unsupported = _unsupported_output(model, exc)
            if unsupported is not None:  # not about shapes: static capture would fail the same way
                raise CaptureError(unsupported) from exc
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"dynamic capture failed ({first}); capturing with the example's static shapes", stacklevel=2)
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(_unsupported_output(model, exc)
                           or f"torch.export could not capture {type(model).__name__}: {first}") from exc


def _unsupported_output(model: torch.nn.Module, exc: Exception) -> str | None:
    """The one-line reason when torch.export failed because the model returns an object it cannot
    return from a graph ("Found <class 'X'> in output, which is not a known type"), else None.
    transformers' KV caches are the usual case: a language model called without
    ``use_cache=False`` returns a ``DynamicCache``."""
    import re

    found = re.search(r"Found <class '([^']+)'> in output", str(exc))
    if found is None:
        return None
    name = found.group(1)
    hint = ("a KV cache: call the model with use_cache=False" if "cache" in name.rsplit(".", 1)[-1].lower() else
            "register it with torch's pytree (torch.export.register_dataclass for a dataclass), or return tensors")
    return f"torch.export could not capture {type(model).__name__}: its output holds a {name}, which a graph " \
           f"cannot return ({hint})"
