"""mta-rewrite: rewrite the attention of existing PyTorch models into Multi-Token Attention.

Importing the package registers ``torch.ops.mta.attention`` (MTA_SPEC.md).
"""

from .ops import attention, mta_attention_reference

__version__ = "0.1.0"

__all__ = ["attention", "mta_attention_reference", "__version__"]
