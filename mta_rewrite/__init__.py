"""mta-rewrite: rewrite the attention of existing PyTorch models into Multi-Token Attention.

Importing the package registers ``torch.ops.mta.attention`` (MTA_SPEC.md).
"""

from .calibration import calibrate
from .api import count_mta_nodes, find_attention, load_program, rewrite, save_program
from .capture import CaptureError, capture
from .config import HeadGroups, MTAConfig, Plan, PlanEntry
from .ops import attention, mta_attention_reference
from .passes.sites import AttentionSite

__version__ = "0.1.0"

__all__ = [
    "AttentionSite", "CaptureError", "HeadGroups", "calibrate", "MTAConfig", "Plan", "PlanEntry", "attention", "capture",
    "count_mta_nodes", "find_attention", "load_program", "mta_attention_reference", "rewrite", "save_program",
    "__version__",
]
