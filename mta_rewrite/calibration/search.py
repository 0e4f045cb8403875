"""calibrate(): the fastest plan whose end-to-end error stays within a budget.

1. **Capture once** (:class:`~.probe.Probe`): every rewritable site switchable between exact (what
   the rewritten model runs there when the plan leaves it exact: the op's exact path, or the
   original SDPA call) and any MTA configuration, and able to record its inputs.
2. **Per-site errors**: with exact upstream, each candidate's relative L2 error at each site on
   the calibration samples, and its modelled cost (:mod:`.cost`); candidates that cannot beat
   exact attention at that length are dropped (the crossover), and only the cost/error Pareto
   front is kept.
3. **Greedy in layer order, errors compounding**: for a local tolerance τ, walk the sites in
   graph order; for each, take its inputs *with the upstream sites already approximated* and
   take the cheapest front candidate whose local error is ≤ τ (else exact). A ladder of τ gives
   a family of plans from all-exact (τ = 0) to aggressive. The same ladder is walked a second
   time choosing **per query head** (each head its cheapest candidate within τ, heads grouped
   by configuration, see :class:`~mta_rewrite.config.HeadGroups`): heads differ, some attend
   locally and some retrieve, and per-head plans save where one configuration per site cannot.

   Steps 2 and 3 are one depth-first walk over the tree of upstream plans (:func:`_walk`):
   every τ of both ladders starts at the root; the forward passes run site by site
   (:class:`~.probe.Cursor`) and split where the plans' choices differ, so what plans share
   (a layer under the same upstream choices) is computed, and its candidates measured, once. The
   all-exact branch is walked first: it gives step 2's errors, which every other branch needs.
   Only the boundary between layers is kept per open branch, never a recording per site.
4. **Back off**: from the cheapest plan of the ladder, revert approximations one at a time, the
   least valuable first (least cost saved per unit of local error), to add intermediate plans.
5. **Verify end to end** the plans of the family, cheapest first, on the calibration *and* the
   held-out samples, and return the cheapest whose error on both is within the budget. The
   family does not depend on the budget, so a tighter budget can never yield a cheaper plan, and
   budget 0 yields the all-exact plan (error exactly 0). A plan's forward pass does not compute
   the exact attention of the sites it approximates (:meth:`~.probe.Probe.forward`). Work that
   cannot change the choice is skipped: plans costlier than one already within budget are not
   run, a plan over budget on the calibration samples is not run on the held-out ones, and a
   plan whose errors on the samples run so far already put the mean over budget is not run on
   the rest (the report says which).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..api import check_not_rewritten
from ..calls import as_call, guard_failure
from ..config import Boundaries, Clustered, HeadGroups, Learned, MTAConfig, Plan, PlanEntry, check_writable
from ..ops.chunked import exact_block_fraction
from ..ops.masks import simplify_mask
from .cost import CPU, WORK, MeasuredCosts, TimeModel, default_candidates, relative_cost
from .metrics import METRICS, LocalReference, first_tensor, first_tensor_name, output_error, relative
from .metrics import last_positions as last_positions_of
from .probe import Probe, release_freed_memory, site_output

# Learned summaries are fitted for a plan cheaper than the chosen one only if its error with means
# was at most this many times the budget: on SmolLM2 (512 tokens, KL) learning cut plans' errors
# 2–2.5× (0.048 → 0.025, 0.19 → 0.076; benchmarks/bench_learned_summaries.py).
LEARN_HEADROOM = 4.0
PlanKey = tuple  # ((site name, MTAConfig), ...) for the approximated sites, in site order


@dataclass
class SiteStats:
    name: str
    n: int
    d: int
    causal: bool
    weight: float  # exact attention's time at this site (ms, all heads, batch), for plan-level cost
    candidates: list[MTAConfig] = field(default_factory=list)
    heads: int = 1
    kv_heads: int | None = None
    batch: int = 1
    model: TimeModel = CPU
    softcap: bool = False  # the site soft-caps its logits (costed in exact attention and in MTA)
    layout: dict = field(default_factory=dict)  # candidate → its cost keywords here (cost.mta_work's)
    group_costs: dict = field(default_factory=dict)  # HeadGroups → its cost (measured, or modelled once)
    errors: dict[MTAConfig, float] = field(default_factory=dict)  # exact upstream
    parts: dict[MTAConfig, tuple] = field(default_factory=dict)  # exact upstream, per head (num, den)
    costs: dict[MTAConfig, float] = field(default_factory=dict)
    front: list[MTAConfig] = field(default_factory=list)  # Pareto front, cost ascending
    head_front: list[MTAConfig] = field(default_factory=list)  # union of the heads' fronts

    def choice_cost(self, choice) -> float:
        if isinstance(choice, Learned):
            choice = choice.config  # learned summaries cost what means cost (one more pass over the keys)
        if isinstance(choice, Clustered):
            return relative_cost(choice.config, self.n, self.d, self.causal, clusters=choice.clusters, model=self.model,
                                 **self.shape())
        if choice is None:
            return 1.0
        if isinstance(choice, HeadGroups):
            if choice not in self.group_costs:  # (measured costs are set by _choose, which has the inputs)
                grouped = self.model.grouped_ms(choice.groups, self.n, self.d, self.causal, layout=self.layout.get,
                                                **self.shape())
                self.group_costs[choice] = grouped / self.model.exact_ms(self.n, self.d, self.causal, heads=self.heads,
                                                                         batch=self.batch, softcap=self.softcap)
            return self.group_costs[choice]
        return self.costs[choice]

    def shape(self) -> dict:
        """The site's heads, batch and soft-cap, as the cost model takes them."""
        return dict(heads=self.heads, kv_heads=self.kv_heads, batch=self.batch, softcap=self.softcap)


