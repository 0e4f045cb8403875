"""The ``mta-rewrite`` command line: a thin typer layer over the Python API (no logic here)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Rewrite attention into Multi-Token Attention (MTA).")
console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


@app.command()
def demo(
    n: int = typer.Option(8192, help="sequence length to time"),
    heads: int = typer.Option(8, help="attention heads"),
    head_dim: int = typer.Option(64, help="head dimension"),
    chunk_size: int = typer.Option(0, help="chunk size (0: about √n)"),
) -> None:
    """Run the built-in example: the MTA op against the float64 reference and against SDPA."""
    from .demo import run_op_demo

    if heads < 1 or head_dim < 1 or chunk_size < 0:
        _fail("--heads and --head-dim must be positive and --chunk-size non-negative")
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"timing SDPA and MTA at n = {n}", total=2)
            rows = run_op_demo(n, heads, head_dim, chunk_size or None, progress=lambda: progress.advance(task))
    except ValueError as exc:
        _fail(str(exc))
    table = Table(title=f"MTA op vs scaled_dot_product_attention (B=1, H={heads}, d={head_dim}, fp32, CPU)")
    for col in ("mode", "n", "chunk", "max |err| vs fp64 reference", "SDPA ms", "MTA ms", "speed-up"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r.mode, str(r.n), str(r.chunk_size), f"{r.max_err_vs_reference:.1e}",
                      f"{r.sdpa_ms:.1f}", f"{r.mta_ms:.1f}", f"{r.speedup:.1f}×")
    console.print(table)


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)


def main() -> None:
    app()
