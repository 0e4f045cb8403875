"""Learned summaries (MTA_SPEC.md, ``summary="learned"``), fitted on calibration data.

A site's summaries are means of each chunk's keys and values; a learned summary weighs them by
a_s = softmax_s(k_s·w) with one vector w per key/value head (w = 0 is the mean), so a summary can
lean towards the keys a query would have attended to most. For a plan (site → configuration),
:func:`fit_summaries` fits w site by site in layer order, each site on what flows into it with the
upstream sites already approximated and learned (as the walk does: errors compound): the site's
inputs are recorded on every calibration sample, and Adam minimises the mean over samples of
‖MTA(q, k, v; w) − exact‖² / ‖exact‖² (the site's local error, squared), starting from w = 0. The
best w seen (by that loss) is kept, so on the calibration samples a learned site is never worse
than its mean; whether the plan is better end to end, and on held-out samples, ``calibrate``
verifies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import HeadGroups, Learned, MTAConfig
from .metrics import first_counted_row
from .probe import Probe, SiteRecord, fit_in_layer_order, site_output

STEPS = 40
LR = 0.05


@dataclass
class SiteFit:
    """One site's fit: the local error (mean relative L2 over the samples) with means and with the
    learned weight, and the weight [Hkv, d]."""

    name: str
    mean_error: float
    learned_error: float
    weight: torch.Tensor


def _errors(config, records: list[SiteRecord], weight, last: int | None = None) -> torch.Tensor:
    """Relative L2 error of the site's output per sample (differentiable in ``weight``; ``last``:
    over the last query rows only, and the op computes the query chunks from the first of them on)."""
    errs = []
    for r in records:
        out = site_output(config, None, r.q, r.k, r.v, r.mask, r.causal, r.scale, torch.float32, weight, r.segment_ids,
                          autograd=True, sink_logits=r.sink_logits, softcap=r.softcap,
                          rows_from=first_counted_row(r.q.shape[-2], last))
        exact = r.exact.float().reshape(out.shape)
        if last is not None:  # (the last query rows only: out and exact are [B, H, n, d])
            out, exact = out[..., -last:, :], exact[..., -last:, :]
        errs.append((out - exact).norm() / exact.norm().clamp(min=1e-30))
    return torch.stack(errs)


def fit_site(name: str, config: MTAConfig | HeadGroups, records: list[SiteRecord], *, steps: int = STEPS,
             lr: float = LR, last: int | None = None) -> SiteFit:
    """Fit one site's summary weight on its recorded inputs (see the module docstring)."""
    Hkv, d = records[0].k.shape[1], records[0].k.shape[3]
    weight = torch.zeros(Hkv, d, dtype=torch.float32, device=records[0].k.device, requires_grad=True)
    opt = torch.optim.Adam([weight], lr=lr)
    best, best_loss, mean_error, learned_error = weight.detach().clone(), None, None, None
    for step in range(steps + 1):
        opt.zero_grad()
        with torch.enable_grad():
            errs = _errors(config, records, weight, last)
            loss = (errs ** 2).mean()
        if step == 0:
            mean_error = float(errs.detach().mean())
        if best_loss is None or float(loss.detach()) < best_loss:
            best_loss, best, learned_error = float(loss.detach()), weight.detach().clone(), float(errs.detach().mean())
        if step == steps:
            break
        loss.backward()
        opt.step()
    return SiteFit(name, mean_error, learned_error, best)


def fit_summaries(probe: Probe, samples: list, configs: dict, *, steps: int = STEPS, lr: float = LR,
                  advance=None, last: int | None = None) -> tuple[dict, dict[str, SiteFit]]:
    """``configs`` (site → MTAConfig or HeadGroups; others exact) with every approximated site's
    summaries learned: (site → Learned or the configuration unchanged where learning did not lower
    the site's error, site → SiteFit). ``advance`` is called once per site; ``last``: the errors over
    the last query rows of each sample only (calibrate's ``last_positions``)."""
    def fit(name, config, records):
        result = fit_site(name, config, records, steps=steps, lr=lr, last=last)
        return (Learned.from_tensor(config, result.weight) if result.learned_error < result.mean_error else config), result

    return fit_in_layer_order(probe, samples, configs, fit, advance)
