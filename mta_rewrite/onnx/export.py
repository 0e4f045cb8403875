"""export_onnx and onnx_session: rewritten models as ONNX that stock onnxruntime runs.

``torch.onnx.export(dynamo=True)`` with a custom translation for ``mta.attention``: each site
becomes one ``mta::MultiTokenAttention`` node (its configuration as attributes;
``mta::MultiTokenAttentionLearned``, with the summary weight as a fifth input, for learned
summaries). Its
FunctionProto (``function.py``) is attached afterwards with the model's opset imports, so
onnxruntime inlines it where no native kernel is registered for the op. Sites that share one
mask (a transformers model's layers) then recognise it once: one ``mta::SimplifyMask`` node
(``mta::SimplifyBoolMask`` on the bool mask itself, when the model built one), and
``mta::MultiTokenAttentionPrepared`` sites (:func:`share_mask_preparation`). ``export_onnx``
also takes an ``ExportedProgram`` (``mta-rewrite export`` on a saved program).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx.defs import OpSchema
from torch.utils import _pytree as pytree
from onnxscript import opset18 as op
from onnxscript import values

from ..api import example_inputs, rewrite
from ..passes.lower import EXACT_CHUNK
from ..calls import example_call
from ..capture import _first_line, capture, library_logs_quiet
from ..config import Boundaries, MTAConfig, Plan, atomic_write
from .complex import complex_as_pairs
from .function import (
    CLUSTERED_OP_TYPE,
    DOMAIN,
    LEARNED_OP_TYPE,
    OP_TYPE,
    PREPARED_OP_TYPE,
    SEGMENTED_LEARNED_OP_TYPE,
    SEGMENTED_OP_TYPE,
    SEGMENTED_PREPARED_OP_TYPE,
    SUMMARY_LOGITS_OP_TYPE,
    SIMPLIFY_BOOL_OP_TYPE,
    SIMPLIFY_OP_TYPE,
    VERSION,
    function_protos,
    mta_opset,
)

_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]


# a site's op type → (input index of the summary weight, input index of the segment ids), None where it has none
SITE_OPS = {OP_TYPE: (None, None), LEARNED_OP_TYPE: (4, None), SEGMENTED_OP_TYPE: (None, 4),
            SEGMENTED_LEARNED_OP_TYPE: (5, 4)}


# optional: models exported before it (and every site without a soft-cap) leave it out
_SOFTCAP = OpSchema.Attribute("softcap", onnx.helper.make_attribute("softcap", 0.0),
                              "soft-cap of the logits' product terms, softcap·tanh(s / softcap); 0: none")


def _schema(op_type: str = OP_TYPE) -> OpSchema:
    p = OpSchema.FormalParameter
    a = OpSchema.Attribute
    weight_at, segments_at = SITE_OPS[op_type]
    extra = {weight_at: p("summary_weight", "W"), segments_at: p("segment_ids", "I")}
    inputs = [p("q", "T"), p("k", "T"), p("v", "T"), p("mask", "M")] + [extra[i] for i in sorted(i for i in extra if i)]
    return OpSchema(
        op_type, DOMAIN, VERSION,
        doc="Multi-Token Attention (mta-rewrite, MTA_SPEC.md)" + (" with learned summaries" if weight_at else "")
            + (" with boundary chunks" if segments_at else "") + "; the model carries its function body.",
        inputs=inputs,
        outputs=[p("out", "T")],
        type_constraints=[("T", _TYPES, "q, k, v and the output"), ("M", _TYPES, "additive mask")]
        + ([("W", _TYPES, "summary weight [Hkv, d]")] if weight_at else [])
        + ([("I", ["tensor(int64)", "tensor(int32)"], "segment ids [B, n]")] if segments_at else []),
        attributes=[
            a("chunk_size", OpSchema.AttrType.INT, "tokens per chunk"),
            a("causal", OpSchema.AttrType.INT, "1: causal"),
            a("scale", OpSchema.AttrType.FLOAT, "scale of q·k"),
            a("local_chunks", OpSchema.AttrType.INT, "local window in chunks"),
            a("sinks", OpSchema.AttrType.INT, "always-exact first tokens"),
            a("top_k", OpSchema.AttrType.INT, "exactly attended chunks per query chunk"),
            _SOFTCAP,
        ],
    )


def _clustered_schema() -> OpSchema:
    p = OpSchema.FormalParameter
    a = OpSchema.Attribute
    return OpSchema(
        CLUSTERED_OP_TYPE, DOMAIN, VERSION,
        doc="Multi-Token Attention with clustered summaries (mta-rewrite, non-causal); the model carries its function body.",
        inputs=[p("q", "T"), p("k", "T"), p("v", "T"), p("mask", "M"), p("centroids", "W")],
        outputs=[p("out", "T")],
        type_constraints=[("T", _TYPES, "q, k, v and the output"), ("M", _TYPES, "additive key-padding mask"),
                          ("W", _TYPES, "centroids [Hkv, K, d]")],
        attributes=[
            a("chunk_size", OpSchema.AttrType.INT, "tokens per chunk"),
            a("scale", OpSchema.AttrType.FLOAT, "scale of q·k"),
            a("local_chunks", OpSchema.AttrType.INT, "local window in chunks"),
            a("sinks", OpSchema.AttrType.INT, "always-exact first tokens"),
            _SOFTCAP,
        ],
    )


for _op_type in SITE_OPS:
    if not onnx.defs.has(_op_type, DOMAIN):
        onnx.defs.register_schema(_schema(_op_type))
if not onnx.defs.has(CLUSTERED_OP_TYPE, DOMAIN):
    onnx.defs.register_schema(_clustered_schema())
_CLUSTERED_OP = values.Op(mta_opset, CLUSTERED_OP_TYPE, onnx.defs.get_schema(CLUSTERED_OP_TYPE, VERSION, DOMAIN))
SITE_OP_TYPES = tuple(SITE_OPS)
# what a site is after export: its op, the op on a prepared (shared) mask, or the clustered op
# (which reads its mask as key padding and does not share a recognition)
ALL_SITE_OP_TYPES = (*SITE_OP_TYPES, PREPARED_OP_TYPE, SEGMENTED_PREPARED_OP_TYPE, CLUSTERED_OP_TYPE)
# (learned, segmented) → the op that the exporter's translation emits
_SITE_OP = {(bool(w), bool(g)): values.Op(mta_opset, t, onnx.defs.get_schema(t, VERSION, DOMAIN))
            for t, (w, g) in SITE_OPS.items()}


def _translate(q, k, v, attn_mask=None, summary_weight=None, segment_ids=None, centroids=None, *, chunk_size,
               causal=False, scale=None, local_chunks=1, sinks=0, top_k=0, softcap=0.0):
    """torch.ops.mta.attention → one mta::MultiTokenAttention node (…Learned with a summary weight,
    …Segmented with segment ids, …SegmentedLearned with both; the exporter's custom translation)."""
    if scale is None:
        d = q.shape[-1] if q.shape is not None else None
        if not isinstance(d, int):
            raise ValueError("the head size must be static to export an MTA site with the default scale")
        scale = 1.0 / math.sqrt(d)
    if attn_mask is None:
        mask = op.Constant(value_floats=[0.0])
        mask = op.Reshape(mask, op.Constant(value_ints=[1, 1, 1, 1]))
    else:
        rank = len(attn_mask.shape) if attn_mask.shape is not None else 4
        dtype = attn_mask.dtype
        if rank < 4:
            attn_mask = op.Unsqueeze(attn_mask, op.Constant(value_ints=list(range(4 - rank))))
        if dtype is not None and dtype == onnx.TensorProto.BOOL or str(dtype).upper().endswith("BOOL"):
            # (the Where feeds the site directly: share_mask_preparation hands the bool mask to
            # mta::SimplifyBoolMask instead)
            mask = op.Where(attn_mask, op.Constant(value_float=0.0), op.Constant(value_float=float("-inf")))
        else:
            # forbidden values (≤ the mask dtype's minimum) become −inf whatever the dtype
            fmin = op.CastLike(op.Constant(value_float=-65504.0), attn_mask) if _is_half(dtype) else None
            mask = op.Cast(attn_mask, to=onnx.TensorProto.FLOAT)
            if fmin is not None:
                mask = op.Where(op.LessOrEqual(attn_mask, fmin), op.Constant(value_float=float("-inf")), mask)
    if chunk_size >= EXACT_CHUNK and summary_weight is None and segment_ids is None and centroids is None:
        return _exact_attention(q, k, v, mask, causal=bool(causal), scale=float(scale), softcap=float(softcap))
    attrs = dict(chunk_size=int(chunk_size), causal=int(bool(causal)), scale=float(scale),
                 local_chunks=int(local_chunks), sinks=int(sinks), top_k=int(top_k))
    capped = {"softcap": float(softcap)} if softcap else {}
    if centroids is not None:
        if causal or top_k or summary_weight is not None or segment_ids is not None:
            raise ValueError("clustered summaries (centroids) are for non-causal attention without top_k, summary_weight "
                             "or segment_ids")
        return _CLUSTERED_OP(q, k, v, mask, centroids, chunk_size=attrs["chunk_size"], scale=attrs["scale"],
                             local_chunks=attrs["local_chunks"], sinks=attrs["sinks"], **capped)
    extra = [x for x in (segment_ids, summary_weight) if x is not None]
    return _SITE_OP[summary_weight is not None, segment_ids is not None](q, k, v, mask, *extra, **attrs, **capped)


def _exact_attention(q, k, v, mask, *, causal: bool, scale: float, softcap: float = 0.0):
    """A one-chunk op call (an exact site of a rewritten program, ``rewrite(lower_exact=True)``, or
    the exact group of a per-head plan) as plain attention in standard ONNX ops: softmax(scale·qkᵀ
    + mask [+ the causal triangle]) v, k and v repeated to q's heads for GQA (scale·qkᵀ soft-capped
    first, softcap·tanh(· / softcap), for ``softcap`` > 0). ``mask``: the float
    mask ``_translate`` prepared (−inf forbidden); values at float32's minimum (transformers'
    masks) count as forbidden too, and a query with nothing to attend to outputs zeros, the op's
    rule. The MTA function would run the chunk machinery around one whole-sequence key set: 5×
    slower in onnxruntime on all-MiniLM-L6-v2's sites (2 × 512 tokens, CPU)."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    if hq != hkv:
        if not all(isinstance(x, int) for x in (hq, hkv, d)):
            raise ValueError("the head counts and size must be static to export an exact GQA site")
        reps, to_q_heads = op.Constant(value_ints=[1, 1, hq // hkv, 1, 1]), op.Constant(value_ints=[0, hq, -1, d])
        k, v = (op.Reshape(op.Expand(op.Unsqueeze(x, op.Constant(value_ints=[2])), reps), to_q_heads) for x in (k, v))
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), q))
    if softcap:
        cap = op.CastLike(op.Constant(value_float=softcap), scores)
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    bias = op.Where(op.LessOrEqual(mask, op.Constant(value_float=float(np.finfo(np.float32).min))),
                    op.Constant(value_float=float("-inf")), mask)
    if causal:
        n = op.Shape(q, start=2, end=3)
        above = op.Trilu(op.ConstantOfShape(op.Concat(n, n, axis=0), value=onnx.helper.make_tensor(
            "neg_inf", onnx.TensorProto.FLOAT, [1], [float("-inf")])), op.Constant(value_int=1), upper=1)
        bias = op.Add(bias, above)
    probs = op.Softmax(op.Add(scores, op.CastLike(bias, scores)), axis=-1)
    out = op.MatMul(probs, v)
    return op.Where(op.IsNaN(out), op.CastLike(op.Constant(value_float=0.0), out), out)


def _all_true(x):
    """``aten._is_all_true`` (whether every element of a bool tensor is true: a bool scalar), which
    torch.onnx has no translation for. transformers' input checks put it in the graphs of
    vision-language models (``torch_compilable_check``: "Image features and image tokens do not
    match"), and until 2026-12-07 ``export_onnx`` of Gemma-3, PaliGemma or Idefics3 with images
    failed at torch.onnx's step 3. The minimum of the elements as integers (an empty tensor's is the
    largest integer: true, as ``all`` of nothing)."""
    return op.Cast(op.ReduceMin(op.Cast(x, to=onnx.TensorProto.INT32), keepdims=0), to=onnx.TensorProto.BOOL)


def _is_half(dtype) -> bool:
    name = str(dtype).upper()
    return "FLOAT16" in name or "BFLOAT16" in name


# the functions' bodies use opset 18's operators (ReduceMean with axes as an input, …)
MIN_OPSET = 18


def model_opset(proto: onnx.ModelProto) -> int | None:
    """The model's opset of the default (ai.onnx) domain, or None if it imports none."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(
    model: torch.nn.Module,
    args: Any,
    path,
    kwargs: dict | None = None,
    *,
    config: MTAConfig | None = None,
    plan: Plan | None = None,
    boundaries: Boundaries | None = None,
    dynamic: bool = True,
    opset: int | None = None,
) -> onnx.ModelProto:
    """Export ``model`` to ONNX at ``path`` (atomically). With ``config`` or ``plan`` the model is
    rewritten first; a model without MTA sites (the original, exact) exports too. Every MTA site
    is one ``mta::MultiTokenAttention`` node and the model carries its function. Batch and
    sequence length are dynamic (``dynamic=True``; a module is captured by :func:`capture`, which
    widens an example of one sequence to two; a program keeps the shapes it was captured with).
    Inputs keep the forward's parameter names, outputs are named by :func:`output_names`. Weights
    over :data:`EXTERNAL_DATA_ABOVE` (1.5 GB) are written beside the model, in ``<path>.data``, and
    the ModelProto returned refers to them there."""
    if isinstance(model, torch.export.ExportedProgram) and not args and not kwargs:
        args, kwargs = example_inputs(model)  # (what rewrite and a recapture of its tensor outputs run)
    args, kwargs = example_call(model, args, kwargs)
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"path must be the ONNX file to write (a str or os.PathLike), got {type(path).__name__} "
                        f"{path!r}: export_onnx(model, args, path, kwargs)")  # (was found after the export)
    newest = onnx.defs.onnx_opset_version()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest):
        raise ValueError(f"opset must be from {MIN_OPSET} (the mta functions are written with opset {MIN_OPSET}'s "
                         f"operators) to {newest} (the newest this onnx knows), got {opset!r}")
    if config is not None or plan is not None:
        model = rewrite(model, args, kwargs, config=config, plan=plan, boundaries=boundaries, dynamic=dynamic,
                        lower_exact=False)  # exact sites stay plain attention in the ONNX graph
    elif boundaries is not None:
        raise ValueError("boundaries apply when rewriting: give config= or plan= too")
    if not isinstance(model, torch.export.ExportedProgram):
        # captured here, not by torch.onnx: capture widens an example of one sequence to a batch of
        # two (torch.onnx's own capture of a batch of one gave a graph that claimed a dynamic batch
        # and failed at batch 3 in onnxruntime); a program exports with the shapes it was captured with
        model = capture(model, args, kwargs, dynamic=dynamic)
    model, args, kwargs = _tensor_outputs(model, args, kwargs, dynamic)
    import warnings

    with warnings.catch_warnings(), library_logs_quiet(), keep_small_constants(), contiguous_as_copies(model), \
            complex_as_pairs(model):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, args, kwargs=kwargs, dynamo=True, opset_version=opset,
            custom_translation_table={torch.ops.mta.attention.default: _translate,
                                      torch.ops.aten._is_all_true.default: _all_true}, verbose=False,
        )
    got = model_opset(program.model_proto)
    if opset is not None and got != opset:  # torch.onnx falls back to its own opset when conversion fails
        raise ValueError(f"torch.onnx exported opset {got}, not the opset {opset} asked for (its version converter "
                         "could not convert the model)")
    name_values(program.model, model)
    proto = attach_function(program.model_proto)
    if _weights_size(proto) <= EXTERNAL_DATA_ABOVE:
        _check(proto)
        stale = _replaced_weights(Path(path))
        atomic_write(path, lambda tmp: onnx.save(proto, tmp, format="protobuf"))  # (whatever the name ends in)
        if stale is not None:
            stale.unlink(missing_ok=True)
    else:  # the weights in a file beside the model (protobuf serialises no message over 2 GB)
        atomic_write(path, lambda tmp: _save_with_external_data(proto, tmp), companions=True)
    if _holds_bfloat16(proto):
        warnings.warn(f"{path} computes in bfloat16: onnxruntime's CPU provider has no bfloat16 kernels of common "
                      "operators such as Mul; for the CPU, export the model in float32 (capture --dtype float32)", stacklevel=2)
    return proto


