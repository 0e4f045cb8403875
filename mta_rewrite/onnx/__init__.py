"""ONNX export: MTA sites as ``mta::MultiTokenAttention`` nodes with a function body in
standard ONNX ops, so that stock onnxruntime (and onnxruntime-gpu) run them. Sites that share a
mask are ``mta::MultiTokenAttentionPrepared`` nodes after one ``mta::SimplifyMask`` node (or
``mta::SimplifyBoolMask``, on a mask the model built as bool). Sites with learned summaries are
``mta::MultiTokenAttentionLearned`` (the summary weight as a fifth input); with boundary chunks,
``mta::MultiTokenAttentionSegmented`` (segment ids as a fifth input) and
``mta::MultiTokenAttentionSegmentedLearned`` (segment ids, then the weight)."""

from .export import ALL_SITE_OP_TYPES, export_onnx, model_opset, onnx_session
from .function import (
    DOMAIN,
    LEARNED_OP_TYPE,
    OP_TYPE,
    PREPARED_OP_TYPE,
    SIMPLIFY_BOOL_OP_TYPE,
    SIMPLIFY_OP_TYPE,
    VERSION,
    function_proto,
    function_protos,
)

__all__ = ["ALL_SITE_OP_TYPES", "DOMAIN", "LEARNED_OP_TYPE", "OP_TYPE", "PREPARED_OP_TYPE", "SIMPLIFY_BOOL_OP_TYPE", "SIMPLIFY_OP_TYPE", "VERSION",
           "export_onnx", "function_proto", "function_protos", "model_opset", "onnx_session"]
