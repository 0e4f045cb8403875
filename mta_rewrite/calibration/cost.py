"""Cost model of exact attention and of MTA configurations (MTA_SPEC.md, "Cost model").

Per head and sequence, counting multiply-adds twice:

    exact:  4·n²·d flops (half with causality), bytes: q, k, v read and the output written
    MTA:    4·n·(c·W + sinks + top_k·c + S·(1 − f + f·c))·d flops, W = L (causal) or 2L−1
            window chunks, S = n/c summaries (half of them on average with causality), f the
            fraction of summarised blocks the op attends exactly instead, because the mask or
            its bias varies inside them (``ops.chunked.exact_block_fraction``: 0 for no mask,
            key padding and the causal triangle; 1 for ALiBi), plus one pass over k and v for
            the summaries; bytes: q, k, v, the output, and the per-chunk key sets (the same
            keys per chunk, k and v)

Where the op runs in query blocks on the CPU (``ops.varlen``: boundary chunks, and many small fixed
chunks, with no mask or key padding and no top-k) it is costed from its own block layout
(``block_cost``); boundary chunks otherwise as the fixed-chunk op at the padded length of their
chunk slots (the path of the CUDA kernels too).

Time is modelled as max(flops / F, bytes / M) with the ratio F / M of the machine (CPU here:
≈ 100 GFLOP/s over ≈ 5 GB/s; the H100: 750 TFLOP/s over 2.9 TB/s). ``relative_cost`` is MTA's
modelled time over exact attention's; below a crossover length MTA cannot win (ratio ≥ 1) and
calibration keeps such sites exact.
"""

from __future__ import annotations

from ..config import MTAConfig

CPU_FLOPS_PER_BYTE = 20.0  # ≈ 100 GFLOP/s fp32 over ≈ 5 GB/s on the 2-core machines


def exact_cost(n: int, d: int, causal: bool, flops_per_byte: float = CPU_FLOPS_PER_BYTE) -> float:
    flops = 4.0 * n * n * d * (0.5 if causal else 1.0)
    bytes_ = 4.0 * 4 * n * d  # fp32 q, k, v, out
    return max(flops, bytes_ * flops_per_byte)