@dataclass
class PlanResult:
    configs: dict[str, MTAConfig]
    cost: float
    calibration_error: float | None  # None: not verified (a cheaper plan is within budget)
    holdout_error: float | None  # None: not measured (over budget already, or not verified)
    origin: str
    # samples run for each error, of how many: fewer when the sum so far already put the mean over
    # budget (errors are ≥ 0); the error is then that sum over all the samples, a lower bound
    calibration_runs: tuple[int, int] | None = None
    holdout_runs: tuple[int, int] | None = None

    def within(self, budget: float) -> bool:
        return (self.calibration_error is not None and self.calibration_error <= budget
                and self.holdout_error is not None and self.holdout_error <= budget)


@dataclass
class Calibration:
    """Everything calibrate() measured: the report is drawn from it."""

    sites: list[SiteStats]
    family: list[PlanResult]
    chosen: PlanResult
    budget: float
    metric: str
    local_errors: dict[str, float]  # chosen config's local error per site, upstream approximated


def split_samples(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the calibration and held-out samples (deterministic for a seed). With one
    sample, or holdout = 0, the held-out set is the calibration set."""
    if n == 1 or holdout == 0:
        return list(range(n)), list(range(n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_hold = min(n - 1, max(1, round(holdout * n)))
    return sorted(order[n_hold:]), sorted(order[:n_hold])


def _ladder() -> list[float]:
    return [0.0] + [10 ** (e / 4) for e in range(-12, 1)]  # 1e-3 … 1, four per decade


def _pareto(costs: dict, errors: dict) -> list[MTAConfig]:
    front, best = [], math.inf
    for cand in sorted(costs, key=lambda c: (costs[c], errors[c])):
        if errors[cand] < best:
            front.append(cand)
            best = errors[cand]
    return front


def _device_of(model, sample) -> torch.device:
    """Where the model runs: its first parameter's (or buffer's) device, else the first tensor of
    the sample's, else the CPU."""
    if isinstance(model, torch.nn.Module):
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        if first is not None:
            return first.device
    items = sample.values() if isinstance(sample, dict) else sample if isinstance(sample, (tuple, list)) else (sample,)
    return next((x.device for x in items if isinstance(x, torch.Tensor)), torch.device("cpu"))


def _nothing_to_calibrate(sites) -> str:
    """The one-line error for a model with no rewritable attention, with the first site's reason
    (a user of the command line saw "see find_attention", a Python function)."""
    attention = [s for s in sites if s.is_attention]
    if not attention:
        return "the model has no attention: nothing to calibrate"
    first = attention[0]
    return (f"the model has no rewritable attention: nothing to calibrate ({len(attention)} attention site(s) left "
            f"exact; {first.name}: {first.reason}; find_attention or mta-rewrite find lists every reason)")