# weights above this size are saved beside the model, in ``<model file name>.data`` (ONNX external
# data): protobuf cannot serialise a message over 2 GB ("Failed to serialize proto": a float32
# Llama of 582M parameters could not be exported); the threshold is torch.onnx's own for the same choice
EXTERNAL_DATA_ABOVE = 1536 * 1024 * 1024


def _weights_size(proto: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (torch.onnx writes them as raw data)."""
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def _check(model: onnx.ModelProto | str) -> None:
    """onnx's full check (shape inference included) of a model or of a model's file (one whose
    weights are external data: the checker reads them beside it), as a one-line ValueError."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = _first_line(exc)
        hint = (" (the model computes in bfloat16, which that ONNX operator does not take: export it in float32, "
                "e.g. capture --dtype float32)") if "bfloat16" in first else ""
        raise ValueError(f"torch.onnx wrote a model that onnx's checker refuses: {first}{hint}") from None


def _replaced_weights(path: Path) -> Path | None:
    """The weights file beside ``path`` (``<name>.data``) that the model now at ``path`` reads, where
    an export of a model that keeps its weights inside will replace that model: removed once the
    new model is in place (nothing reads it then; until 2026-12-07 it was left, gigabytes beside
    the new model). None where there is none, or the file at ``path`` is not an ONNX model reading
    it (a file of anyone else's is left)."""
    beside = path.with_name(path.name + ".data")
    if not (beside.is_file() and path.is_file()):
        return None
    try:
        replaced = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001  (not an ONNX model: its .data is not ours to remove)
        return None
    read = {entry.value for tensor in replaced.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location"}
    return beside if read == {beside.name} else None


def _save_with_external_data(proto: onnx.ModelProto, tmp: str) -> None:
    """Save ``proto`` at ``tmp`` with its weights in one file beside it, ``<name>.data``, and check
    the file: the proto keeps the references (its weights' bytes are dropped as they are written)."""
    onnx.save(proto, tmp, format="protobuf", save_as_external_data=True, all_tensors_to_one_file=True,
              location=Path(tmp).name + ".data", size_threshold=1024)
    _check(tmp)


# the grouped matrix products of transformers' mixture-of-experts layers (float32: its own fallback
# operator, which has no translation; half types: aten's, whose translation refuses offsets)
GROUPED_EXPERTS_OPS = ("transformers.grouped_mm_fallback", "aten._grouped_mm")


def exporter_failure(exc: BaseException) -> str:
    """One line saying why torch.onnx failed: its message opens with generic advice (and terminal
    colour codes) and names the cause further down. An operator without an ONNX translation is
    named, one whose translation failed too, with that failure; for the grouped products of
    transformers' mixture-of-experts layers, with the way round them. Else the first line of its
    exception summary."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    summary = text.split("## Exception summary", 1)
    lines = [line.strip() for line in (summary[1] if len(summary) > 1 else text).splitlines() if line.strip()]
    first = re.sub(r"<class '(?:[\w.]*\.)?(\w+)'>", r"\1", lines[0]).rstrip(".") if lines else type(exc).__name__
    missing = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='[^']*'\)>"
                        r"(?:\. Failure message: ([^\n]+))?", text)
    failed = re.search(r"Error when translating node %\S+ : .*?target=torch\.ops\.([\w.]+?)(?:\.default)?\]", text)
    if missing:
        op, why = missing.groups()
        reason = f"it has no ONNX translation for the operator {op}"
        if why and "real-valued" not in why:  # (said of every operator; "complex-valued" is worth saying)
            reason += f" ({why.strip().rstrip('.')})"
    elif failed:
        op = failed.group(1)
        reason = f"its translation of the operator {op} failed: {first}"
    else:
        return first
    if op in GROUPED_EXPERTS_OPS:
        reason += ("; it computes transformers' mixture-of-experts layers: capture the model with --experts batched_mm "
                   "(experts_implementation=\"batched_mm\" in transformers), whose products export, gathering every "
                   "token's expert weights (memory grows with tokens × experts per token × an expert's size)")
    return reason


@functools.cache
def _lossy_rules() -> frozenset[int]:
    """The rules (by id) of onnxscript's default rewrites that delete ``Add(x, c)`` or ``Sub(x, c)``
    for a small nonzero ``c``: its no-op rules match their constant 0 within an absolute tolerance
    of 1e-8, so the epsilon of an RMSNorm, ``rsqrt(mean(x²) + 1e-8)`` (Helium's), went with them
    and a zero row (a padding token's embedding) gave inf, then NaN through the whole sequence.
    Found by applying each rule to a one-node model, not by the rules' private fields."""
    import onnx_ir as ir
    from onnxscript import rewriter

    def one_node(op_type: str, constant_first: bool):
        c = onnx.helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.array(1e-8, np.float32)))
        node = onnx.helper.make_node(op_type, ["c", "x"] if constant_first else ["x", "c"], ["y"])
        graph = onnx.helper.make_graph([c, node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                                       [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
        return ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]))

    lossy = set()
    for rule in getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()):
        if any(rule.apply_to_model(one_node(op_type, first)) for op_type, first in
               (("Add", False), ("Add", True), ("Sub", False))):
            lossy.add(id(rule))
    return frozenset(lossy)


@contextlib.contextmanager
def keep_small_constants():
    """torch.onnx's optimisation (onnxscript's default rewrites) without the rules that delete
    the addition of a small constant (:func:`_lossy_rules`); the others run as they do."""
    from onnxscript import rewriter

    saved = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if saved is None:
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if id(r) not in _lossy_rules())
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved


@contextlib.contextmanager
def contiguous_as_copies(program: torch.export.ExportedProgram):
    """The program's ``aten.contiguous`` calls as copies (``aten.clone`` to the same memory
    format) while torch.onnx exports it, then as they were. torch.onnx's decompositions drop a
    ``contiguous()`` they think a no-op and leave the ``view`` after it reading a transposed
    tensor ("Cannot view a tensor with shape …"): an SDPA site given a float mask failed so
    whenever it was left as it is (T5's, Swin's and BEiT's position biases; pytorch#136543 is
    the same fault). ONNX has no strides: the copy exports as nothing."""
    aten = torch.ops.aten
    swapped = [(node, node.kwargs) for node in program.graph.nodes
               if node.op == "call_function" and node.target is aten.contiguous.default]
    for node, kwargs in swapped:
        node.target = aten.clone.default
        node.kwargs = {"memory_format": kwargs.get("memory_format", torch.contiguous_format)}
    if swapped:
        program.graph_module.recompile()
    try:
        yield
    finally:
        for node, kwargs in swapped:
            node.target, node.kwargs = aten.contiguous.default, kwargs
        if swapped:
            program.graph_module.recompile()


class _TensorOutputs(torch.nn.Module):
    """A program's module whose outputs are its tensors only, by name (:func:`output_names`). Its
    forward has the module's signature, so the ONNX inputs keep their names (``input_input_ids``,
    not ``args_0_input_ids``)."""

    def __init__(self, module: torch.nn.Module, names: list[str]):
        super().__init__()
        self.module = module

        def forward(*args, **kwargs):
            leaves = pytree.tree_leaves(self.module(*args, **kwargs))
            return {name: leaf for name, leaf in zip(names, leaves) if isinstance(leaf, torch.Tensor)}

        forward.__signature__ = inspect.signature(module.forward)
        self.forward = forward