def mta_cost(config: MTAConfig, n: int, d: int, causal: bool, flops_per_byte: float = CPU_FLOPS_PER_BYTE,
             exact_fraction: float = 0.0, clusters: int | None = None) -> float:
    c = min(config.chunk_size, n)
    nc = -(-n // c)
    L = min(config.local_chunks, nc)
    window = L if causal else 2 * L - 1
    per_summary = 1.0 - exact_fraction + exact_fraction * c  # keys a summarised chunk costs
    summaries = nc * (0.5 if causal else 1.0) if clusters is None else clusters
    keys = min(n, c * window + config.sinks + config.top_k * c + summaries * per_summary)
    flops = 4.0 * n * keys * d + 2.0 * 2 * n * d  # attention + the summary pass over k and v
    if clusters is not None:  # clustered summaries: every key scored against every centroid
        flops += 2.0 * n * clusters * d
    key_sets = 2.0 * nc * (c * window + config.sinks + config.top_k * c + (nc if clusters is None else clusters)
                           * per_summary) * d
    bytes_ = 4.0 * (4 * n * d + key_sets)
    return max(flops, bytes_ * flops_per_byte)


def block_cost(columns: float, key_set_rows: float, n: int, d: int,
               flops_per_byte: float = CPU_FLOPS_PER_BYTE) -> float:
    """The op in query blocks (``ops.varlen``), from its own block layout
    (``ops.varlen.key_columns``): ``columns`` keys per query (window range, sinks, summaries),
    ``key_set_rows`` rows of the key sets it builds; plus the summary pass over k and v."""
    flops = 4.0 * n * columns * d + 2.0 * 2 * n * d
    bytes_ = 4.0 * (4 * n * d + 2.0 * key_set_rows * d)
    return max(flops, bytes_ * flops_per_byte)


def relative_cost(config: MTAConfig | None, n: int, d: int, causal: bool, flops_per_byte: float = CPU_FLOPS_PER_BYTE,
                  exact_fraction: float = 0.0, padded_n: int | None = None, clusters: int | None = None,
                  block_columns: tuple[float, float] | None = None) -> float:
    """Modelled time of ``config`` (None: exact) relative to exact attention at length n; with
    ``exact_fraction`` of the summarised blocks attended exactly (see the module docstring).
    ``block_columns`` = (columns per query, key-set rows) where the op runs in query blocks
    (:func:`block_cost`); boundary chunks otherwise: ``padded_n``, the padded length of their chunk
    slots (``ops.segments.padded_length``), at which the fixed-chunk op runs them.
    ``clusters``: clustered summaries, K of them per query, plus scoring every key against the K
    centroids."""
    if config is None:
        return 1.0
    if block_columns is not None:
        mta = block_cost(*block_columns, n, d, flops_per_byte)
    else:
        mta = mta_cost(config, padded_n or n, d, causal, flops_per_byte, exact_fraction, clusters)
    return mta / exact_cost(n, d, causal, flops_per_byte)


def default_candidates(n: int) -> list[MTAConfig]:
    """The default search space at sequence length n: chunk sizes 16 … n/2 (powers of two;
    multiples of 64 from n ≥ 4096 on, for GPU kernels), L ∈ {1, 2}, sinks ∈ {0, 4, 16},
    top_k ∈ {0, 1, 2, 4}. ("exact" is always a candidate too.)"""
    sizes = []
    c = 16
    while c < n:
        if n < 4096 or c % 64 == 0:
            sizes.append(c)
        c *= 2
    return [MTAConfig(c, L, s, k) for c in sizes for L in (1, 2) for s in (0, 4, 16) for k in (0, 1, 2, 4)]


class MeasuredCosts:
    """Relative costs **measured on this machine** instead of modelled (``calibrate(...,
    measure_costs=True)``): a candidate's cost at a site is the op's time on the site's recorded
    inputs (its longest calibration sample: q, k, v, mask, causality, segment ids) over exact
    attention's (``scaled_dot_product_attention``) on the same inputs, each the best of
    ``repeats`` calls after a warm-up, without gradients. Sites whose inputs have the same
    signature (shapes, dtypes, device, mask shape, causality, boundary chunks or not) share one
    set of timings. Only candidates the model puts under the crossover are timed: the model is
    optimistic (on this project's CPU box MTA took 1.5–2.8× its modelled share,
    ``benchmarks/bench_cpu_layer.py``), so a candidate it already rejects would not pass.

    ``timer(fn, repeats, device) -> ms``: :func:`mta_rewrite.timing.best_ms` unless given."""

    def __init__(self, repeats: int = 3, timer=None):
        from ..timing import best_ms

        self.repeats = repeats
        self.timer = timer or best_ms
        self._ms: dict = {}

    def machine(self) -> str:
        """What the timings ran on: the GPU's name, or the CPU's and its threads."""
        import torch

        from ..timing import cpu_name

        devices = sorted({key[0][3] for key in self._ms})
        names = [torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda")
                 else f"{cpu_name()}, {torch.get_num_threads()} threads" for dev in devices]
        return "; ".join(names) or "nothing (no candidate was timed)"

    def exact_ms(self, rec) -> float:
        """Milliseconds of exact attention (SDPA) on a site record's inputs."""
        return self._time(rec, None)

    def relative(self, rec, config: MTAConfig) -> float:
        """``config``'s time over exact attention's on a site record's inputs."""
        return self._time(rec, config) / max(self.exact_ms(rec), 1e-9)

    def _time(self, rec, config: MTAConfig | None) -> float:
        key = (_signature(rec), config)
        if key not in self._ms:
            import torch

            from .probe import site_output

            fn = _exact_call(rec) if config is None else (lambda: site_output(
                config, None, rec.q, rec.k, rec.v, rec.mask, rec.causal, rec.scale, dtype=rec.q.dtype,
                segment_ids=rec.segment_ids))
            with torch.no_grad():
                self._ms[key] = float(self.timer(fn, self.repeats, rec.q.device))
        return self._ms[key]


def _signature(rec) -> tuple:
    mask = None if rec.mask is None else (tuple(rec.mask.shape), rec.mask.dtype)
    return (tuple(rec.q.shape), tuple(rec.k.shape), rec.q.dtype, str(rec.q.device), mask, rec.causal,
            rec.segment_ids is not None)


def _exact_call(rec):
    """SDPA on a record's inputs, the causal triangle folded into the mask when there is one (SDPA
    takes a mask or ``is_causal``, not both)."""
    import torch
    import torch.nn.functional as F

    q, k, v, mask = rec.q, rec.k, rec.v, rec.mask
    causal = rec.causal
    if causal and mask is not None:
        n, m = q.shape[-2], k.shape[-2]
        tri = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        mask = (mask & tri) if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))
        causal = False
    gqa = q.shape[1] != k.shape[1]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=rec.scale,
                                                  enable_gqa=gqa)
