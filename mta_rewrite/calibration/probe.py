"""A switchable copy of the model: every rewritable site can be exact or any MTA configuration,
and can record what flows into it, without capturing the model again.

Each site is lowered to :func:`site_hook` with its original subgraph kept (see
``passes.lower.lower_match_to_hook``), so "exact" is the original computation, bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..capture import capture
from ..config import HeadGroups, MTAConfig
from ..passes.lower import eliminate_dead_code, grouped_attention, lower_match_to_hook
from ..passes.match import find_matches
from ..passes.sites import AttentionSite, describe


@dataclass
class SiteRecord:
    """What flowed through one site on one sample: canonical operands and the exact output."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    scale: float | None
    exact: torch.Tensor


@dataclass
class ProbeState:
    configs: dict[str, MTAConfig] = field(default_factory=dict)  # sites not named run exact
    record: set[str] = field(default_factory=set)
    records: dict[str, list[SiteRecord]] = field(default_factory=dict)


_ACTIVE: list[ProbeState] = []


def site_hook(original, q, k, v, mask, name, causal, scale):
    """Called from the probe graph at every site: exact (the original output) or MTA."""
    state = _ACTIVE[-1] if _ACTIVE else None
    if state is None:
        return original
    if name in state.record:
        state.records.setdefault(name, []).append(
            SiteRecord(q.detach(), k.detach(), v.detach(), None if mask is None else mask.detach(), causal, scale, original.detach()))
    config = state.configs.get(name)
    if config is None:
        return original
    if isinstance(config, HeadGroups):
        return grouped_attention(q, k, v, mask, config.op_groups(), causal, scale).to(original.dtype)
    return torch.ops.mta.attention(q, k, v, mask, causal=causal, scale=scale, **config.op_kwargs()).to(original.dtype)


@contextlib.contextmanager
def active(state: ProbeState):
    _ACTIVE.append(state)
    try:
        yield state
    finally:
        _ACTIVE.pop()


class Probe:
    """The model captured once, every rewritable site routed through :func:`site_hook`."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict):
        ep = capture(model, args, kwargs, dynamic=True)
        self.module = ep.module()
        matches = find_matches(self.module.graph)
        self.sites: list[AttentionSite] = describe(matches)
        for m, site in zip(matches, self.sites):
            if site.rewritable:
                lower_match_to_hook(self.module, m, site.name, site_hook)
        eliminate_dead_code(self.module)
        self.rewritable = [s for s in self.sites if s.rewritable]

    def run(self, sample: Any, configs: dict[str, MTAConfig] | None = None, record: set[str] | None = None):
        """One forward pass with ``configs`` (site → MTAConfig; others exact); returns
        (output, records)."""
        args, kwargs = as_call(sample)
        state = ProbeState(dict(configs or {}), set(record or ()))
        with active(state), torch.no_grad():
            out = self.module(*args, **kwargs)
        return out, state.records


def as_call(sample: Any) -> tuple[tuple, dict]:
    """A calibration sample is a tuple of positional arguments or a dict of keyword arguments."""
    if isinstance(sample, dict):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    if isinstance(sample, torch.Tensor):
        return (sample,), {}
    raise TypeError(f"a calibration sample is a tuple of arguments or a dict of keyword arguments, got {type(sample).__name__}")