def _tensor_outputs(program: torch.export.ExportedProgram, args: tuple, kwargs: dict, dynamic: bool):
    """(program, args, kwargs) to export: ``program``, or where its outputs hold values that are not
    tensors (constants such as sentence-transformers' ``"modality": "text"``, which an ONNX graph
    cannot output) the program of its tensor outputs only, named as they would be, with a warning
    naming what is left out. Until 2026-12-07 torch.onnx failed on them, a ConversionError of
    several screens ("'str' object has no attribute 'name'"): a SentenceTransformer did not export."""
    import warnings

    from torch.export.graph_signature import ConstantArgument, OutputKind

    outputs = [spec.arg for spec in program.graph_signature.output_specs if spec.kind == OutputKind.USER_OUTPUT]
    names = output_names(program.call_spec.out_spec)
    constants = [(name, arg.value) for name, arg in zip(names, outputs) if isinstance(arg, ConstantArgument)]
    if not constants or len(names) != len(outputs):
        return program, args, kwargs
    shown = ", ".join(f"{name} ({value!r})" for name, value in constants[:4]) + (", …" if len(constants) > 4 else "")
    warnings.warn(f"the model's outputs {shown} are constants, not tensors: an ONNX graph outputs tensors only, and "
                  "the exported model leaves them out", stacklevel=3)
    module = _TensorOutputs(program.module(), names)
    return capture(module, args, kwargs, dynamic=dynamic), args, kwargs


