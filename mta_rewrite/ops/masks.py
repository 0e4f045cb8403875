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

import weakref
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


def _as_4d(attn_mask: torch.Tensor, B: int, Hq: int, n: int) -> torch.Tensor:
    """``attn_mask`` as a 4-D view, checked against SDPA's broadcasting rules for [B, Hq, n, n]."""
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
    return m


def normalize_mask(attn_mask: torch.Tensor | None, B: int, Hq: int, n: int) -> NormalizedMask | None:
    """Check ``attn_mask`` against SDPA's broadcasting rules and split it into allowed/bias."""
    if attn_mask is None:
        return None
    m = _as_4d(attn_mask, B, Hq, n)
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


# --- Masks that are key padding in disguise ---------------------------------------------------------
#
# transformers models hand attention a materialised [B, 1, n, n] mask even when it holds nothing but
# the causal triangle and the padding of the batch (and even when nothing is padded: their decoders
# export with causal=False and the triangle in the mask). As given, such a mask varies per query,
# which sends every call to the portable implementation and, on CUDA, past the fused kernels.
# Its values say what it is; ``simplify_mask`` reads them once per mask tensor.

_ROW_BLOCK_ELEMENTS = 1 << 26  # rows of the mask compared per step: bounds the temporaries
_STRUCTURE: dict[tuple, tuple] = {}  # (id, B, Hq, n) → (weakref to the mask, its version, verdict)