def calibrate(
    model: torch.nn.Module,
    data: Sequence[Any],
    *,
    budget: float,
    metric: str = "rel_l2",
    candidates: Sequence[MTAConfig] | None = None,
    holdout: float = 0.25,
    seed: int = 0,
    output: str | None = None,
    progress: bool = True,
    return_details: bool = False,
    learn_summaries: bool = False,
    learned_plans: int = 3,
    boundaries: Boundaries | None = None,
    cluster_keys: bool = False,
    measure_costs: bool | MeasuredCosts | None = None,
    cost_model: TimeModel | None = None,
    last_positions: int | None = None,
):
    """The fastest plan whose end-to-end error on the model's first output stays ≤ ``budget``.
    Errors are measured against the model as ``rewrite`` runs it with every site exact (the op's
    exact path at the sites it lowers so, see :mod:`.probe`), which is the original up to rounding.

    ``data``: samples, each a tuple of positional arguments or a dict of keyword arguments.
    ``metric``: "rel_l2" (default), "cosine" (1 − cosine per row, mean) or "kl" (next-token
    KL divergence of logits). ``candidates``: the search space (default: :func:`default_candidates`
    at the longest sample's length); "exact" is always included. ``output``: save the plan there
    (JSON) with a report beside it (Markdown table and PNG plot). ``learn_summaries``: after the
    search, fit learned summaries (``calibration.learn``) for up to ``learned_plans`` plans: the
    cheaper plans of the family that were near the budget with means (cheapest first, until one is
    within it), else the chosen plan; the cheapest plan within budget wins, learned or not (at
    equal cost, the lower held-out error). ``boundaries``: every candidate with boundary chunks
    (segments ending after separator tokens of the model's token ids; costed as the op runs them on
    the CPU, see ``cost``); the plan carries them. ``cluster_keys``: after that, clustered summaries
    (``calibration.cluster``, non-causal sites) for up to ``learned_plans`` plans chosen the same
    way, each costed with its K summaries and the centroid scoring. ``measure_costs``: cost every
    candidate by timing it on this machine (``cost.MeasuredCosts``: the op against exact attention
    on each site's recorded inputs) instead of by the cost model (a ``MeasuredCosts`` instance: its
    timings, e.g. with other repeats); not with ``cluster_keys``. ``cost_model``: the modelled
    times (``cost.TimeModel``; ``benchmarks/bench_cost_model.py --fit`` fits one for a machine).
    ``last_positions``: every error (end to end, at the sites, in fitting learned summaries) over
    the last that many positions of each sample only: for a language model that will generate
    after long prompts, whose new tokens' error is that of the latest positions (MTA summarises
    the most keys there); not with ``cluster_keys`` (non-causal sites).

    Defaults by where the model runs (its parameters, else the first sample's tensors): on the
    CPU, the model ``cost.CPU`` (fitted on this project's CPU box), no timing; on a CUDA GPU,
    where no fitted constants exist, measured costs (without ``cluster_keys``), and ``cost.WORK``
    (the work alone) to decide which candidates are worth timing.
    """
    start = time.perf_counter()
    data = list(data)
    if not data:
        raise ValueError("calibrate needs at least one sample")
    if not isinstance(budget, (int, float)) or budget < 0 or math.isnan(budget):
        raise ValueError(f"budget must be a non-negative number, got {budget!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an integer a torch.Generator takes (from -2**63 to 2**64 − 1), got {seed!r}")
    if isinstance(learned_plans, bool) or not isinstance(learned_plans, int) or learned_plans < 1:
        raise ValueError(f"learned_plans must be an integer ≥ 1, got {learned_plans!r}")
    if measure_costs is not None and not isinstance(measure_costs, (bool, MeasuredCosts)):
        raise ValueError(f"measure_costs must be True, False or a calibration.cost.MeasuredCosts, got {measure_costs!r}")
    if measure_costs and cluster_keys:
        raise ValueError("measure_costs does not time clustered summaries: use it without cluster_keys")
    if last_positions is not None and (isinstance(last_positions, bool) or not isinstance(last_positions, int)
                                       or last_positions < 1):
        raise ValueError(f"last_positions must be an integer ≥ 1, got {last_positions!r}")
    if last_positions is not None and cluster_keys:
        raise ValueError("last_positions is for models that generate (causal sites); clustered summaries are for "
                         "non-causal ones: use one or the other")
    on_gpu = _device_of(model, data[0]).type == "cuda"
    if measure_costs is None:
        measure_costs = on_gpu and not cluster_keys
    if cost_model is None:
        cost_model = WORK if on_gpu else CPU
    if not isinstance(cost_model, TimeModel):
        raise ValueError(f"cost_model must be a calibration.cost.TimeModel, got {cost_model!r}")
    if output is not None:
        check_writable(output)  # not after the search: the plan and its report go there
    cal_idx, hold_idx = split_samples(len(data), holdout, seed)

    with _Progress(progress) as bar:
        bar.step("capturing the model")
        probe = Probe(model, *as_call(data[cal_idx[0]]), boundaries=boundaries)
        # every sample as a call of the captured model (positional or by keyword, flags filled in)
        data = [probe.bind(sample, i) for i, sample in enumerate(data)]
        cal = [data[i] for i in cal_idx]
        hold = cal if hold_idx == cal_idx else [data[i] for i in hold_idx]
        sites = probe.rewritable
        if not sites:
            check_not_rewritten(probe.module, probe.sites)  # the clearer error for a rewritten program
            raise ValueError(_nothing_to_calibrate(probe.sites))

        bar.step("reference outputs")
        reference = {}
        for i in sorted(set(cal_idx) | set(hold_idx)):
            out = _reference_output(probe, data[i], i)
            if not reference and metric == "kl":
                _check_logits(out)
            if not reference and last_positions is not None:
                last_positions_of(first_tensor(out), {}, last_positions)  # (its one-line error, before the search)
            reference[id(data[i])] = first_tensor(out)

        # ---- per-site errors (exact upstream) and greedy plans (upstream approximated) -----
        policies = [(per_head, tau) for per_head in (False, True) for tau in _ladder()]
        bar.start("site errors and greedy plans, site by site", None)
        timer = measure_costs if isinstance(measure_costs, MeasuredCosts) else MeasuredCosts() if measure_costs else None
        stats, chosen_by = _walk(probe, cal, candidates, policies, bar.advance, timer, cost_model, last_positions)
        if {st.name for st in stats} != {site.name for site in sites}:
            raise RuntimeError("calibration reached other sites than the probe holds")  # a bug, not the user's
        plans: dict[PlanKey, str] = {}
        local_errors: dict[PlanKey, dict] = {}
        for per_head, tau in policies:
            configs, errs = chosen_by[(per_head, tau)]
            key = _key(configs, stats)
            plans.setdefault(key, f"τ={tau:.3g}" + (" per head" if per_head else ""))
            local_errors.setdefault(key, errs)

        # ---- back off from the cheapest plan, least valuable approximation first ----------
        cheapest = min(plans, key=lambda k: _plan_cost(dict(k), stats))
        chain = dict(cheapest)
        chain_errors = local_errors[cheapest]
        by_name = {st.name: st for st in stats}

        def value(name):
            st = by_name[name]
            saved = st.weight * (1 - st.choice_cost(chain[name]))
            return saved / (chain_errors[name] + 1e-6)

        while chain:
            del chain[min(chain, key=value)]
            key = _key(chain, stats)
            plans.setdefault(key, "back-off")
            local_errors.setdefault(key, {name: chain_errors[name] for name in chain})

        # ---- verify plans end to end, cheapest first, until one is within budget ----------
        bar.start("verifying plans end to end, cheapest first", len(plans))
        family = []
        met = math.inf  # the cost of the cheapest plan within budget so far
        for key, origin in sorted(plans.items(), key=lambda item: _plan_cost(dict(item[0]), stats)):
            configs = dict(key)
            result = PlanResult(configs, _plan_cost(configs, stats), None, None, origin)
            family.append(result)
            bar.advance()
            if result.cost > met:
                continue  # cannot be chosen: a cheaper plan is within budget
            _verify(result, probe, cal, hold, reference, metric, budget, last_positions)
            if result.within(budget):
                met = min(met, result.cost)

        if learn_summaries:
            _refit("learned summaries", functools.partial(_fit_learned, last=last_positions), probe, cal, hold, family,
                   stats, local_errors, reference, metric, budget, learned_plans, bar, last_positions)
        if cluster_keys:
            _refit("clustered summaries", _fit_clustered, probe, cal, hold, family, stats, local_errors, reference,
                   metric, budget, learned_plans, bar)

    chosen = _cheapest_within(family, budget)
    local = local_errors[_key(chosen.configs, stats)]

    plan = Plan(boundaries=boundaries, metadata={
        "budget": budget, "metric": metric, "seed": seed,
        **({"last_positions": last_positions} if last_positions is not None else {}),
        "calibration_samples": len(cal), "holdout_samples": 0 if hold is cal else len(hold),
        "holdout_indices": hold_idx,
        "holdout_error": chosen.holdout_error, "calibration_error": chosen.calibration_error,
        "relative_attention_cost": chosen.cost, "attention_cost_saved": 1 - chosen.cost,
        "plans_considered": len(family), "plans_verified": sum(p.calibration_error is not None for p in family),
        # sites where no candidate was cheaper than exact attention (under the costs): kept exact
        "sites_without_candidates": [st.name for st in stats if not st.candidates],
        "site_lengths": sorted({st.n for st in stats}),
        "learned_summaries": learn_summaries, "clustered_summaries": cluster_keys,
        "costs": (f"measured on {timer.machine()}" if timer is not None
                  else f"modelled (calibration.cost: {cost_model.machine})"),
        "wall_time_s": round(time.perf_counter() - start, 2),
    })
    for site in probe.sites:
        if not site.is_attention:
            continue
        st = by_name.get(site.name)
        cfg = chosen.configs.get(site.name)
        plan.sites[site.name] = PlanEntry(cfg, error=local.get(site.name, 0.0 if st else None),
                                          relative_cost=st.choice_cost(cfg) if st else 1.0)
    details = Calibration(stats, family, chosen, budget, metric, local)
    if output is not None:
        from .report import write_report

        plan.save(output)
        write_report(details, plan, output)
    return (plan, details) if return_details else plan


