"""How a captured model is called, and calls bound to it by parameter name.

A program from torch.export takes exactly the structure of the call it was captured from: the
inputs passed positionally then, positionally; those passed by keyword, by keyword; flags such as
``use_cache=False`` given again with the captured value. A transformers language model captured
as ``model(ids, use_cache=False)`` and rewritten then refused ``fast(ids)`` and
``fast(input_ids=ids, use_cache=False)`` with torch's "Ran into a kwarg keyword mismatch".
:class:`CallSignature` binds a call as the model's own forward would, by parameter name:
calibration binds its samples with it (:meth:`CallSignature.bind`), and the modules ``rewrite``
returns bind every call with it (:class:`BindCalls`, a forward pre-hook).
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, NamedTuple

import torch
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree


class Call(NamedTuple):
    """A call bound to the captured model: ``args`` and ``kwargs`` as the program takes them,
    ``by_name`` every argument by its parameter name (calibration's metrics find an attention
    mask there, however it was passed)."""

    args: tuple
    kwargs: dict
    by_name: dict


class CallSignature:
    """How a captured model is called: its forward's parameter names, which of them the captured
    call passed positionally and which by keyword (a program takes exactly that structure), and
    the values of its inputs that hold no tensor in the example call it was captured from (flags
    such as ``use_cache=False``, which the program was specialised to).

    :meth:`bind` takes a calibration sample as a user writes it, positional (a tuple), by keyword
    (a dict) or one tensor, and gives the captured call: a dict sample for a program captured
    with a positional ``input_ids`` works, and a flag the sample leaves out takes its captured
    value; an input the sample lacks or the program does not take, or a flag with another value
    than the captured one, is a one-line error."""

    def __init__(self, module: torch.nn.Module, example: tuple[tuple, dict] | None):
        import inspect

        spec = getattr(module, "_in_spec", None)
        params = list(inspect.signature(module.forward).parameters.values())
        self.variadic = spec is None or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
        if not self.variadic:
            args_shape, kwargs_shape = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)  # (args, kwargs)
            self.names = [p.name for p in params]
            self.positional = self.names[:len(args_shape)]
            self.keywords = list(kwargs_shape)
            # torch.export's module takes exactly the captured call's inputs, by these names
            self.variadic = sorted(self.names) != sorted(self.positional + self.keywords)
        if self.variadic:  # nothing to bind against: calls are passed as they are
            return
        self.constants: dict = {}
        if example is not None:
            try:
                bound = self._by_name(*example)
            except ValueError:
                bound = {}
            self.constants = {name: value for name, value in bound.items() if not holds_tensor(value)}

    def _by_name(self, args: tuple, kwargs: dict) -> dict:
        if len(args) > len(self.names):
            raise ValueError(f"it gives {len(args)} positional arguments, the captured model takes {len(self.names)}: "
                             f"{', '.join(self.names)}")
        by_name = dict(zip(self.names, args))
        for name, value in kwargs.items():
            if name not in self.names:
                raise ValueError(f"the captured model takes no input {name!r} (it takes {', '.join(self.names)})")
            if name in by_name:
                raise ValueError(f"it gives {name!r} both by position and by keyword")
            by_name[name] = value
        return by_name

    def bind_call(self, args: tuple, kwargs: dict) -> Call:
        """The call as the program takes it, or a ValueError that says what does not fit."""
        if self.variadic:
            return Call(args, kwargs, dict(kwargs))
        by_name = self._by_name(args, kwargs)  # the captured module's parameters are its inputs, no others
        for name in self.positional + self.keywords:
            if name not in by_name:
                if name not in self.constants:
                    raise ValueError(f"it lacks the input {name!r}, which the captured model takes")
                by_name[name] = self.constants[name]
            elif name in self.constants and _differs(by_name[name], self.constants[name]):
                raise ValueError(f"it gives {name}={by_name[name]!r}, and the model was captured with "
                                 f"{name}={self.constants[name]!r}, which the program is specialised to")
        return Call(tuple(by_name[name] for name in self.positional), {name: by_name[name] for name in self.keywords},
                    by_name)

    def bind(self, sample: Any, index: int | None = None) -> Call:
        """A calibration sample (a tuple, a dict, one tensor or a :class:`Call`) as the captured
        call; ``index``: the sample's position, named in the error when it does not fit."""
        if isinstance(sample, Call):
            return sample
        try:
            return self.bind_call(*as_call(sample))
        except ValueError as exc:
            which = "a sample" if index is None else f"sample {index}"
            raise ValueError(f"{which} does not fit the model's call: {exc}") from None

    def described(self) -> str:
        """The captured call, e.g. ``model(input_ids, use_cache=False)``."""
        if self.variadic:
            return "model(...)"
        shown = [*self.positional, *(f"{k}={self.constants[k]!r}" if k in self.constants else f"{k}=…"
                                     for k in self.keywords)]
        return f"model({', '.join(shown)})"