def _structure(m: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor | None, bool, bool] | None:
    """For a bool or float mask ``m`` [Bm, Hm, rows, n] (the last ``rows`` = n − ``offset`` queries
    of n tokens): ``(keep, padding, triangle)``: whether, in every head, the mask allows exactly the
    keep flags of its first head's last row on every row (key padding) and whether exactly the
    causal triangle ∧ them (query r's keys up to offset + r), with keep [Bm, 1, 1, n] bool, or None
    when every key is kept; None if it is neither, or if a float mask carries a bias (an allowed
    value other than 0). Read in row blocks (no temporary of the mask's size); one device→host
    transfer of four flags."""
    Bm, Hm, rows_n, n = m.shape
    floating = m.is_floating_point()
    threshold = forbidden_threshold(m.dtype) if floating else None

    def allowed(x):
        return x > threshold if floating else x

    keep = allowed(m[:, 0, -1, :])  # the last query row sees every key the triangle allows: the keep flags
    true = torch.ones((), dtype=torch.bool, device=m.device)
    pad_ok, causal_ok, bias_free = true.clone(), true.clone(), true.clone()
    keys = torch.arange(n, device=m.device)
    step = max(1, _ROW_BLOCK_ELEMENTS // max(1, Bm * Hm * n))
    for r0 in range(0, rows_n, step):
        block = m[:, :, r0:r0 + step]
        rows = allowed(block)
        pad_ok &= (rows == keep[:, None, None, :]).all()
        tri = keys[None, :] <= torch.arange(offset + r0, offset + min(rows_n, r0 + step), device=m.device)[:, None]
        causal_ok &= (rows == (tri & keep[:, None, :])[:, None]).all()
        if floating:
            bias_free &= ((block == 0) | ~rows).all()
    pad, causal, no_bias, all_kept = torch.stack([pad_ok, causal_ok, bias_free, keep.all()]).tolist()
    if not no_bias or not (pad or causal):
        return None
    return (None if all_kept else keep[:, None, None, :].clone()), pad, causal


def _verdict(attn_mask: torch.Tensor, m: torch.Tensor, tag: tuple, offset: int = 0):
    """:func:`_structure` of ``m`` (a view of ``attn_mask``), kept per mask tensor under ``tag``
    while it lives and is not modified in place; None (unread) while a CUDA graph is captured. Run
    outside torch.compile's graphs once :func:`read_outside_graphs` was called (``use_mta`` does)."""
    return (_VERDICT_OUTSIDE_GRAPHS or _verdict_here)(attn_mask, m, tag, offset)


def _verdict_here(attn_mask: torch.Tensor, m: torch.Tensor, tag: tuple, offset: int = 0):
    return _read_once(attn_mask, tag, lambda: _structure(m, offset))


# torch.compiler.disable(_verdict_here), made by read_outside_graphs(): a reading is data-dependent
# (dynamo breaks the graph there anyway), and traced, _read_once's lookup in _STRUCTURE had
# dynamo build every entry and guard on the dict's length (a recompile per mask read, torch 2.13).
# Made at use_mta(), not at import: that imported triton.language before a caller could ask for
# Triton's interpreter (see interface._DECODE_OUTSIDE_GRAPHS).
_VERDICT_OUTSIDE_GRAPHS = None


def read_outside_graphs() -> None:
    """Have mask readings run outside torch.compile's graphs from now on (once per process)."""
    global _VERDICT_OUTSIDE_GRAPHS
    if _VERDICT_OUTSIDE_GRAPHS is None:
        _VERDICT_OUTSIDE_GRAPHS = torch.compiler.disable(_verdict_here)


def _read_once(attn_mask: torch.Tensor, tag: tuple, read):
    """``read()``, a reading of ``attn_mask``'s values, kept per mask tensor and ``tag`` while it
    lives and is not modified in place (every layer of a forward, or of a decoding step, shares
    the mask: one reading, one device→host sync); None (unread) while a CUDA graph is captured."""
    key = (id(attn_mask),) + tag
    cached = _STRUCTURE.get(key)
    versioned = not attn_mask.is_inference()
    if cached is not None and versioned and cached[0]() is attn_mask and cached[1] == attn_mask._version:
        return cached[2]
    if attn_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    verdict = read()
    if versioned:
        _STRUCTURE[key] = (weakref.ref(attn_mask, lambda _, key=key: _STRUCTURE.pop(key, None)),
                           attn_mask._version, verdict)
    return verdict


def decode_row(attn_mask: torch.Tensor, B: int, Hq: int, n: int) -> tuple | None:
    """For the mask [B|1, 1, 1, n] of a decoding step (one query per sequence over n cached
    slots): ``(allowed [B, length] bool or None when every key up to length is allowed, length)``,
    length the slot after the last key any sequence may see (a static cache's later slots are
    empty); None for a mask with a bias, one that forbids every key, or one of another shape (the
    step stays exact). Read once per mask tensor (:func:`_read_once`)."""
    if attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1 or attn_mask.shape[-1] != n:
        return None

    def read():
        split = normalize_mask(attn_mask, B, Hq, n)
        if split.bias is not None:
            return None
        row = split.allowed[:, 0, 0]
        columns = row.any(0).nonzero()
        if not len(columns):
            return None
        length = int(columns[-1]) + 1
        return (None if bool(row[:, :length].all()) else row.expand(B, -1)), length

    return _read_once(attn_mask, ("decode", B, Hq, n), read)


def simplify_mask(attn_mask: torch.Tensor | None, B: int, Hq: int, n: int, causal: bool
                  ) -> tuple[torch.Tensor | None, bool]:
    """An equivalent ``(attn_mask, causal)`` for MTA when a mask that varies per query is, by its
    values, key padding or the causal triangle ∧ key padding: then ``(keep [Bm, 1, 1, n] bool, or
    None when every key is kept, causal)``, with ``causal=True`` for the second form. Anything else
    (a bias, heads that differ, any other pattern) comes back unchanged.

    Why it is the same op (MTA_SPEC.md): with M = triangle ∧ keep and causal=False, the exact set
    of a query t holds the window's keys s ≤ t that are kept, as with causal=True and keep; the
    chunks after the window give no key to any query of the chunk (n_j = 0: left out, and never
    selected by top-k); the chunks before it give every query of the chunk the same kept keys, so
    one masked mean serves the block, as with causal=True. Sinks and fully masked rows agree too.

    The check reads the whole mask once (O(B·n²), in row blocks) and costs one device→host sync;
    its verdict is kept per mask tensor (while it lives and is not modified in place: every layer
    of a forward pass that shares the mask pays it once). Not cached for inference tensors (they
    carry no version counter); skipped while a CUDA graph is being captured (no sync allowed)."""
    if attn_mask is None:
        return None, causal
    m = _as_4d(attn_mask, B, Hq, n)
    if m.shape[2] == 1 or m.shape[3] == 1 or n == 1:
        return attn_mask, causal  # already the same for every query
    if not (m.dtype == torch.bool or m.is_floating_point()):
        return attn_mask, causal  # normalize_mask raises the error
    verdict = _verdict(attn_mask, m, (B, Hq, n))
    if verdict is None:
        return attn_mask, causal
    keep, padding, _ = verdict
    return keep, causal or not padding


def continued_key_padding(attn_mask: torch.Tensor, n: int) -> tuple[bool, torch.Tensor | None]:
    """For the mask [B|1, H|1, m, ≥ n] of m queries that are the last of n tokens (a prompt
    continued over a cache; columns after n ignored): ``(True, keep [Bm, 1, 1, n] or None)`` when
    its first n columns are, by their values, the causal triangle (query r's keys up to n − m + r)
    ∧ key padding, with no bias; else ``(False, None)``. Read once per mask tensor, as
    :func:`simplify_mask` reads its masks (every layer of a forward shares the mask)."""
    m = attn_mask[..., :n]
    verdict = _verdict(attn_mask, m, ("continued", n), offset=n - m.shape[2])
    if verdict is None or not verdict[2]:
        return False, None
    return True, verdict[0]