# ---- helpers ----------------------------------------------------------------------------------

def _fit_learned(probe, cal, configs, advance, last: int | None = None):
    """(configs with learned summaries, site → its error after the fit)."""
    from .learn import fit_summaries

    configs, fits = fit_summaries(probe, cal, configs, advance=advance, last=last)
    return configs, {name: fit.learned_error for name, fit in fits.items()}


def _fit_clustered(probe, cal, configs, advance):
    """(configs with clustered summaries, site → its error after the fit)."""
    from .cluster import fit_clusters

    configs, fits = fit_clusters(probe, cal, configs, advance=advance)
    return configs, {name: min(fit.clustered_error, fit.mean_error) for name, fit in fits.items()}


def _refit(label, fit, probe, cal, hold, family, stats, local_errors, reference, metric, budget, count, bar,
           last: int | None = None) -> None:
    """Summaries fitted on the calibration samples (``fit``: learned summaries or clustered ones)
    for up to ``count`` plans, each verified end to end on them and the held-out ones and appended
    to ``family`` (origin "… + {label}"). First the plans cheaper than the chosen one whose error
    with means was at most ``LEARN_HEADROOM`` × budget on the calibration samples, cheapest first,
    until one is within budget fitted (the cheapest plan fitting can bring within budget, among
    those tried); if none is, the chosen plan itself (a lower error at about the same cost)."""
    chosen = _cheapest_within(family, budget)
    plain = [p for p in family if " + " not in p.origin]  # (not the plans another fit made)
    cheaper = sorted((p for p in plain if p.configs and p.cost < chosen.cost and p.calibration_error is not None
                      and p.calibration_error <= LEARN_HEADROOM * budget), key=lambda p: p.cost)
    # (a chosen plan that an earlier fit made: its plain plan, the configurations without the fit)
    stripped = {name: c.config if isinstance(c, (Learned, Clustered)) else c for name, c in chosen.configs.items()}
    base_chosen = next((p for p in plain if p.configs == stripped), None)
    tries = cheaper[:count - 1] + ([base_chosen] if base_chosen is not None and base_chosen.configs else [])
    for base in tries:
        bar.start(f"{label}: {base.origin} (cost {base.cost:.3f})", len(base.configs))
        configs, errors = fit(probe, cal, base.configs, bar.advance)
        result = PlanResult(configs, _plan_cost(configs, stats), None, None, f"{base.origin} + {label}")
        family.append(result)
        before = local_errors.get(_key(base.configs, stats), {})
        local_errors.setdefault(_key(configs, stats), {name: errors.get(name, before.get(name, 0.0)) for name in configs})
        _verify(result, probe, cal, hold, reference, metric, budget, last)
        if result.within(budget):
            break


