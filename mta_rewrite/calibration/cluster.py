"""Clustered summaries (MTA_SPEC.md, learned clustering of keys), fitted on calibration data.

For a plan (site → configuration), :func:`fit_clusters` visits the sites in layer order, each on
what flows into it with the upstream sites already clustered (as ``learn.fit_summaries`` does:
errors compound). At a non-causal site whose configuration is an MTAConfig without top-k, the
keys of every calibration sample (not the sinks, not masked) are pooled per key/value head and
k-means (Lloyd's algorithm, ``ITERATIONS`` at most, from K keys evenly spaced through the pooled
sequence, i.e. starting from about one centroid per chunk) fits K centroids per head; K defaults
to the site's chunk count ⌈n / c⌉, so a query sees as many summaries as with chunk means. The
site becomes ``Clustered`` when its local error (mean relative L2 of the site's output over the
samples) is lower than with chunk means, and keeps its configuration otherwise. Whether the plan
is better end to end, and on held-out samples, is for the caller to measure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Clustered, MTAConfig
from ..ops.masks import normalize_mask, simplify_mask
from .probe import Probe, SiteRecord, fit_in_layer_order, site_output

ITERATIONS = 25


@dataclass
class ClusterFit:
    """One site's fit: local errors with chunk means and with the clusters, and the clusters."""

    name: str
    mean_error: float
    clustered_error: float
    centroids: torch.Tensor  # [Hkv, K, d]


def kmeans(x: torch.Tensor, clusters: int, iterations: int = ITERATIONS) -> torch.Tensor:
    """[K, d] centroids of the rows of ``x`` [N, d] (K = min(clusters, N)), from K rows evenly
    spaced through x; an emptied cluster keeps its centroid."""
    x = x.float()
    K = min(clusters, x.shape[0])
    mu = x[torch.linspace(0, x.shape[0] - 1, K).round().long()].clone()
    for _ in range(iterations):
        a = ((mu * mu).sum(-1) - 2.0 * x @ mu.T).argmin(-1)
        counts = torch.bincount(a, minlength=K).unsqueeze(-1).float()
        sums = torch.zeros_like(mu).index_add_(0, a, x)
        new = torch.where(counts > 0, sums / counts.clamp(min=1.0), mu)
        if torch.equal(new, mu):
            break
        mu = new
    return mu


def _pooled_keys(records: list[SiteRecord], sinks: int) -> torch.Tensor:
    """[Hkv, N, d]: the keys a summary may hold (not sinks, allowed by the key padding) of every sample."""
    per_sample = []
    for r in records:
        B, Hkv, n, d = r.k.shape
        keep = torch.arange(n, device=r.k.device) >= sinks
        mask = normalize_mask(r.mask, B, r.q.shape[1], n)
        keep = keep.expand(B, n) if mask is None else keep & mask.allowed[:, 0, 0].expand(B, n)
        per_sample.append(r.k.float().transpose(0, 1)[:, keep])  # [Hkv, kept, d]
    return torch.cat(per_sample, dim=1)


def _clusterable(config, records: list[SiteRecord]) -> bool:
    if not isinstance(config, MTAConfig) or config.top_k or records[0].sink_logits is not None:
        return False  # (a sink site's extra token makes its mask vary per query: passes.lower.with_sink_token)
    for r in records:
        B, H, n = r.q.shape[0], r.q.shape[1], r.q.shape[2]
        mask, causal = simplify_mask(r.mask, B, H, n, r.causal)
        m = normalize_mask(mask, B, H, n)
        if causal or (m is not None and (m.per_query or m.bias is not None)):
            return False
    return True


def _error(config, records: list[SiteRecord]) -> float:
    errs = []
    for r in records:
        out = site_output(config, None, r.q, r.k, r.v, r.mask, r.causal, r.scale, torch.float32, softcap=r.softcap)
        exact = r.exact.float().reshape(out.shape)
        errs.append(float((out - exact).norm() / exact.norm().clamp(min=1e-30)))
    return sum(errs) / len(errs)


def fit_site(name: str, config: MTAConfig, records: list[SiteRecord], clusters: int | None = None,
             iterations: int = ITERATIONS) -> ClusterFit:
    """Fit one site's centroids on its recorded keys (see the module docstring)."""
    n = max(r.k.shape[2] for r in records)
    K = clusters or -(-n // min(config.chunk_size, n))
    keys = _pooled_keys(records, config.sinks)
    centroids = torch.stack([kmeans(keys[h], K, iterations) for h in range(keys.shape[0])])
    clustered = Clustered.from_tensor(config, centroids)
    return ClusterFit(name, _error(config, records), _error(clustered, records), centroids)


def fit_clusters(probe: Probe, samples: list, configs: dict, *, clusters: int | None = None,
                 iterations: int = ITERATIONS, advance=None) -> tuple[dict, dict[str, ClusterFit]]:
    """``configs`` (site → configuration; others exact) with clustered summaries where they lower
    a site's error: (site → Clustered or the configuration unchanged, site → ClusterFit for the
    sites fitted). Sites that are causal, carry a mask that varies per query or a bias, or are
    not a plain MTAConfig without top-k keep their configuration. ``clusters``: K for every site
    (default: each site's chunk count). ``advance`` is called once per site."""
    def fit(name, config, records):
        if not _clusterable(config, records):
            return config, None
        result = fit_site(name, config, records, clusters, iterations)
        return (Clustered.from_tensor(config, result.centroids) if result.clustered_error < result.mean_error
                else config), result

    return fit_in_layer_order(probe, samples, configs, fit, advance)
