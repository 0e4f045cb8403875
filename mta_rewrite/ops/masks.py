"""Attention masks as MTA sees them: SDPA's mask conventions turned into (allowed, bias).

SDPA takes a bool mask (True = may attend) or an additive float mask, broadcastable to
[B, Hq, n, n]. MTA needs to know, for every key, whether it is *forbidden* (it then takes part in
neither the exact attention nor any chunk summary) and, if allowed, which additive bias it carries.

A float value is forbidden when it is -inf or at most the dtype's minimum: transformers models
mask with ``torch.finfo(dtype).min`` rather than -inf so that fully masked rows stay finite, and
treating that value as "forbidden" is what lets a fully masked row give zeros (MTA_SPEC.md) and
lets chunk summaries leave masked keys out instead of averaging them in with a huge negative bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NormalizedMask:
    """An SDPA mask as ``allowed`` (bool) and ``bias`` (float or None), both [Bm, Hm, nq, n].

    ``Bm`` is 1 or B, ``Hm`` is 1 or Hq, ``nq`` is 1 (the same for every query: key padding)
    or n (varies per query). Dimensions the user broadcast stay size 1: nothing n×n is
    created that the user did not pass.
    """

    allowed: torch.Tensor
    bias: torch.Tensor | None

    @property
    def per_query(self) -> bool:
        return self.allowed.shape[2] != 1

    @property
    def per_head(self) -> bool:
        return self.allowed.shape[1] != 1


def forbidden_threshold(dtype: torch.dtype) -> float:
    """Float mask values at or below this are 'forbidden' (see the module docstring)."""
    return torch.finfo(dtype).min


def normalize_mask(attn_mask: torch.Tensor | None, B: int, Hq: int, n: int) -> NormalizedMask | None:
    """Check ``attn_mask`` against SDPA's broadcasting rules and split it into allowed/bias."""
    if attn_mask is None:
        return None
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dimensions, got shape {tuple(attn_mask.shape)}")
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    target = (B, Hq, n, n)
    for size, want, name in zip(m.shape, target, ("batch", "heads", "queries", "keys")):
        if size not in (1, want):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"[B, Hq, n, n] = {list(target)} ({name} dimension is {size})"
            )
    if m.shape[3] == 1:  # the same value for every key: make the key dimension explicit
        m = m.expand(*m.shape[:3], n)
    if m.dtype == torch.bool:
        return NormalizedMask(allowed=m, bias=None)
    if not m.is_floating_point():
        raise TypeError(f"attn_mask must be bool or floating point, got {m.dtype}")
    allowed = m > forbidden_threshold(m.dtype)
    bias = torch.where(allowed, m, torch.zeros((), dtype=m.dtype, device=m.device))
    if not bool(bias.any()):  # a pure 0/-inf mask carries no bias: drop it
        bias = None
    return NormalizedMask(allowed=allowed, bias=bias)