def _verify(result: PlanResult, probe, cal, hold, reference, metric, budget: float, last: int | None = None) -> None:
    """The plan's end-to-end error on the calibration samples and, if that is within budget, on
    the held-out ones (the same figures when there are none)."""
    result.calibration_error, result.calibration_runs = _end_to_end(probe, cal, result.configs, reference, metric,
                                                                    budget, last)
    if result.calibration_error <= budget:
        if hold is cal:
            result.holdout_error, result.holdout_runs = result.calibration_error, result.calibration_runs
        else:
            result.holdout_error, result.holdout_runs = _end_to_end(probe, hold, result.configs, reference, metric,
                                                                    budget, last)


def _cheapest_within(family: list[PlanResult], budget: float) -> PlanResult:
    """The cheapest plan within budget (at equal cost, the lower held-out error); the all-exact
    plan (cost 1, error 0) always is."""
    return min((p for p in family if p.within(budget)), key=lambda p: (p.cost, p.holdout_error))


def _key(configs: dict, stats: list[SiteStats]) -> PlanKey:
    return tuple((st.name, configs[st.name]) for st in stats if st.name in configs)


def _plan_cost(configs: dict, stats: list[SiteStats]) -> float:
    total = sum(st.weight for st in stats)
    return sum(st.weight * st.choice_cost(configs.get(st.name)) for st in stats) / total


def _reference(recs, last: int | None = None) -> LocalReference:
    return LocalReference([r.exact for r in recs], [r.mask for r in recs], last)


def _site_parts(recs, config: MTAConfig, reference: LocalReference | None = None):
    """``config``'s local error parts at a site (per head: squared error, squared exact norm) over
    the samples ``recs``; ``reference``: their :func:`_reference`, when several candidates share it.
    Where only the last positions count (``last_positions``), the op computes the query rows
    from the first that counts (``rows_from``; the chunks or blocks before it are left out: with
    SmolLM2's last 8 positions they took 163 of a calibration's 335 s at 986 tokens and 1340 of
    1884 s at 1970, then 41 and 257 s, docs/calibration.md)."""
    reference = reference or _reference(recs)
    outs = [site_output(config, None, r.q, r.k, r.v, r.mask, r.causal, r.scale, r.q.dtype, segment_ids=r.segment_ids,
                        sink_logits=r.sink_logits, softcap=r.softcap, rows_from=reference.rows_from(r.q.shape[-2]))
            for r in recs]
    return reference.parts(outs)


