"""mta-rewrite: rewrite the attention of existing PyTorch models into Multi-Token Attention.

Importing the package registers ``torch.ops.mta.attention`` (MTA_SPEC.md).
"""

from .calibration import calibrate
from .api import count_mta_nodes, find_attention, load_module, load_program, rewrite, save_program
from .calls import record_calls
from .capture import CaptureError, capture
from .config import Boundaries, Clustered, HeadGroups, Learned, MTAConfig, Plan, PlanEntry
from .interface import use_mta
from .ops import attention, mta_attention_reference
from .passes.sites import AttentionSite

__version__ = "0.1.0"


def __getattr__(name):
    # ONNX support imports onnx and onnxscript: only when it is used
    if name in ("export_onnx", "onnx_session"):
        from . import onnx as _onnx

        return getattr(_onnx, name)
    raise AttributeError(f"module 'mta_rewrite' has no attribute {name!r}")

__all__ = [
    "AttentionSite", "Boundaries", "CaptureError", "Clustered", "HeadGroups", "Learned", "calibrate", "MTAConfig", "Plan", "PlanEntry", "attention", "capture",
    "count_mta_nodes", "export_onnx", "find_attention", "onnx_session", "load_module", "load_program", "mta_attention_reference", "record_calls", "rewrite", "save_program", "use_mta",
    "__version__",
]
