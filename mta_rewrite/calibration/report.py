"""The calibration report beside a saved plan: a Markdown table and a PNG plot of error vs cost
per site (every candidate measured with exact upstream; the Pareto front; the chosen point)."""

from __future__ import annotations

from pathlib import Path

from ..config import Clustered, Learned, Plan, atomic_write, atomic_write_text


def report_paths(plan_path) -> tuple[Path, Path]:
    p = Path(plan_path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(stem + ".report.md"), p.with_name(stem + ".report.png")


def write_report(details, plan: Plan, plan_path) -> tuple[Path, Path | None]:
    md_path, png_path = report_paths(plan_path)
    meta = plan.metadata
    lines = [
        f"# Calibration report: {Path(plan_path).name}", "",
        f"budget {meta['budget']} ({meta['metric']}"
        + (f", over the last {meta['last_positions']} positions of each sample" if meta.get("last_positions") else "")
        + f"); held-out error {meta['holdout_error']:.4g}, "
        f"calibration error {meta['calibration_error']:.4g}; attention cost {meta['relative_attention_cost']:.3f} "
        f"of exact ({100 * meta['attention_cost_saved']:.1f}% saved; costs {meta.get('costs', 'modelled')}); "
        f"{meta['calibration_samples']} calibration and "
        f"{meta['holdout_samples']} held-out samples; {meta['plans_verified']} of "
        f"{meta['plans_considered']} plans verified; {meta['wall_time_s']} s.", "",
        *([f"{len(meta['sites_without_candidates'])} of {len(details.sites)} sites had no candidate configuration "
           f"cheaper than exact attention at their lengths under these costs: kept exact "
           f"({_listed(meta['sites_without_candidates'])}).", ""] if meta.get("sites_without_candidates") else []),
        "| site | n | d | causal | chosen | local error | relative cost |", "|---|---|---|---|---|---|---|",
    ]
    for st in details.sites:
        entry = plan.sites[st.name]
        chosen = "exact" if entry.config is None else entry.config.short
        err = "0" if entry.config is None else f"{entry.error:.3g}"
        causal = "yes" if st.causal else "no"
        lines.append(f"| {st.name} | {st.n} | {st.d} | {causal} | {chosen} | {err} | {entry.relative_cost:.3f} |")
    lines += ["", "The family of plans, cheapest first (cost relative to exact attention; verified end to end until one "
              "was within budget: costlier plans could not be chosen and were not run; a plan over budget on the "
              "calibration samples was not run on the held-out ones; \"≥ e (k of m samples)\": over budget after k "
              "samples, e is a lower bound of the mean):", "",
              "| origin | relative cost | calibration error | held-out error | within budget |", "|---|---|---|---|---|"]
    for p in sorted(details.family, key=lambda p: p.cost):
        mark = " (chosen)" if p is details.chosen else ""
        if p.calibration_error is None:
            lines.append(f"| {p.origin} | {p.cost:.3f} | not run | not run | not needed |")
            continue
        hold = "not run" if p.holdout_error is None else _error(p.holdout_error, p.holdout_runs)
        ok = "yes" if p.within(details.budget) else "no"
        lines.append(f"| {p.origin}{mark} | {p.cost:.3f} | {_error(p.calibration_error, p.calibration_runs)} | {hold} "
                     f"| {ok} |")
    png = _plot(details, plan, png_path)
    if png is not None:
        lines += ["", f"![error vs cost per site]({png.name})"]
    atomic_write_text(md_path, "\n".join(lines) + "\n")
    return md_path, png


def _listed(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _error(value: float, runs) -> str:
    """An end-to-end error; one cut short (over budget after some samples) is a lower bound."""
    if runs is not None and runs[0] < runs[1]:
        return f"≥ {value:.4g} ({runs[0]} of {runs[1]} samples)"
    return f"{value:.4g}"


def _plot(details, plan, png_path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report keeps its table; the plot needs matplotlib
        return None
    sites = details.sites
    cols = min(3, len(sites))
    rows = -(-len(sites) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, st in zip(axes.flat, sites):
        ax.set_title(st.name, fontsize=8)
        if not st.candidates:  # nothing cheaper than exact attention (nothing to put on log axes)
            ax.text(0.5, 0.5, "no candidate cheaper than exact:\nkept exact", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        costs = [st.costs[c] for c in st.candidates]
        errs = [max(st.errors[c], 1e-6) for c in st.candidates]
        ax.scatter(costs, errs, s=8, c="#9aa", label="candidates")
        ax.plot([st.costs[c] for c in st.front], [max(st.errors[c], 1e-6) for c in st.front], "-", c="#36c", lw=1,
                label="Pareto front")
        cfg = plan.sites[st.name].config
        label = None if cfg is None else cfg.short
        cfg = cfg.config if isinstance(cfg, (Learned, Clustered)) else cfg  # learned, clustered: at their configuration
        chosen = [] if cfg is None else [c for c, _ in cfg.groups if c is not None] if hasattr(cfg, "groups") else [cfg]
        if chosen:
            ax.scatter([st.costs[c] for c in chosen], [max(st.errors[c], 1e-6) for c in chosen], s=60, c="#d30", marker="*",
                       zorder=3, label=f"chosen {label}"[:60])
        else:
            ax.axvline(1.0, c="#d30", lw=1, ls="--", label="chosen: exact")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("relative cost")
        ax.set_ylabel("local rel. L2 error")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(sites):]:
        ax.axis("off")
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return png_path