def _site_stats(name: str, recs, candidates, timer: MeasuredCosts | None = None, model: TimeModel = CPU,
                last: int | None = None) -> SiteStats:
    """A site's candidates (those under the crossover), their costs and their errors with exact
    upstream, overall and per head, and the Pareto fronts the greedy passes choose from. Costs
    are ``model``'s (at the site's batch and heads); with a ``timer`` the costs of the candidates
    the model puts under the crossover are measured, and the site's weight is exact attention's
    measured time."""
    q, k = recs[0].q, recs[0].k
    n, d = max(r.q.shape[-2] for r in recs), q.shape[-1]
    causal = all(_runs_causal(r) for r in recs)
    st = SiteStats(name, n, d, causal, 0.0, heads=q.shape[1], kv_heads=k.shape[1], batch=q.shape[0], model=model,
                   softcap=any(r.softcap for r in recs))
    st.weight = model.exact_ms(n, d, causal, heads=st.heads, batch=st.batch, softcap=st.softcap)
    pool = list(candidates) if candidates is not None else default_candidates(n)
    exact_blocks = _exact_block_fractions(recs, pool)
    layout = _layout_costs(recs, pool, n, causal)
    st.layout = {c: dict(exact_fraction=exact_blocks[c], **layout[c]) for c in pool}
    costs = {c: relative_cost(c, n, d, causal, model=model, **st.shape(), **st.layout[c]) for c in pool}
    if timer is not None:
        longest = max(recs, key=lambda r: r.q.shape[-2])
        st.weight = timer.exact_ms(longest)
        costs = {c: timer.relative(longest, c) for c in pool if costs[c] < 1.0}
    st.candidates = [c for c in pool if costs.get(c, 1.0) < 1.0]  # the crossover
    st.costs = {c: costs[c] for c in st.candidates}
    reference = _reference(recs, last)
    for cand in st.candidates:
        st.parts[cand] = _site_parts(recs, cand, reference)
        st.errors[cand] = relative(*st.parts[cand])
    st.front = _pareto(st.costs, st.errors)
    fronts = set()
    for h in range(st.heads):
        fronts.update(_pareto(st.costs, {c: float(p[0][h] / p[1][h].clamp(min=1e-30)) for c, p in st.parts.items()}))
    st.head_front = sorted(fronts, key=lambda c: (st.costs[c], st.errors[c]))
    return st


def _layout_costs(recs, pool, n: int, causal: bool) -> dict:
    """Per candidate, how the op's layout is costed at this site (``cost.relative_cost``'s
    keywords). In query blocks where the op runs so on the CPU (``ops.varlen``: the site's masks
    are none or key padding; boundary chunks, or fixed chunks without top-k that
    ``varlen.blocks_beat_chunks``): from the block layout, the most columns over the samples (with
    top-k, the columns of the chunks the op selects on each sample). Other boundary candidates at
    the padded length of their chunk slots (the longest over the samples); other fixed candidates
    chunk by chunk (no keywords)."""
    from ..ops.segments import padded_length
    from ..ops.varlen import blocks_beat_chunks, key_columns, runs_unpadded

    boundaries = recs[0].segment_ids is not None
    blocks_apply = all(runs_unpadded(r.mask, *r.q.shape[:3], r.causal) for r in recs)
    cache: dict = {}
    out = {}
    for c in pool:
        shape = dict(chunk_size=c.chunk_size, causal=causal, local_chunks=c.local_chunks, sinks=c.sinks)
        if blocks_apply and (boundaries or c.top_k == 0 and blocks_beat_chunks(c.chunk_size, n)):
            key = ("blocks", c.chunk_size, c.local_chunks, c.sinks, c.top_k)
            if key not in cache:
                if c.top_k:  # the selected chunks' tokens depend on each sample's q and k
                    counts = [key_columns(r.segment_ids, n=n, top_k=c.top_k, q=r.q, k=r.k, attn_mask=r.mask,
                                          scale=r.scale, **shape) for r in recs]
                else:
                    ids = [r.segment_ids for r in recs] if boundaries else [None]
                    counts = [key_columns(x, n=n, **shape) for x in ids]
                cache[key] = {"block_columns": max(counts)}
        elif boundaries:
            key = ("slots", c.chunk_size, c.sinks)
            if key not in cache:
                cache[key] = {"padded_n": max(padded_length(r.segment_ids, c.chunk_size, c.sinks) for r in recs)}
        else:
            key = ()
            cache[key] = {}
        out[c] = cache[key]
    return out