def output_names(spec: pytree.TreeSpec) -> list[str]:
    """The names of a program's outputs, by their place in its output structure: a dict's or a
    model output's key (``logits``, ``last_hidden_state``), ``output_0``, ``output_1`` … for a
    tuple's items, nested places joined by dots (``hidden_states.2``, ``output_1.a``), ``output``
    for a lone tensor."""
    tree = pytree.tree_unflatten([torch.empty(0) for _ in range(spec.num_leaves)], spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(tree)[0]:
        parts = [str(k.key) if isinstance(k, pytree.MappingKey) else str(k.idx) if isinstance(k, pytree.SequenceKey)
                 else str(getattr(k, "name", k)) for k in path]
        name = ".".join(parts) or "output"
        names.append(f"output_{name}" if path and isinstance(path[0], pytree.SequenceKey) else name)
    return names


def name_values(model, program: torch.export.ExportedProgram) -> None:
    """Name the ONNX graph's outputs as the program's outputs are named (:func:`output_names`),
    instead of torch.onnx's names of the nodes that computed them (``linear_14``), and give back
    an input its own name where torch.onnx renamed it ``x_orig`` because the model also returns
    it. ``model`` is the exported ``ONNXProgram``'s IR model (renaming a value renames its uses).
    An input keeps its name when an output would take it (the output becomes ``…_output``); an
    intermediate value holding a name an output takes is renamed. Left as torch.onnx named them
    if the counts differ (an output that is not a tensor)."""
    graph = model.graph
    names = output_names(program.call_spec.out_spec)
    if len(names) != len(graph.outputs):
        return
    values = {v.name: v for v in (*graph.inputs, *graph.initializers.values(),
                                  *(out for node in graph for out in node.outputs)) if v.name}
    inputs, taken = {v.name for v in graph.inputs}, set()
    for value, name in zip(graph.outputs, names):
        while name in inputs or name in taken:
            name += "_output"
        taken.add(name)
        holder = values.get(name)
        if holder is not None and holder is not value:
            fresh = next(f"{name}_{i}" for i in range(1, len(values) + 2) if f"{name}_{i}" not in values)
            holder.name, values[fresh] = fresh, holder
        values.pop(value.name, None)
        value.name, values[name] = name, value
    for value in graph.inputs:  # torch.onnx's OutputFixPass renames an input the model returns x_orig
        stem = value.name.removesuffix("_orig")
        if stem != value.name and stem in program.graph_signature.user_inputs and stem not in values:
            del values[value.name]
            value.name, values[stem] = stem, value


def share_mask_preparation(graph: onnx.GraphProto) -> int:
    """Sites recognise their mask once per mask, not once per site, and from the bool mask where
    the model built one (``ops.masks.simplify_mask``'s check, run by onnxruntime):

    - sites that read the same float mask: one ``mta::SimplifyMask`` node before the first of
      them, each site an ``mta::MultiTokenAttentionPrepared`` on its outputs (the same function
      after the recognition; same attributes);
    - sites whose mask the export made from a bool mask (``Where(allowed, 0, −inf)``, see
      :func:`_translate`; every transformers model's mask), one site or many: one
      ``mta::SimplifyBoolMask`` node on the bool mask itself, and the ``Where`` goes when nothing
      else reads it: no float n×n mask is formed unless the mask is not recognised.

    Measured (onnxruntime CPU, 2-layer Llama at 4096 tokens): each site recognising the float mask
    cost 43 ms of 300; once per model, the recognition and the ``Where`` still took 45 and 53 ms
    of 190. Returns the number of recognition nodes added."""
    producers = {out: node for node in graph.node for out in node.output}
    sites: dict[tuple[bool, str], list[int]] = {}
    for i, node in enumerate(graph.node):
        if node.domain == DOMAIN and node.op_type in SITE_OP_TYPES:
            allowed = _bool_source(node.input[3], producers, graph)
            key = (True, allowed) if allowed is not None else (False, node.input[3])
            sites.setdefault(key, []).append(i)
    # (the [1, 1, 1, 1] zero that stands for "no mask" is recognised at no cost: left alone)
    no_mask = {t.name for t in graph.initializer if math.prod(t.dims) == 1}
    groups = {key: at for key, at in sites.items() if key[0] or (len(at) > 1 and key[1] not in no_mask)}
    if not groups:
        return 0
    taken = {name for node in graph.node for name in (*node.input, *node.output)}
    taken |= {v.name for v in (*graph.input, *graph.output, *graph.initializer)}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    prepared = {key: (fresh(f"{key[1]}_mta_prepared"), fresh(f"{key[1]}_mta_triangle")) for key in groups}
    mean_logit = None  # a zero: the per-key summary logit of mean summaries (one initializer for all sites)
    first = {at[0]: key for key, at in groups.items()}
    group_of = {i: key for key, at in groups.items() for i in at}
    bypassed = set()
    nodes = []
    for i, node in enumerate(graph.node):
        if i in first:
            key = first[i]
            nodes.append(onnx.helper.make_node(SIMPLIFY_BOOL_OP_TYPE if key[0] else SIMPLIFY_OP_TYPE, [key[1]],
                                               list(prepared[key]), domain=DOMAIN,
                                               name=fresh(f"{key[1]}_mta_simplify_mask")))
        if i in group_of:
            if group_of[i][0]:
                bypassed.add(node.input[3])
            weight_at, segments_at = SITE_OPS[node.op_type]
            if weight_at is not None:
                key_logit = fresh(f"{node.name}_summary_logits")
                nodes.append(onnx.helper.make_node(SUMMARY_LOGITS_OP_TYPE, [node.input[1], node.input[weight_at]],
                                                   [key_logit], domain=DOMAIN, name=fresh(f"{node.name}_summary_logits")))
            else:
                if mean_logit is None:
                    mean_logit = fresh("mta_mean_summary_logit")
                    graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, dtype=np.float32), mean_logit))
                key_logit = mean_logit
            inputs = [*node.input[:3], *prepared[group_of[i]], key_logit]
            if segments_at is not None:
                inputs.append(node.input[segments_at])
            site = onnx.helper.make_node(SEGMENTED_PREPARED_OP_TYPE if segments_at is not None else PREPARED_OP_TYPE,
                                         inputs, list(node.output), domain=DOMAIN, name=node.name)
            site.attribute.extend(node.attribute)
            node = site
        nodes.append(node)
    still_read = _names_read(nodes) | {v.name for v in graph.output}
    gone = bypassed - still_read
    dropped = [node for node in nodes if set(node.output) & gone]
    nodes = [node for node in nodes if not set(node.output) & gone]
    del graph.node[:]
    graph.node.extend(nodes)
    # the dropped Wheres' constants, if nothing else reads them (onnxruntime warns of unused ones)
    unread = {name for node in dropped for name in node.input} - _names_read(nodes) - {v.name for v in graph.output}
    kept = [t for t in graph.initializer if t.name not in unread]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(groups)


