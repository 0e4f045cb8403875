"""Model → torch.export program (non-strict), with a dynamic sequence length by default.

Every dimension of every tensor input is marked ``Dim.AUTO``: export keeps dynamic what the
model lets be dynamic (batch, sequence) and specialises the rest (hidden sizes tied to weights)
without failing. Where dynamic capture fails (a model that branches on a length), capture falls
back to the example's static shapes with a warning that says so.

A batch of one is widened to two first. torch.export specialises every dimension of size 0 or 1
to that size, so a program captured from one sequence (the usual example for a language model)
takes only batches of one ("Guard failed: input_ids.size()[0] == 1" at batch 4), and a model may
branch on its batch being one (transformers' mask code does). When every tensor input has a
leading dimension of 1 and no module is in training mode, capture exports the example repeated
to batch 2, then checks the program against the model on the example itself (its outputs'
structure, shapes and values): kept if they agree, else (a leading 1 that is not a batch, say)
the example is captured as given, with a warning that its batch stays fixed at 1. A model that
fails on the example itself is a :class:`CaptureError` that says so.

Inputs the example passes through the forward's ``**kwargs`` (transformers 5 takes
``return_dict``, ``output_hidden_states`` and ``output_attentions`` that way, GraniteMoE
``use_cache`` too) are named in the forward's signature while torch.export runs
(:func:`_var_keywords_named`): torch.export (2.13, non-strict) cannot match dynamic shapes to
anything passed through ``**kwargs`` (pytorch/pytorch#150022, #164313: "Must provide a tree_name
when there might be a mismatch"), and such a call used to be captured with static shapes.

A model whose code depends on its sequence length (Jamba's Mamba layers loop over the tokens)
is captured at the example's length only, dynamic or not: a warning says so when a token input's
length came out fixed (:func:`fixed_lengths`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import sys
import warnings
from typing import Any, NamedTuple

import torch
from torch.export import Dim, ExportedProgram
from torch.utils import _pytree as pytree

from .calls import example_call


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
    # a torch.compile'd model is captured as the model it wraps: its sites are named as the model's
    # (layers.0, not _orig_mod.layers.0), so a plan applies to both
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    args, kwargs = example_call(model, args, kwargs)
    args, kwargs = _unaliased(args, kwargs)
    signature = getattr(model, "mta_call", None)  # a module rewrite returned binds its calls (mta_rewrite.calls)
    if signature is not None:
        try:
            args, kwargs, _ = signature.bind_call(args, kwargs)
        except ValueError as exc:
            raise CaptureError(f"the example does not fit the rewritten model, captured as {signature.described()}: "
                               f"{exc}") from None
    widened = None  # (the batch-of-two check, where it ran: it runs the model on the example)
    if dynamic:
        wide = _batch_of_two(model, args, kwargs)
        if wide is not None:
            widened = _capture_batch_of_two(model, args, kwargs, *wide)
            if widened.reason is None:
                _warn_fixed_length(widened.program)
                return widened.program
        try:
            ep = _export(model, args, kwargs, dynamic=True)
        except Exception as exc:  # noqa: BLE001  (export raises many types; we fall back and say why)
            # not about shapes, or the model's own failure: static capture would fail the same way
            unsupported = _not_about_shapes(model, exc) or _own_failure(model, args, kwargs)
            if unsupported is not None:
                raise CaptureError(unsupported) from exc
            first = _first_line(exc)
            warnings.warn(f"dynamic capture failed ({first}); capturing with the example's static shapes", stacklevel=2)
        else:
            _warn_fixed_length(ep)
            return _checked(model, ep, args, kwargs, widened)
    try:
        ep = _export(model, args, kwargs)
    except Exception as exc:  # noqa: BLE001
        first = _first_line(exc)
        raise CaptureError(_not_about_shapes(model, exc) or (None if dynamic else _own_failure(model, args, kwargs))
                           or f"torch.export could not capture {type(model).__name__}: {first}") from exc
    return _checked(model, ep, args, kwargs, widened)


_NOT_RUN = object()


class _Widened(NamedTuple):
    """The batch-of-two check (:func:`_capture_batch_of_two`): the program captured at batch 2
    (None where export failed), why it is not kept (None: kept), the model's outputs on the example
    and the program's (``_NOT_RUN`` where they did not run)."""

    program: ExportedProgram | None
    reason: str | None
    expected: Any = _NOT_RUN
    got: Any = _NOT_RUN