def _exact_block_fractions(recs, pool) -> dict:
    """Per candidate: the fraction of the blocks it would summarise that the op attends exactly
    at this site (the mask or its bias varies inside them: ALiBi everywhere, T5's buckets near
    the diagonal), averaged over the samples; 0 for every candidate when the site has no mask or
    one the op recognises as key padding (∧ the triangle). Without it a bias site was costed as
    if summarised while the op computed it exactly: Bloom was "0.48 of exact" at error 2e-8."""
    if all(r.mask is None for r in recs):
        return dict.fromkeys(pool, 0.0)
    by_shape: dict = {}  # (the fraction does not depend on top_k)
    for cand in pool:
        key = (cand.chunk_size, cand.local_chunks, cand.sinks)
        if key not in by_shape:
            by_shape[key] = sum(
                exact_block_fraction(r.mask, r.q.shape[0], r.q.shape[1], r.q.shape[-2], chunk_size=cand.chunk_size,
                                     causal=r.causal, local_chunks=cand.local_chunks, sinks=cand.sinks)
                for r in recs) / len(recs)
    return {cand: by_shape[(cand.chunk_size, cand.local_chunks, cand.sinks)] for cand in pool}


def _runs_causal(rec) -> bool:
    """Whether the op computes this site causally: asked to, or handed a mask that is the causal
    triangle (∧ key padding), which it recognises (``ops.masks.simplify_mask``). transformers'
    decoders give every layer such a mask with causal=False; costing them as non-causal doubled
    exact attention's modelled cost and let candidates that cannot win pass the crossover."""
    if rec.causal:
        return True
    if rec.mask is None or rec.q.shape[-2] != rec.k.shape[-2]:
        return False
    return simplify_mask(rec.mask, rec.q.shape[0], rec.q.shape[1], rec.q.shape[-2], False)[1]


def _walk(probe: Probe, cal: list, candidates, policies: list, advance,
          timer: MeasuredCosts | None = None, model: TimeModel = CPU,
          last: int | None = None) -> tuple[list[SiteStats], dict]:
    """Steps 2 and 3: every policy (per_head, τ) walks the sites in graph order, choosing at each
    with the upstream sites approximated as it chose before. Depth first over the tree of
    upstream plans: a node is a site reached under one upstream plan, by the policies that chose
    that plan so far; its calibration inputs come from one forward pass per sample up to it,
    forked from its parent's (:class:`~.probe.Cursor`); its front candidates are measured once
    for all those policies, and only those some policy reaches in its scan (:func:`_lazy_parts`);
    the policies then split by their choice there. The all-exact branch (τ = 0
    chooses exact everywhere) is walked first and measures every candidate: step 2's statistics.

    Returns (the sites' statistics in graph order, policy → (site → choice, site → local error)).
    """
    stats: dict[str, SiteStats] = {}
    chosen = {policy: ({}, {}) for policy in policies}
    stack = [([probe.cursor(sample) for sample in cal], False, list(policies))]
    while stack:
        cursors, approximated_upstream, group = stack.pop()
        calls = [cursor.advance() for cursor in cursors]
        if calls[0] is None:
            continue  # past the last site
        name = calls[0].name
        recs = [call.record for call in calls]
        if name not in stats:  # first reached on the all-exact branch: exact upstream
            if approximated_upstream:
                raise RuntimeError(f"site {name} reached with approximated upstream before exact")  # a bug
            stats[name] = _site_stats(name, recs, candidates, timer, model, last)
        st = stats[name]
        if approximated_upstream:
            parts = _lazy_parts(recs, last)
        else:
            parts = st.parts.__getitem__
        longest = max(recs, key=lambda r: r.q.shape[-2]) if timer is not None else None
        del recs
        by_choice: dict = {}
        for policy in group:
            choice, err = _choose(st, parts, *policy, timer=timer, rec=longest)
            if choice is not None:
                chosen[policy][0][name], chosen[policy][1][name] = choice, err
            by_choice.setdefault(choice, []).append(policy)
        del parts, longest  # (hold the node's site inputs)
        branches = sorted(by_choice.items(), key=lambda item: item[0] is not None)  # exact first
        for i in reversed(range(len(branches))):  # pushed last, popped first: the exact branch
            choice, policies_here = branches[i]
            children = cursors if i == 0 else [cursor.fork() for cursor in cursors]
            for child, call in zip(children, calls):
                child.resume(call.output(choice))
            stack.append((children, approximated_upstream or choice is not None, policies_here))
        del calls
        release_freed_memory()
        advance()
    order = {site.name: i for i, site in enumerate(probe.rewritable)}
    return sorted(stats.values(), key=lambda st: order.get(st.name, len(order))), chosen


def _lazy_parts(recs, last: int | None = None):
    """``parts(cand)``: a candidate's error parts at a node with approximated upstream, measured
    when a policy first asks for it. A policy scans the front in cost order and stops at its
    choice (per head: once every head has one), so candidates costlier than every choice made
    at the node are never run; the values are those measuring them all would give."""
    reference = _reference(recs, last)
    measured: dict = {}

    def parts(cand):
        if cand not in measured:
            measured[cand] = _site_parts(recs, cand, reference)
        return measured[cand]

    return parts


