"""Cost model of exact attention and of MTA configurations: modelled milliseconds.

Work per call (``mta_work``, ``exact_flops``; the flop counts are MTA_SPEC.md's "Cost model",
multiply-adds counted twice), for B sequences, Hq query and Hkv key/value heads:

    exact:  B·Hq·4·n²·d flops (half with causality)
    MTA:    B·Hq·4·n·(c·W + sinks + top_k·c + S·(1 − f + f·c))·d flops, W = L (causal) or 2L−1
            window chunks, S = n/c summaries (half of them on average with causality), f the
            fraction of summarised blocks the op attends exactly instead, because the mask or
            its bias varies inside them (``ops.chunked.exact_block_fraction``: 0 for no mask,
            key padding and the causal triangle; 1 for ALiBi), plus the summary pass over k and v
            (B·Hkv·4·n·d); the **key sets** it builds (k and v, every query chunk's exact chunks,
            sinks and summaries: B·Hkv·nc·X·d·2 values; when top-k selects per query head of a
            group, the window and sinks per key/value head and the selected chunks and summaries
            per query head, the op's two key sets); and with top-k the **selection** (per head
            and query chunk: a score for every chunk, a sort, a row of terms: B·Hs·nc·(nc + X)
            elements, Hs = Hq when top-k selects per query head of a group, else Hkv)

Where the op runs in query blocks on the CPU (``ops.varlen``: boundary chunks, and many small fixed
chunks without top-k, with no mask or key padding) its flops and key sets come from its own block
layout (``block_columns``: with top-k the selected chunks' tokens counted from the op's selection on
the samples, key sets per query head, and a score per pair of chunks and head); boundary chunks
otherwise as the fixed-chunk op at the padded length of their chunk slots (the path of the CUDA
kernels too).

Time (:class:`TimeModel`) is linear in that work, plus a fixed cost per call:

    exact ms = a·GFLOP + e                 MTA ms = b·GFLOP + m·GB(key sets) + t·M(selection) + o

with constants of their own (b', m', t', o') where the op runs in query blocks (``block_columns``:
a window of keys gathered per block of queries and per-query masks cost more per flop and byte),
and, at a site that soft-caps its logits (Gemma-2), a cost per computed logit (flops / 4d of them):
+ x·M(logits) exact (the op's blocked exact path: SDPA cannot cap), + y·M(logits) MTA;

with constants fitted by least squares (relative error) to the op and to
``scaled_dot_product_attention`` timed on this project's CPU box at 1224 shapes, lengths and
configurations, the query-block ones at 1080 with boundary chunks (``CPU``;
``benchmarks/bench_cost_model.py --fit``, ``--boundaries --fit`` and ``--softcap --fit`` fit and
write them for another machine, :func:`load_time_model` reads them). ``WORK`` is the work alone. The fixed costs
matter: at 512 tokens the op's ~1 ms per call is a good part of exact attention's time, and a site
split into groups of heads (``HeadGroups``) pays it once per group (:meth:`TimeModel.grouped_ms`).
``relative_cost`` is MTA's modelled time over exact attention's; where it is ≥ 1 MTA cannot win and
calibration keeps the site exact. On a GPU the constants are not this model's: calibrate with
measured costs there (:class:`MeasuredCosts`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import MTAConfig

_FP32 = 4  # bytes per element: the CPU op computes in fp32


def exact_flops(n: int, d: int, causal: bool) -> float:
    """Flops of exact attention per head and sequence."""
    return 4.0 * n * n * d * (0.5 if causal else 1.0)


def mta_flops(config: MTAConfig, n: int, d: int, causal: bool, exact_fraction: float = 0.0,
              clusters: int | None = None) -> float:
    """Flops of ``config`` per head and sequence (attention, the summary pass, centroid scoring)."""
    return mta_work(config, n, d, causal, exact_fraction=exact_fraction, clusters=clusters)[0]


def mta_work(config: MTAConfig, n: int, d: int, causal: bool, *, heads: int = 1, kv_heads: int | None = None,
             batch: int = 1, exact_fraction: float = 0.0, clusters: int | None = None,
             block_columns: tuple[float, int, int] | None = None,
             padded_n: int | None = None) -> tuple[float, float, float]:
    """(flops, key-set bytes, selection elements) of one call of the op: see the module docstring.
    ``block_columns`` = (columns per query, key-set rows, chunks) where the op runs in query blocks
    (``ops.varlen.key_columns``); ``padded_n``: boundary chunks in chunk slots, run as the
    fixed-chunk op at that length."""
    kv_heads = heads if kv_heads is None else kv_heads
    n = padded_n or n
    summary_pass = batch * kv_heads * 4.0 * n * d
    if block_columns is not None:
        columns, rows, chunks = block_columns
        top_k = config.top_k > 0  # top-k: key sets per query head, a score per chunk pair and head
        return (batch * heads * 4.0 * n * columns * d + summary_pass,
                batch * (heads if top_k else kv_heads) * 2.0 * rows * d * _FP32,
                batch * heads * chunks * chunks if top_k else 0.0)
    c = min(config.chunk_size, n)
    nc = -(-n // c)
    L = min(config.local_chunks, nc)
    K = min(config.top_k, nc)
    window = L if causal else 2 * L - 1
    per_summary = 1.0 - exact_fraction + exact_fraction * c  # keys a summarised chunk costs
    summaries = nc * (0.5 if causal else 1.0) if clusters is None else clusters
    width = c * window + config.sinks + K * c + summaries * per_summary  # a query chunk's key set
    flops = batch * heads * 4.0 * n * min(n, width) * d + summary_pass
    if clusters is not None:  # clustered summaries: every key scored against every centroid
        flops += batch * kv_heads * 2.0 * n * clusters * d
    per_head = K > 0 and heads != kv_heads  # top-k selects per query head of a group
    sets = heads if per_head else kv_heads
    if per_head:  # the op's two key sets: window and sinks per key/value head, the rest per query head
        shared = c * window + config.sinks
        bytes_ = batch * nc * (kv_heads * shared + heads * (width - shared)) * d * 2 * _FP32
    else:
        bytes_ = batch * kv_heads * nc * width * d * 2 * _FP32
    select = batch * sets * nc * (nc + width) if K > 0 else 0.0
    return flops, bytes_, select


@dataclass(frozen=True)
class TimeModel:
    """Modelled milliseconds of exact attention and of the op on one machine (module docstring):
    exact = ``exact_ms_per_gflop``·GFLOP + ``exact_call_ms``; MTA = ``mta_ms_per_gflop``·GFLOP +
    ``mta_ms_per_gb``·GB of key sets + ``mta_ms_per_mselect``·M selection elements +
    ``mta_call_ms``. ``benchmarks/bench_cost_model.py --fit`` fits them on a machine."""

    machine: str
    exact_ms_per_gflop: float
    exact_call_ms: float
    mta_ms_per_gflop: float
    mta_ms_per_gb: float
    mta_ms_per_mselect: float
    mta_call_ms: float
    # soft-capped logits (Gemma-2): what each computed logit adds, exact and MTA (0: models fitted
    # before 2026-12-05, whose JSON files lack them, cost a cap nothing)
    exact_softcap_ms_per_mlogit: float = 0.0
    mta_softcap_ms_per_mlogit: float = 0.0
    # the op in query blocks (``ops.varlen``: boundary chunks, many small fixed chunks; ``mta_work``'s
    # ``block_columns``), its own constants: per GFLOP, per GB of key sets, per M selection
    # elements, per call (``block_ms_per_gflop`` 0: models fitted before 2026-12-05 cost it as the
    # fixed-chunk op)
    block_ms_per_gflop: float = 0.0
    block_ms_per_gb: float = 0.0
    block_ms_per_mselect: float = 0.0
    block_call_ms: float = 0.0

    def exact_ms(self, n: int, d: int, causal: bool, *, heads: int = 1, batch: int = 1, softcap: bool = False) -> float:
        flops = batch * heads * exact_flops(n, d, causal)
        capped = flops / (4 * d) / 1e6 * self.exact_softcap_ms_per_mlogit if softcap else 0.0
        return flops / 1e9 * self.exact_ms_per_gflop + self.exact_call_ms + capped

    def mta_ms(self, config: MTAConfig, n: int, d: int, causal: bool, softcap: bool = False, **shape) -> float:
        """The op's modelled time; ``shape``: :func:`mta_work`'s keywords; ``softcap``: the site
        caps its logits (about flops / 4d of them: the summary pass's few flops counted too)."""
        flops, bytes_, select = mta_work(config, n, d, causal, **shape)
        capped = flops / (4 * d) / 1e6 * self.mta_softcap_ms_per_mlogit if softcap else 0.0
        if shape.get("block_columns") is not None and self.block_ms_per_gflop > 0:  # the op in query blocks
            per = (self.block_ms_per_gflop, self.block_ms_per_gb, self.block_ms_per_mselect, self.block_call_ms)
        else:
            per = (self.mta_ms_per_gflop, self.mta_ms_per_gb, self.mta_ms_per_mselect, self.mta_call_ms)
        return flops / 1e9 * per[0] + bytes_ / 1e9 * per[1] + select / 1e6 * per[2] + per[3] + capped

    def grouped_ms(self, groups, n: int, d: int, causal: bool, *, heads: int, kv_heads: int | None = None,
                   batch: int = 1, layout=None, softcap: bool = False) -> float:
        """A site computed per group of query heads (``HeadGroups.groups``: (config or None for
        exact, head indices)), as ``passes.lower.grouped_attention`` runs it: one call per group
        on its heads' q, k and v (copied out), and the outputs put back in head order.
        ``layout(config)``: that candidate's layout keywords at the site (:func:`mta_work`'s)."""
        per_kv = heads // (heads if kv_heads is None else kv_heads)
        total = 0.0
        for cfg, hs in groups:
            kv = len({h // per_kv for h in hs})
            if cfg is None:
                total += self.exact_ms(n, d, causal, heads=len(hs), batch=batch, softcap=softcap)
            else:
                total += self.mta_ms(cfg, n, d, causal, heads=len(hs), kv_heads=kv, batch=batch, softcap=softcap,
                                     **((layout(cfg) if layout else None) or {}))
            # its heads of q, k and v selected out, its output concatenated and put back in head
            # order: (hs + 2·kv + 2·hs)·n·d elements, each read and written
            copies = batch * (len(hs) * 3 + 2 * kv) * n * d * 2 * _FP32
            total += copies / 1e9 * self.mta_ms_per_gb
        return total


# Fitted on this project's CPU box (``python benchmarks/bench_cost_model.py --fit``,
# benchmarks/results/cost_model_2026-12-03_fit.md): over its 1224 timings (6 shapes, 256–8192
# tokens, 36 configurations) the modelled ratio MTA / exact is 0.77–1.33× the measured one for
# 80% of them (median 1.01), and on the same side of 1 (MTA faster or not) for 96%.
# The soft-cap constants (``bench_cost_model.py --softcap --fit``, cost_model_2026-12-05_softcap.md:
# Gemma-2-2B's layer and 8 heads of d = 64, 1024–4096 tokens, 216 timings, capped − uncapped): an
# exact capped site runs the op's blocked path, not SDPA; with them the modelled / measured ratio on
# capped sites has median 0.92 (p10–p90 0.65–1.30), without 1.22 (0.86–2.09).
# The query-block constants (``bench_cost_model.py --boundaries --fit``, cost_model_2026-12-05_boundaries.md:
# the same 6 shapes, 512–8192 tokens, 36 configurations with boundary chunks of synthetic lines of
# 1–79 tokens, 1080 timings): the op in query blocks costs more per flop and per key-set byte than
# the fixed-chunk op (a window gathered per block of queries, per-query masks); costed as the
# fixed-chunk op it was modelled at 0.54 (median; p10–p90 0.39–0.76) of its measured time over
# exact attention's, with these at 0.91 (0.66–1.27); on the side of exact attention it is measured
# on for 81% → 92% of the timings. Held out, SmolLM2's layers on real text at 4K and 8K tokens
# (``bench_boundaries.py``'s rows, top-k from the layers' own q and k): 0.99–1.18 of the measured
# ratio, against 0.62–0.77 before.
CPU = TimeModel(machine="Intel(R) Xeon(R) Processor, 2 threads, torch 2.13.0+cpu",
                exact_ms_per_gflop=3.762, exact_call_ms=0.242,
                mta_ms_per_gflop=5.185, mta_ms_per_gb=73.8, mta_ms_per_mselect=15.395, mta_call_ms=0.971,
                exact_softcap_ms_per_mlogit=1.891, mta_softcap_ms_per_mlogit=1.869,
                block_ms_per_gflop=7.576, block_ms_per_gb=185.7, block_ms_per_mselect=17.619, block_call_ms=1.745)

# The work alone, no per-call costs: flops at 100 GFLOP/s and key-set bytes at 5 GB/s (the ratio
# the previous roofline model used), what the costs tend to at long sequences. For searches
# whose question is the search itself, at lengths where this CPU's per-call costs would keep
# every site exact (the tests' small models), or to see plans as they would be at scale.
WORK = TimeModel(machine="no machine: the work alone (flops at 100 GFLOP/s, key-set bytes at 5 GB/s)",
                 exact_ms_per_gflop=10.0, exact_call_ms=0.0, mta_ms_per_gflop=10.0, mta_ms_per_gb=200.0,
                 mta_ms_per_mselect=0.0, mta_call_ms=0.0)

TIME_MODELS = {"cpu": CPU, "work": WORK}


def load_time_model(spec: str) -> TimeModel:
    """A cost model by name (``cpu``, ``work``) or from a JSON file of :class:`TimeModel`'s fields
    (``benchmarks/bench_cost_model.py --fit`` writes one); ValueError with one line otherwise."""
    import json
    from pathlib import Path

    if spec in TIME_MODELS:
        return TIME_MODELS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"cost model {spec!r} is neither {' nor '.join(TIME_MODELS)} nor a JSON file")
    try:
        data = json.loads(path.read_text())
        model = TimeModel(**data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not a cost model (a JSON object of TimeModel's fields): {e}") from None
    numbers = {k: v for k, v in dataclasses.asdict(model).items() if k != "machine"}
    bad = [k for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0]
    if bad or not isinstance(model.machine, str):
        raise ValueError(f"{path}: a cost model's constants are numbers ≥ 0 and its machine a string; "
                         f"check {', '.join(bad) or 'machine'}")
    return model


def relative_cost(config: MTAConfig | None, n: int, d: int, causal: bool, *, heads: int = 1,
                  kv_heads: int | None = None, batch: int = 1, exact_fraction: float = 0.0,
                  padded_n: int | None = None, clusters: int | None = None,
                  block_columns: tuple[float, int, int] | None = None, model: TimeModel = CPU,
                  softcap: bool = False) -> float:
    """Modelled time of ``config`` (None: exact) relative to exact attention at length n over
    ``batch`` sequences and ``heads`` query / ``kv_heads`` key-value heads; with ``exact_fraction``
    of the summarised blocks attended exactly (see the module docstring). ``block_columns`` =
    (columns per query, key-set rows, chunks) where the op runs in query blocks; boundary chunks
    otherwise: ``padded_n``, the padded length of their chunk slots
    (``ops.segments.padded_length``), at which the fixed-chunk op runs them. ``clusters``:
    clustered summaries, K of them per query, plus scoring every key against the K centroids.
    ``softcap``: the site soft-caps its logits (Gemma-2), in both."""
    if config is None:
        return 1.0
    mta = model.mta_ms(config, n, d, causal, heads=heads, kv_heads=kv_heads, batch=batch, exact_fraction=exact_fraction,
                       clusters=clusters, block_columns=block_columns, padded_n=padded_n, softcap=softcap)
    return mta / model.exact_ms(n, d, causal, heads=heads, batch=batch, softcap=softcap)


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
    attention's on the same inputs (the op with one chunk, what the rewritten program runs at a
    site left exact: ``scaled_dot_product_attention`` with the mask recognised), each the best of
    ``repeats`` calls after a warm-up, without gradients. Sites whose inputs have the same
    signature (shapes, dtypes, device, mask shape, causality, boundary chunks or not) share one
    set of timings. Only candidates the model puts under the crossover are timed (the model is right
    about MTA beating exact attention for 96% of the timings it was fitted to, see ``CPU``). A
    site planned per group of heads (``HeadGroups``) is timed as it runs, one call per group.

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
        """Milliseconds of exact attention (the op with one chunk) on a site record's inputs."""
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
                segment_ids=rec.segment_ids, sink_logits=rec.sink_logits, softcap=rec.softcap))
            with torch.no_grad():
                self._ms[key] = float(self.timer(fn, self.repeats, rec.q.device))
        return self._ms[key]


def _signature(rec) -> tuple:
    mask = None if rec.mask is None else (tuple(rec.mask.shape), rec.mask.dtype)
    return (tuple(rec.q.shape), tuple(rec.k.shape), rec.q.dtype, str(rec.q.device), mask, rec.causal,
            rec.segment_ids is not None, rec.sink_logits is not None, rec.softcap)


def _exact_call(rec):
    """What a site the plan leaves exact runs on a record's inputs: the op with one chunk, i.e.
    ``scaled_dot_product_attention`` after the op has recognised the mask by value (a causal
    triangle ∧ key padding as ``is_causal`` and padding), as ``rewrite`` lowers exact sites
    (``lower_exact=True``). Timing SDPA with the captured mask instead (transformers' decoders hand
    every layer a materialised [B, 1, n, n] one) measured exact attention 1.8× slower than what the
    rewritten program runs (SmolLM2's layer, 2048 tokens, CPU), and so favoured MTA."""
    from .probe import exact_output

    return lambda: exact_output(rec.q, rec.k, rec.v, rec.mask, rec.causal, rec.scale, rec.q.dtype, rec.sink_logits,
                                rec.softcap)