def holds_tensor(value: Any) -> bool:
    """Whether an input holds a tensor anywhere in its structure (else it is a flag, such as
    ``use_cache=False``, that a program is specialised to)."""
    return any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(value))


def _differs(given: Any, captured: Any) -> bool:
    """Whether a non-tensor input differs from its captured value (values compared where they
    compare as plain Python values; anything else is left to the program's own guards)."""
    plain = (bool, int, float, str, type(None))
    return isinstance(given, plain) and isinstance(captured, plain) and given != captured


def guard_failure(exc: BaseException) -> str | None:
    """What a program's shape guard that ``exc`` reports requires, and what to do about it, as a
    clause (``"requires x.size()[1] % 4 == 0 (…)"``); None where ``exc`` is not a guard failure.
    torch.export keeps a size dynamic unless the model's code depends on it, and fixes every size
    of 0 or 1 in the example; its program asserts what it fixed ("Guard failed: …") when called."""
    message = str(exc).strip()
    if not isinstance(exc, AssertionError) or not message.startswith("Guard failed:"):
        return None
    guard = message.removeprefix("Guard failed:").strip()
    fixed = re.fullmatch(r"\S+\.size\(\)\[\d+\] == (\d+)", guard)
    if fixed and int(fixed.group(1)) <= 1:
        return (f"requires {guard} (torch.export fixes every size of 0 or 1 in the example it captures from: "
                "capture again from an example where that size is larger)")
    if fixed:
        return (f"requires {guard} (a size torch.export fixed when it captured the model: give inputs of that shape; "
                "the model's code depends on it, so the program takes no other)")
    return (f"requires {guard} (a condition torch.export recorded when it captured the model, whose code depends on "
            "that size: give inputs that satisfy it)")


