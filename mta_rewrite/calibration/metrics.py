"""Errors: end to end on the model's first output tensor, and locally at one site.

End to end, on the first tensor of the model's output (last hidden state, logits, …), over real
positions only when the sample has a 2-D ``attention_mask`` (outputs at padded positions are
not defined; MTA gives zeros where the original averages garbage):

- ``rel_l2``: ‖y − y₀‖ / ‖y₀‖;
- ``cosine``: mean over positions of 1 − cos(y, y₀) along the last dimension;
- ``kl``: mean over positions of KL(softmax y₀ ‖ softmax y), for language-model logits.

Sample errors are averaged over samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

METRICS = ("rel_l2", "cosine", "kl")


def first_tensor(out) -> torch.Tensor:
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise ValueError("the model's output holds no tensor to measure")


def _real_rows(y: torch.Tensor, kwargs: dict) -> torch.Tensor:
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(y.shape[:2]) == tuple(mask.shape):
        return y[mask.bool()]
    return y.reshape(-1, y.shape[-1]) if y.dim() > 1 else y.reshape(1, -1)


def output_error(metric: str, y: torch.Tensor, y0: torch.Tensor, kwargs: dict) -> float:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    y, y0 = _real_rows(y.double(), kwargs), _real_rows(y0.double(), kwargs)
    if metric == "rel_l2":
        return float((y - y0).norm() / y0.norm().clamp(min=1e-30))
    if metric == "cosine":
        return float((1 - F.cosine_similarity(y, y0, dim=-1)).mean())
    p0 = F.log_softmax(y0, dim=-1)
    return float(F.kl_div(F.log_softmax(y, dim=-1), p0, log_target=True, reduction="none").sum(-1).mean())


def attended_rows(mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """Query rows that attend to at least one key (others are zero in MTA, undefined in SDPA)."""
    if mask is None:
        return None
    ok = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
    return ok.any(-1).expand(shape[:-1])


def local_error_parts(outputs: list[torch.Tensor], exacts: list[torch.Tensor], masks: list):
    """Per query head, the squared error of a site's output against its exact output and the
    squared norm of the exact output, summed over samples and attended rows: ([H], [H])."""
    num = den = 0.0
    for y, y0, mask in zip(outputs, exacts, masks):
        rows = attended_rows(mask, y0.shape)
        keep = torch.ones(y0.shape[:-1], dtype=torch.bool) if rows is None else rows
        sq = ((y.double() - y0.double()).pow(2).sum(-1) * keep).transpose(0, 1).reshape(y0.shape[1], -1).sum(-1)
        ref = (y0.double().pow(2).sum(-1) * keep).transpose(0, 1).reshape(y0.shape[1], -1).sum(-1)
        num, den = num + sq, den + ref
    return num, den


def relative(num, den) -> float:
    return float((num.sum() / den.sum().clamp(min=1e-30)) ** 0.5) if isinstance(num, torch.Tensor) else 0.0

