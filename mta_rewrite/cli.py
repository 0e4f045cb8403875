"""The ``mta-rewrite`` command line: a thin typer layer over the Python API (no logic here)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Rewrite the attention of PyTorch models into Multi-Token Attention (MTA).")
console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


def sites_table(sites, plan=None, title="attention sites") -> Table:
    table = Table(title=title)
    for col in ("site", "kind", "B", "heads q/kv", "n", "d", "mask", "causal", "MTA"):
        table.add_column(col)
    for s in sites:
        status = (str(plan[s.name]) if plan and s.name in plan else "found") if s.rewritable else f"[yellow]exact:[/yellow] {s.reason}"
        table.add_row(s.name, s.kind, str(s.batch), f"{s.q_heads}/{s.kv_heads}", str(s.seq_len), str(s.head_dim),
                      s.mask, "yes" if s.causal else "no", status)
    return table


@app.command()
def demo(
    model: str = typer.Option("auto", help="auto (real MiniLM if installed), minilm or builtin"),
    chunk_size: int = typer.Option(64, help="chunk size c"),
    local_chunks: int = typer.Option(2, help="local window L in chunks"),
    sinks: int = typer.Option(4, help="always-exact first tokens"),
    top_k: int = typer.Option(2, help="exactly attended chunks per query chunk"),
    long_n: int = typer.Option(16384, help="sequence length for timing the built-in model"),
) -> None:
    """The built-in example: find and rewrite the attention of a model, compare, time."""
    from .config import MTAConfig
    from .demo import run_demo

    try:
        config = MTAConfig(chunk_size=chunk_size, local_chunks=local_chunks, sinks=sinks, top_k=top_k)
        if long_n < 2:
            raise ValueError(f"--long-n must be at least 2, got {long_n}")
        with console.status("starting") as status:
            result = run_demo(model, config, long_n, progress=lambda m: status.update(m))
    except ValueError as exc:
        _fail(str(exc))
    console.print(f"[bold]{result.model}[/bold]: {result.rewritten} of {sum(s.is_attention for s in result.sites)} "
                  f"attention sites rewritten with MTA ({result.config})")
    console.print(sites_table(result.sites, {s.name: result.config for s in result.sites if s.rewritable}))
    summary = Table(title="original vs MTA")
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    for key, value in result.metrics.items():
        summary.add_row(key, value)
    console.print(summary)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def main() -> None:
    app()