def _checked(model: torch.nn.Module, ep: ExportedProgram, args: tuple, kwargs: dict,
             widened: _Widened | None) -> ExportedProgram:
    """``ep`` captured from the example as given, checked against the model on it (structure,
    shapes and values, as the batch-of-two check compares them), with a warning where it does not
    reproduce the model: torch.export traced another path through the model's code than the model's
    own run takes, and a rewrite or calibration follows the program. Found 2026-12-07:
    transformers' PaliGemma with SDPA called without ``token_type_ids`` attends bidirectionally
    when run (no mask, ``is_causal`` False) and causally when exported (it builds the causal mask
    while tracing): its program, and every rewrite of it, was 8% off the model with no word.

    Where the batch-of-two check ran and its program gave the model's outputs on the example no
    more than this one does (both off the model the same way), widening was not why: the program
    of batch 2 is kept (it takes any batch), with the same warning. Otherwise a warning says the
    program takes batches of one only. Run where :func:`_may_run`, not on the meta device."""
    expected = _NOT_RUN if widened is None else widened.expected
    got = _NOT_RUN
    if _may_run(model) and not _on_meta(model, args, kwargs):
        if expected is _NOT_RUN:
            expected = _model_outputs(model, args, kwargs)
        with torch.no_grad():
            try:
                got = ep.module()(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"the captured program fails on the example it was captured from: {_first_line(exc)}",
                              stacklevel=3)
    difference = None if got is _NOT_RUN else _output_difference(expected, got)
    if widened is not None:
        if difference is not None and widened.got is not _NOT_RUN and _same_outputs(got, widened.got):
            ep = widened.program  # (the example's own batch traces what batch 2 did)
        else:
            warnings.warn(f"the program takes batches of one only ({widened.reason}): capture from an example of "
                          "batch 2 or more for a program that takes any batch", stacklevel=3)
    if difference is not None:
        warnings.warn(f"the captured program does not reproduce {type(model).__name__} on the example ({difference}): "
                      "torch.export traced another path through its code than the model runs, and a rewrite follows "
                      "the program", stacklevel=3)
    return ep