def _bool_source(mask: str, producers: dict, graph: onnx.GraphProto) -> str | None:
    """The bool mask ``mask`` was made from by ``Where(allowed, 0, −inf)`` (its allowed flags:
    a Where's condition is bool), or None."""
    node = producers.get(mask)
    if node is None or node.op_type != "Where" or node.domain not in ("", "ai.onnx"):
        return None
    if _scalar(node.input[1], producers, graph) == 0.0 and _scalar(node.input[2], producers, graph) == -math.inf:
        return node.input[0]
    return None


def _scalar(name: str, producers: dict, graph: onnx.GraphProto) -> float | None:
    """The value of a one-element initializer or Constant, or None."""
    tensor = next((t for t in graph.initializer if t.name == name), None)
    node = producers.get(name)
    if tensor is None and node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attribute[0]
        if attr.name == "value_float":
            return float(attr.f)
        tensor = attr.t if attr.name == "value" else None
    if tensor is None or math.prod(tensor.dims) != 1:
        return None
    return float(onnx.numpy_helper.to_array(tensor).reshape(()))


def _names_read(nodes) -> set[str]:
    """Every name the nodes read, their subgraphs' (If, Loop, Scan bodies) included."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [*attr.graphs, *([attr.g] if attr.HasField("g") else [])]:
                names |= _names_read(sub.node)
    return names


def attach_function(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Add the functions the graph's mta nodes use (and those they call), with the model's opset;
    sites that share a mask recognise it once (:func:`share_mask_preparation`)."""
    uses = any(n.domain == DOMAIN and n.op_type in ALL_SITE_OP_TYPES for n in proto.graph.node)
    if not uses or any(f.domain == DOMAIN for f in proto.functions):
        return proto
    share_mask_preparation(proto.graph)
    proto.functions.extend(_used(function_protos(model_opset(proto) or MIN_OPSET), proto.graph.node))
    if not any(o.domain == DOMAIN for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, VERSION))
    return proto


