"""Errors: end to end on the model's first output tensor, and locally at one site.

End to end, on the first tensor of the model's output (last hidden state, logits, …), over real
positions only when the sample has a 2-D ``attention_mask`` (outputs at padded positions are
not defined; MTA gives zeros where the original averages garbage):

- ``rel_l2``: ‖y − y₀‖ / ‖y₀‖;
- ``cosine``: mean over positions of 1 − cos(y, y₀) along the last dimension;
- ``kl``: mean over positions of KL(softmax y₀ ‖ softmax y), for language-model logits.

Sample errors are averaged over samples. ``last`` (calibrate's ``last_positions``): only the last
positions of each sample count, end to end (the output's second dimension) and locally (a site's
query rows): where a language model generates after a prompt, its error is that of the latest
positions, which MTA summarises most.
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


def first_tensor_name(out) -> str | None:
    """The key of the output's first tensor (``logits``, ``last_hidden_state``: a dict's key or a
    model output's field, the innermost one), or None when nothing names it (a tensor, a tuple)."""
    for path, leaf in pytree.tree_flatten_with_path(out)[0]:
        if isinstance(leaf, torch.Tensor):
            names = [str(k.key) if isinstance(k, pytree.MappingKey) else k.name for k in path
                     if isinstance(k, (pytree.MappingKey, pytree.GetAttrKey))]
            return names[-1] if names else None
    return None


def _real_rows(y: torch.Tensor, kwargs: dict) -> torch.Tensor:
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(y.shape[:2]) == tuple(mask.shape):
        return y[mask.bool()]
    return y.reshape(-1, y.shape[-1]) if y.dim() > 1 else y.reshape(1, -1)


# Rows of the output are compared in blocks of about this many elements: float64 temporaries of
# 4 MB stay in cache, where converting a whole [n, vocabulary] logit tensor to float64 made five
# temporaries of n·V·8 bytes (at 1024 tokens × 49K vocabulary, ~2 GB) and ran 3× slower.
ROW_BLOCK_ELEMENTS = 1 << 19


def last_positions(y: torch.Tensor, kwargs: dict, last: int) -> tuple[torch.Tensor, dict]:
    """The output's last ``last`` positions ([B, n, ...] → [B, last, ...]) and the call's 2-D
    attention mask cut the same way (a one-line error for an output without positions)."""
    if y.dim() < 3:
        raise ValueError(f"last_positions needs an output with positions ([batch, positions, features]); the model's "
                         f"first output is {list(y.shape)}")
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and tuple(y.shape[:2]) == tuple(mask.shape):
        kwargs = {**kwargs, "attention_mask": mask[:, -last:]}
    return y[:, -last:], kwargs


def output_error(metric: str, y: torch.Tensor, y0: torch.Tensor, kwargs: dict, last: int | None = None) -> float:
    """The end-to-end error of output ``y`` against the reference ``y0`` (see the module's
    docstring; ``last``: over the last positions only), computed in float64, a block of rows at a
    time."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if last is not None:
        (y, kwargs), (y0, _) = last_positions(y, kwargs, last), last_positions(y0, kwargs, last)
    y, y0 = _real_rows(y, kwargs), _real_rows(y0, kwargs)
    rows = max(1, ROW_BLOCK_ELEMENTS // max(1, y.shape[-1]))
    num = den = total = 0.0
    for i in range(0, y.shape[0], rows):
        a, a0 = y[i:i + rows].double(), y0[i:i + rows].double()
        if metric == "rel_l2":
            num += float((a - a0).pow(2).sum())
            den += float(a0.pow(2).sum())
        elif metric == "cosine":
            total += float((1 - F.cosine_similarity(a, a0, dim=-1)).sum())
        else:  # KL(p0 ‖ p) = Σ p0·(log p0 − log p) per row
            lp0 = F.log_softmax(a0, dim=-1)
            total += float((lp0.exp() * (lp0 - F.log_softmax(a, dim=-1))).sum())
    if metric == "rel_l2":
        return num ** 0.5 / max(den ** 0.5, 1e-30)
    return total / max(1, y.shape[0])


def attended_rows(mask: torch.Tensor | None, shape) -> torch.Tensor | None:
    """Query rows that attend to at least one key (others are zero in MTA, undefined in SDPA)."""
    if mask is None:
        return None
    ok = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
    return ok.any(-1).expand(shape[:-1])


def first_counted_row(n: int, last: int | None) -> int:
    """The first query row whose error counts in a site's output of n rows when only the ``last``
    count (0: every row may): the rows before it need not be computed (``probe.site_output``'s
    ``rows_from``)."""
    return max(n - last, 0) if last is not None else 0


class LocalReference:
    """A site's exact outputs on the samples, prepared once so that measuring a candidate is one
    subtraction per sample: the outputs in float64, which query rows count (those that attend to
    at least one key; with ``last``, of the last ``last`` rows only, the others not kept) and, per
    query head, the squared norm of the exact output over those rows.
    The walk measures up to ~100 candidates against the same exact outputs."""

    def __init__(self, exacts: list[torch.Tensor], masks: list, last: int | None = None):
        self.samples = []
        self.den = 0.0
        self.last = last
        for y0, mask in zip(exacts, masks):
            rows = attended_rows(mask, y0.shape)
            start = self.rows_from(y0.shape[-2])  # (only the rows from it count)
            if start:
                y0, rows = y0[..., start:, :], None if rows is None else rows[..., start:]
            weight = None if rows is None else rows.to(torch.float64)  # [B, H, rows]: 1 for a counted row
            exact = y0.double()
            self.samples.append((start, exact, weight))
            self.den = self.den + _per_head(exact.pow(2).sum(-1), weight)

    def rows_from(self, n: int) -> int:
        """:func:`first_counted_row` of a sample of n rows."""
        return first_counted_row(n, self.last)

    def parts(self, outputs: list[torch.Tensor]):
        """Per query head, the squared error of the outputs against the exact ones and the squared
        norm of the exact ones, summed over samples and counted rows: ([H], [H])."""
        num = 0.0
        for y, (start, exact, weight) in zip(outputs, self.samples):
            num = num + _per_head((y[..., start:, :].double() - exact).pow_(2).sum(-1), weight)
        return num, self.den


def _per_head(sq: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """[B, H, n] per-row sums → [H], over the counted rows."""
    return (sq if weight is None else sq * weight).sum((0, 2))


def relative(num, den) -> float:
    return float((num.sum() / den.sum().clamp(min=1e-30)) ** 0.5) if isinstance(num, torch.Tensor) else 0.0