def _choose(st: SiteStats, parts, per_head: bool, tau: float, timer: MeasuredCosts | None = None, rec=None):
    """A policy's choice at one site, given the candidates' error parts there (``parts(cand)``):
    the cheapest front candidate within τ (None: exact), or per head the cheapest within τ for
    each head (a HeadGroups, or None if every head stays exact, or if computing the site in those
    groups would cost as much as exact attention: one call per group); and its local error. With
    a ``timer`` a HeadGroups' cost is timed on ``rec``, the site's longest input."""
    if tau == 0:
        return None, None
    if not per_head:
        for cand in st.front:
            err = relative(*parts(cand))
            if err <= tau:
                return cand, err
        return None, None
    chosen: list = [None] * st.heads
    num = den = None
    for cand in st.head_front:  # cost ascending: a head's first fit is its cheapest
        n_c, d_c = parts(cand)
        num = torch.zeros_like(n_c) if num is None else num
        den = d_c
        per = (n_c / d_c.clamp(min=1e-30)).sqrt()
        for h in range(st.heads):
            if chosen[h] is None and per[h] <= tau:
                chosen[h] = cand
                num[h] = n_c[h]
        if all(c is not None for c in chosen):
            break
    choice = HeadGroups.from_heads(chosen)
    if choice is None:
        return None, None
    if isinstance(choice, HeadGroups):
        if timer is not None and choice not in st.group_costs:
            st.group_costs[choice] = timer.relative(rec, choice)
        if st.choice_cost(choice) >= 1.0:
            return None, None
    return choice, relative(num, den)


def _check_logits(out) -> None:
    """``kl`` compares next-token distributions: warn when the output says its first tensor is not
    logits (a transformers encoder's ``last_hidden_state``), where the budget would bound the
    divergence of softmaxed features. A plain tensor or tuple says nothing: no warning."""
    name = first_tensor_name(out)
    if name is not None and "logit" not in name.lower():
        warnings.warn(f"metric 'kl' compares next-token distributions, but the model's first output is {name}, not "
                      "logits: the budget would bound the divergence of softmaxed features (rel_l2 or cosine measure "
                      "those)", stacklevel=3)


def _reference_output(probe: Probe, sample, index: int):
    """The model's output on a sample with every site exact. The first pass on each sample:
    where the model fails on it, the sample is what is wrong (a shape the captured program fixed,
    token ids as floats), and the error is one line naming it."""
    try:
        return probe.forward(sample)
    except Exception as exc:  # noqa: BLE001  (whatever the model raises on the user's data)
        if _raised_in_the_op(exc):
            raise  # the op's exact path failed: ours to fix, not the sample's fault
        clause = guard_failure(exc)
        if clause is not None:
            raise ValueError(f"sample {index} does not fit the captured program, which {clause}") from exc
        message = str(exc).strip()
        first = message.splitlines()[0] if message else ""
        raise ValueError(f"sample {index}: the model fails on it with every site exact: "
                         f"{type(exc).__name__}: {first}") from exc


def _raised_in_the_op(exc: BaseException) -> bool:
    """Whether the traceback passes through the op's code (``ops``, ``kernels``, ``passes``)."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1]
    ours = tuple(str(package / part) for part in ("ops", "kernels", "passes"))
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(ours):
            return True
        tb = tb.tb_next
    return False


def _end_to_end(probe, samples, configs, reference, metric, budget: float,
                last: int | None = None) -> tuple[float, tuple[int, int]]:
    """The plan's mean error over ``samples`` and (samples run, samples). Every sample's error is
    ≥ 0, so once their sum exceeds budget × len(samples) the mean is over budget whatever the
    others give: the remaining samples are not run, and the error returned is that sum over
    len(samples), a lower bound of the mean (the decision is the same as with every sample)."""
    if not configs:
        return 0.0, (len(samples), len(samples))  # every site exact: the reference itself
    total = 0.0
    for i, sample in enumerate(samples):
        out = first_tensor(probe.forward(sample, configs))
        release_freed_memory()
        total += output_error(metric, out, reference[id(sample)], probe.bind(sample).by_name, last)
        if total > budget * len(samples):
            return total / len(samples), (i + 1, len(samples))
    return total / len(samples), (len(samples), len(samples))


class _Progress:
    """A rich progress bar over the calibration steps (or nothing, with progress=False)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)

    def step(self, description: str) -> None:
        self.start(description, 1)

    def start(self, description: str, total: int | None) -> None:
        """A new step of ``total`` units (None: not known in advance)."""
        if self.enabled:
            if self.task is not None:
                self.bar.update(self.task, visible=False)
            self.task = self.bar.add_task(description, total=None if total is None else max(total, 1))

    def advance(self) -> None:
        if self.enabled and self.task is not None:
            self.bar.advance(self.task)
