"""The MTA op (``torch.ops.mta.attention``), its efficient implementation and its reference."""

from .attention import attention
from .chunked import mta_attention_chunked
from .reference import mta_attention_reference

__all__ = ["attention", "mta_attention_chunked", "mta_attention_reference"]