def _used(functions: list[onnx.FunctionProto], nodes) -> list[onnx.FunctionProto]:
    """The functions that ``nodes`` call, directly or through other functions, in their order."""
    by_name = {f.name: f for f in functions}
    wanted, todo = set(), _mta_calls(nodes)
    while todo:
        name = todo.pop()
        if name in by_name and name not in wanted:
            wanted.add(name)
            todo.extend(_mta_calls(by_name[name].node))
    return [f for f in functions if f.name in wanted]


def _mta_calls(nodes) -> list[str]:
    """The mta op types that ``nodes`` call, their subgraphs' (If, Loop, Scan bodies) included."""
    calls = []
    for node in nodes:
        if node.domain == DOMAIN:
            calls.append(node.op_type)
        for attr in node.attribute:
            for sub in [*attr.graphs, *([attr.g] if attr.HasField("g") else [])]:
                calls += _mta_calls(sub.node)
    return calls


def _holds_bfloat16(model) -> bool:
    """Whether the model's (a path or a ModelProto) inputs, outputs or weights are bfloat16
    (external data not read)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    bf16 = onnx.TensorProto.BFLOAT16
    values = list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info)
    return any(t.data_type == bf16 for t in proto.graph.initializer) or \
        any(v.type.tensor_type.elem_type == bf16 for v in values)


def onnx_session(path, device: str = "cpu", options=None):
    """An onnxruntime InferenceSession with the right providers. ``device="cuda"`` requires the
    CUDA provider to load (onnxruntime-gpu, a matching CUDA): otherwise a clear error, never a
    silent fallback to the CPU. ``options``: an ``onnxruntime.SessionOptions`` (threads, spinning,
    profiling), passed on as it is."""
    import onnxruntime as ort

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if not Path(path).is_file():
        raise ValueError(f"no such file: {path}")
    if device == "cpu":
        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if "NOT_IMPLEMENTED" not in first or not _holds_bfloat16(path):
                raise
            raise RuntimeError(f"onnxruntime's CPU provider cannot run {path}: {first} (the model computes in "
                               "bfloat16, for which that provider lacks kernels of common operators such as Mul: "
                               "export the model in float32 or float16, e.g. model.float() before export_onnx)") from None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("onnxruntime has no CUDA provider here: install onnxruntime-gpu (and a CUDA it supports), "
                           "or use device='cpu'")
    try:
        # (shape arithmetic on int64 runs on the CPU provider in any CUDA session; the check
        # below is about the CUDA provider itself failing to load)
        session = ort.InferenceSession(str(path), options, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"the CUDA provider could not run {path}: {str(exc).splitlines()[0]}") from None
    if "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError("the CUDA provider failed to load (missing CUDA or cuDNN libraries?); not falling back to the CPU")
    return session