class BindCalls:
    """A forward pre-hook (``with_kwargs=True``, first of the hooks) that binds every call of a
    module ``rewrite`` returns as the original model's forward would: positional or by keyword,
    flags such as ``use_cache=False`` left out or given with the captured value. A call that does
    not fit is a ValueError naming what and how the model was captured; so is one whose shapes
    the program's guards refuse (a length the model's code fixed at capture: the program itself
    would raise torch's bare ``AssertionError: Guard failed: …`` from inside its graph)."""

    def __init__(self, signature: CallSignature):
        self.signature = signature
        self._guarded: tuple | None = None  # (graph, positions of the guards' inputs among the flat inputs)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        try:
            call = self.signature.bind_call(tuple(args), dict(kwargs))
        except ValueError as exc:
            raise ValueError(f"this call does not fit the rewritten model, captured as "
                             f"{self.signature.described()}: {exc}") from None
        self._check_guards(module, call)
        return call.args, call.kwargs

    def _check_guards(self, module: torch.nn.Module, call: Call) -> None:
        """Run the program's shape guards (``_guards_fn``, which its graph calls first on the
        flattened inputs) on this call, turning a failure into a one-line ValueError."""
        guards, graph = getattr(module, "_guards_fn", None), getattr(module, "graph", None)
        if guards is None or graph is None or getattr(module, "_in_spec", None) is None:
            return
        if self._guarded is None or self._guarded[0] is not graph:
            inputs = [n for n in graph.nodes if n.op == "placeholder"]
            node = next((n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"), None)
            if node is None or not all(a in inputs for a in node.args):
                self._guarded = (graph, None)
            else:
                self._guarded = (graph, [inputs.index(a) for a in node.args])
        positions = self._guarded[1]
        if positions is None:
            return
        try:
            flat = fx_pytree.tree_flatten_spec((list(call.args), call.kwargs), module._in_spec)
            guards(*(flat[i] for i in positions))
        except AssertionError as exc:
            clause = guard_failure(exc)
            if clause is None:
                raise
            raise ValueError(f"this call does not fit the rewritten model, which {clause}") from None


def bind_calls(module: torch.nn.Module, example: tuple[tuple, dict] | None = None, *,
               signature: CallSignature | None = None) -> torch.nn.Module:
    """Make ``module`` (unlifted from a program captured from ``example``) bind its calls by
    parameter name (:class:`BindCalls`); ``module.mta_call`` is the signature. ``signature``: one
    already made for it (a deep copy of a module bound before). A module whose forward takes
    ``*args`` / ``**kwargs`` is left as it is."""
    signature = signature or CallSignature(module, example)
    if not signature.variadic:
        module.register_forward_pre_hook(BindCalls(signature), with_kwargs=True, prepend=True)
        module.mta_call = signature
    return module


def example_call(model: Any, args: Any, kwargs: Any) -> tuple[tuple, dict]:
    """The example call the API is given (``args``, ``kwargs``) as a tuple and a dict: a value
    that is not a tuple or list is one positional argument, except a dict whose keys are all
    parameters of ``model.forward`` (``rewrite(model, {"input_ids": ids})``, as calibration samples
    are written), which is the keyword arguments; ``kwargs`` that is not a dict is a TypeError
    (a configuration given positionally where the keyword arguments go)."""
    import inspect

    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict of keyword arguments, got {type(kwargs).__name__} (a configuration "
                        "or a plan is given by name: config=…, plan=…)")
    if isinstance(args, (str, bytes, os.PathLike)):  # (a path where the inputs go: the model failed on it)
        raise TypeError(f"args must be the model's positional inputs (a tuple, a list or one tensor), got "
                        f"{type(args).__name__} {str(args)[:80]!r} (export_onnx takes its path after them: "
                        "export_onnx(model, args, path, kwargs))")
    kwargs = dict(kwargs or {})
    if isinstance(args, dict) and args and not kwargs and isinstance(model, torch.nn.Module):
        try:
            names = set(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            names = set()
        if all(isinstance(name, str) for name in args) and set(args) <= names:
            return (), dict(args)
    return (tuple(args) if isinstance(args, (tuple, list)) else (args,)), kwargs


def as_call(sample: Any) -> tuple[tuple, dict]:
    """A calibration sample is a tuple of positional arguments or a dict of keyword arguments (or
    one tensor, or a :class:`Call`, a sample already bound)."""
    if isinstance(sample, Call):
        return sample.args, sample.kwargs
    if isinstance(sample, dict):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    if isinstance(sample, torch.Tensor):
        return (sample,), {}
    raise TypeError(f"a calibration sample is a tuple of arguments or a dict of keyword arguments, got {type(sample).__name__}")


class RecordedCall(NamedTuple):
    """One call of a module as :func:`record_calls` saw it: ``rewrite(module, call.args,
    call.kwargs, ...)`` (or ``rewrite(module, *call, ...)``) captures the module as it was called."""

    args: tuple
    kwargs: dict


@contextlib.contextmanager
def record_calls(module: torch.nn.Module, count: int = 1):
    """A list that fills, while the block runs, with the first ``count`` calls of ``module`` (its
    forward's arguments as the caller passed them, tensors copied: what the caller changes in place
    afterwards does not change them). The example to capture a module that something else calls:
    a diffusers pipeline's denoiser, a model inside an application::

        with mr.record_calls(pipe.transformer) as calls:
            pipe(prompt, num_inference_steps=1)
        pipe.transformer = mr.rewrite(pipe.transformer, *calls[0], config=mr.MTAConfig(128, 2, 4, 0))
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"record_calls records the calls of a torch.nn.Module, got {type(module).__name__}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int (the calls to record), got {count!r}")
    calls: list[RecordedCall] = []

    def record(_module, args, kwargs):
        if len(calls) < count:
            copied = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (tuple(args), dict(kwargs)))
            calls.append(RecordedCall(*copied))

    handle = module.register_forward_pre_hook(record, with_kwargs=True, prepend=True)
    try:
        yield calls
    finally:
        handle.remove()