def _model_outputs(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """The model's outputs on the example (without gradients); its own failure a CaptureError that
    says so (a program of it would fail the same way)."""
    with torch.no_grad():
        try:
            return model(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (the model's own error, of any type)
            raise CaptureError(_fails_on_example(model, exc)) from exc


def _on_meta(model: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    tensors += list(model.parameters()) + list(model.buffers())
    return any(x.is_meta for x in tensors)


def _own_failure(model: torch.nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Why the model itself fails on the example, when it does (its own error: a program of it
    would give the same, and torch.export's, from fake tensors, reads as a limit of capture), else
    None. Run when an export has failed, and only where :func:`_may_run` (as the batch-of-two
    check runs it)."""
    if not _may_run(model):
        return None
    try:
        _model_outputs(model, args, kwargs)
    except CaptureError as exc:
        return str(exc)
    return None


def _fails_on_example(model: torch.nn.Module, exc: Exception) -> str:
    return f"{type(model).__name__} fails on the example: {type(exc).__name__}: {_first_line(exc)}"


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, *, dynamic: bool = False) -> ExportedProgram:
    """``torch.export.export(strict=False)``, with ``Dim.AUTO`` for every dimension of every tensor
    input where ``dynamic`` (:func:`dynamic_shapes_for`), inputs passed through the forward's
    ``**kwargs`` named in its signature meanwhile (:func:`_var_keywords_named`), and without the
    partial graph torch prints to stderr when it fails (on a data-dependent guard, the whole graph
    traced so far, once per wrapper: thousands of lines before the one-line error the CLI gives),
    nor the traceback torch logs when an operator fails on fake tensors (:func:`_meta_failures_unlogged`).
    What else export writes to stderr, warnings included, is written there as before; the graph
    stays on the error (``partial_fx_graph``), the operator's reason is the error's message.

    The inputs' dimension marks are as they were after it, whatever happened, and none meanwhile
    where the export is static (:func:`_markings_kept`)."""
    written = io.StringIO()
    failed = None
    try:
        with contextlib.redirect_stderr(written), _meta_failures_unlogged(), library_logs_quiet(), \
                _var_keywords_named(model, kwargs), _markings_kept(args, kwargs, static=not dynamic):
            shapes = dynamic_shapes_for(model, args, kwargs) if dynamic else None
            return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=shapes)
    except Exception as exc:
        failed = exc
        raise
    finally:
        text = written.getvalue()
        graph = getattr(failed, "partial_fx_graph", None)
        if graph is not None:
            text = text.replace(f"{graph}\n", "")
        if text:
            sys.stderr.write(text)


# the loggers of the libraries capture and export call whose warnings are about their own choices
# for our calls, not the user's: torch.export reports every dimension Dim.AUTO specialises
# ("dimension inputs['mask'].shape[1] 0/1 specialized"), torch.onnx every optional package it skips
# ("torchvision is not installed. Skipping torchvision::nms", four lines per export), onnxscript's
# optimiser every constant it leaves unfolded ("Skipping constant folding for op Split with
# multiple outputs")
LIBRARY_LOGGERS = ("torch._export", "torch.export", "torch.fx.experimental.symbolic_shapes", "torch.onnx", "onnxscript")


@contextlib.contextmanager
def library_logs_quiet():
    """Within the block, :data:`LIBRARY_LOGGERS` print errors only, each where it would print
    warnings (its level as the library left it: one a user turned up, ``TORCH_LOGS`` or
    ``setLevel(logging.INFO)``, stays as it is); as they were after."""
    quieted = []
    for name in LIBRARY_LOGGERS:
        log = logging.getLogger(name)
        if log.getEffectiveLevel() == logging.WARNING:
            quieted.append((log, log.level))
            log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in quieted:
            log.setLevel(level)


class _MetaFailure(logging.Filter):
    """Drops the record fake tensors log when an operator fails on them ("failed while attempting
    to run meta for aten.mm.default", with the whole traceback); the exception that follows it
    carries the same reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed while attempting to run meta")


@contextlib.contextmanager
def _meta_failures_unlogged():
    """Within the block, torch's fake-tensor logger does not print an operator's failure (a
    model's shapes that do not fit: ``x @ w`` with the wrong inner size). torch logs it at ERROR
    with its traceback through a handler of its own (not redirected with stderr), and then raises
    the error, which capture turns into its one line; the log came first, some twenty lines of
    torch's internals. Only that record is dropped; the logger is as it was after."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    dropped = _MetaFailure()
    log.addFilter(dropped)
    try:
        yield
    finally:
        log.removeFilter(dropped)


def _mark_names(x: torch.Tensor) -> list[str]:
    """The attributes by which torch marks a tensor's dimensions dynamic or static (torch._dynamo's
    ``mark_dynamic`` and its kin, and torch.export from ``dynamic_shapes``: ``_dynamo_*``,
    ``_has_dynamo_dim_marking``, ``_specialize_on``) that ``x`` has."""
    return [name for name in vars(x) if name.startswith("_dynamo") or name in ("_has_dynamo_dim_marking", "_specialize_on")]


@contextlib.contextmanager
def _markings_kept(args: tuple, kwargs: dict, *, static: bool):
    """Within the block torch.export runs on the example; after it, whatever happened, every tensor
    input's dimension marks are as they were before (``static``: none meanwhile, so that the
    export is static). torch.export (2.13, non-strict) marks the example's tensors from
    ``dynamic_shapes`` (``Dim.AUTO`` becomes ``_dynamo_weak_dynamic_indices``) and removes the
    marks only when it succeeds, a caller's own (``torch._dynamo.mark_dynamic``) with its own;
    and it traces marked dimensions as dynamic even without ``dynamic_shapes``. So after a failed
    dynamic capture the static one traced the same tensors as dynamic and failed the same way (a
    model taking numpy over its length: "loop of ufunc does not support argument 0 of type
    float"), and the caller's tensors kept the marks for whatever traced them next."""
    tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    saved = [{name: copy.copy(getattr(x, name)) for name in _mark_names(x)} for x in tensors]

    def mark(x: torch.Tensor, marks: dict) -> None:
        for name in _mark_names(x):
            delattr(x, name)
        for name, value in marks.items():
            setattr(x, name, value)

    try:
        if static:
            for x in tensors:
                mark(x, {})
        yield
    finally:
        for x, marks in zip(tensors, saved):
            mark(x, marks)


@contextlib.contextmanager
def _var_keywords_named(model: torch.nn.Module, kwargs: dict):
    """Within the block, ``model.forward`` is the model's forward with every input of ``kwargs``
    that reaches it through its ``**kwargs`` named in its signature (a keyword-only parameter, and
    no ``**kwargs``); as it was again after. torch.export (2.13, non-strict) binds the example and
    the dynamic shapes to the forward's signature twice, once with such inputs inside ``kwargs``
    and once beside it, and fails on the mismatch ("Must provide a tree_name when there might be a
    mismatch", pytorch/pytorch#150022): transformers 5 takes ``return_dict``,
    ``output_hidden_states`` and ``output_attentions`` through ``**kwargs``, so a model called with
    any of them was captured with static shapes. With the inputs named, the program takes the same
    call by the same names (flags specialised to their values, tensors as inputs). The forward
    wrapped is the instance's own (a hook's replacement, as accelerate installs, stays in place)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None
    params = list(signature.parameters.values()) if signature is not None else []
    var_keyword = next((p for p in params if p.kind is p.VAR_KEYWORD), None)
    through = [name for name in kwargs if name not in signature.parameters] if var_keyword is not None else []
    if not through:
        yield
        return
    forward, own = model.forward, model.__dict__.get("forward")

    def named(*args, **kw):
        return forward(*args, **kw)

    named.__signature__ = signature.replace(
        parameters=[p for p in params if p is not var_keyword]
        + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in through])
    model.forward = named
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


TOKEN_INPUTS = ("input_ids", "decoder_input_ids")


def fixed_lengths(ep: ExportedProgram) -> dict[str, int]:
    """The token-id inputs (transformers' ``input_ids``, ``decoder_input_ids``: [batch, length])
    whose length the dynamic capture left fixed, with that length: torch.export keeps a size
    dynamic unless the model's code depends on it (Jamba's Mamba layers loop over the tokens)."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    fixed = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in TOKEN_INPUTS:
            val = node.meta.get("val")
            # (a size export specialised while tracing is a SymInt whose expression is a constant)
            if isinstance(val, torch.Tensor) and val.dim() == 2 and is_concrete_int(val.shape[1]) \
                    and int(val.shape[1]) > 1:
                fixed[node.name] = int(val.shape[1])
    return fixed


def _warn_fixed_length(ep: ExportedProgram) -> None:
    fixed = fixed_lengths(ep)
    if fixed:
        said = ", ".join(f"{name} of {n} tokens" for name, n in fixed.items())
        warnings.warn(f"the program takes {said} only: torch.export fixed the length (the model's code depends on it), "
                      "so calibration samples and inputs must have that length", stacklevel=3)


def _unaliased(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example with every tensor that shares memory with an earlier one (the same tensor given
    twice, ``model(ids, labels=ids)`` or ``decoder_input_ids=input_ids``) replaced by a copy.
    torch.export (non-strict) merges aliased inputs: the program reads one of them in place of the
    other, and computes the wrong thing when they differ (cross-attention then looked like
    self-attention)."""
    seen: set = set()

    def copy_if_seen(x):
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return x
        key = (x.device, x.untyped_storage().data_ptr())
        if key in seen:
            return x.clone()
        seen.add(key)
        return x

    return pytree.tree_map(copy_if_seen, (args, kwargs))


def _batch_of_two(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The example repeated to batch 2 when every tensor in it has a leading dimension of 1 and
    the model is in eval mode (the check runs it: no dropout, no running statistics updated), else
    None."""
    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    if not leaves or any(x.dim() == 0 or x.shape[0] != 1 for x in leaves):
        return None
    if not _may_run(model):
        return None
    return pytree.tree_map(lambda x: x.detach().repeat(2, *[1] * (x.dim() - 1)) if isinstance(x, torch.Tensor) else x,
                           (args, kwargs))


def _may_run(model: torch.nn.Module) -> bool:
    """Whether capture may run the model on the example to check it: in eval mode (no dropout, no
    running statistics updated). A GraphModule computes what was traced whatever its flag says
    (torch.export's unlifted modules, such as rewrite's results, have it set and refuse train())."""
    return isinstance(model, torch.fx.GraphModule) or not any(m.training for m in model.modules())


def _capture_batch_of_two(model, args, kwargs, wide_args, wide_kwargs) -> _Widened:
    """The program captured at batch 2, kept (``reason`` None) if it reproduces the model at the
    example's batch of one, else why not (:class:`_Widened`)."""
    try:
        ep = _export(model, wide_args, wide_kwargs, dynamic=True)
    except Exception as exc:  # noqa: BLE001
        unsupported = _not_about_shapes(model, exc)
        if unsupported is not None:
            raise CaptureError(unsupported) from exc
        return _Widened(None, f"capture at batch 2 failed: {_first_line(exc)}")
    expected = _model_outputs(model, args, kwargs)
    with torch.no_grad():
        try:
            got = ep.module()(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            return _Widened(ep, f"the program captured at batch 2 fails at batch 1: {_first_line(exc)}", expected)
    if not _same_outputs(expected, got):
        return _Widened(ep, "the program captured at batch 2 does not reproduce the model's outputs at batch 1",
                        expected, got)
    return _Widened(ep, None, expected, got)


def _output_name(path) -> str:
    """An output's place in the model's outputs: ``logits``, ``past_key_values.0``, ``output 1``."""
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    if not keys:
        return "the output"
    return ".".join(keys) if not keys[0].isdigit() else "output " + ".".join(keys)


def _same_outputs(expected: Any, got: Any) -> bool:
    return _output_difference(expected, got) is None


def _output_difference(expected: Any, got: Any) -> str | None:
    """How ``got`` differs from ``expected`` in a few words, or None where they agree: the same
    pytree structure, tensors of the same shape and dtype with values within rounding (relative
    to the largest magnitude: the same ops at the same shapes), other leaves equal."""
    exp_leaves, exp_spec = pytree.tree_flatten_with_path(expected)
    got_leaves, got_spec = pytree.tree_flatten(got)
    if exp_spec != got_spec:
        return "outputs of another structure"
    for (path, e), g in zip(exp_leaves, got_leaves):
        where = _output_name(path)
        if isinstance(e, torch.Tensor) != isinstance(g, torch.Tensor):
            return f"{where} is {type(g).__name__}, not {type(e).__name__}"
        if not isinstance(e, torch.Tensor):
            if e != g:
                return f"{where} is {g!r}, not {e!r}"
            continue
        if e.shape != g.shape or e.dtype != g.dtype:
            return f"{where} is {g.dtype} {list(g.shape)}, not {e.dtype} {list(e.shape)}"
        if not (e.is_floating_point() or e.is_complex()):
            if not torch.equal(e, g):
                return f"{where} differs"
            continue
        scale, worst = _largest_and_difference(e.detach(), g.detach())
        if worst is None:  # (a value finite in one and not in the other)
            return f"{where} is finite where the model's is not, or the other way round"
        tol = (1e-4 if e.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128) else 2e-2)
        if worst > tol * max(scale, 1e-6):
            return f"{where} differs by up to {worst:.3g} where the model's largest value is {scale:.3g}"
    return None


# elements compared at a time: a language model's logits at 8K tokens are 400 M floats (1.6 GB),
# and float64 copies of both, whole, with their temporaries took ~22 GB
_COMPARE_ELEMENTS = 1 << 22


def _largest_and_difference(e: torch.Tensor, g: torch.Tensor) -> tuple[float, float | None]:
    """(the largest finite |e|, the largest |e − g| over e's finite entries) in double precision,
    piece by piece; (…, None) when e and g are not finite at the same entries."""
    wide = torch.complex128 if e.is_complex() else torch.float64
    e, g = e.reshape(-1), g.reshape(-1)
    scale = worst = 0.0
    for i in range(0, e.numel(), _COMPARE_ELEMENTS):
        a, b = e[i:i + _COMPARE_ELEMENTS].to(wide), g[i:i + _COMPARE_ELEMENTS].to(wide)
        finite = a.isfinite()
        if not torch.equal(finite, b.isfinite()):
            return scale, None
        a, b = torch.where(finite, a, 0), torch.where(finite, b, 0)
        scale = max(scale, a.abs().max().item())
        worst = max(worst, (a - b).abs().max().item())
    return scale, worst


def _first_line(exc: Exception) -> str:
    message = str(exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__


def _not_about_shapes(model: torch.nn.Module, exc: Exception) -> str | None:
    """The one-line reason when torch.export failed for a reason that capturing at other shapes
    cannot mend, else None:

    - the model returns an object a graph cannot return ("Found <class 'X'> in output, which is
      not a known type"); transformers' KV caches are the usual case: a language model called
      without ``use_cache=False`` returns a ``DynamicCache``;
    - the model runs FlexAttention (transformers' ``attn_implementation="flex_attention"``), which
      torch.export fails on here ("FlexAttention does not support backward on CPU", or an error
      inside its block-mask code) and which the rewrite would not take anyway (``find_attention``
      reports it); a model that calls FlexAttention itself (diffusers' AnyFlow-FAR) has no
      ``attn_implementation`` to switch: captured without gradients, its other sites rewrite."""
    import re

    found = re.search(r"Found <class '([^']+)'> in output", str(exc))
    if found is not None:
        name = found.group(1)
        hint = ("a KV cache: call the model with use_cache=False" if "cache" in name.rsplit(".", 1)[-1].lower() else
                "register it with torch's pytree (torch.export.register_dataclass for a dataclass), or return tensors")
        return f"torch.export could not capture {type(model).__name__}: its output holds a {name}, which a graph " \
               f"cannot return ({hint})"
    flex = any(getattr(getattr(m, "config", None), "_attn_implementation", None) == "flex_attention"
               for m in model.modules())
    if flex:
        return f"torch.export could not capture {type(model).__name__}, which runs FlexAttention " \
               f"({_first_line(exc)}): load it with attn_implementation=\"sdpa\" or \"eager\", the same " \
               "attention, which mta-rewrite rewrites (FlexAttention it would not)"
    if "FlexAttention" in str(exc):  # (not through transformers: a diffusers model, a module's own call)
        hint = ("capture it without gradients (under torch.no_grad(), or its parameters requires_grad_(False): "
                "FlexAttention has no backward on the CPU); its FlexAttention then stays exact (a flex site) and "
                "its other attention can be rewritten") if "backward on CPU" in str(exc) else \
            "mta-rewrite does not rewrite FlexAttention (a flex site); the same attention through " \
            "scaled_dot_product_attention it rewrites"
        return f"torch.export could not capture {type(model).__name__}, which runs FlexAttention ({_first_line(exc)}): {hint}"
    return None
