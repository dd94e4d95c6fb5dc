"""Shared rendering for the manager commands (pool, volume, snapshot, doctor)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import typer

from thinmgr.cli.output import settings


def stage_reporter(ctx: typer.Context) -> object:
    """A ``Stage`` for ops: a rich spinner on a terminal while a slow step runs."""
    s = settings(ctx)
    if s.json or not sys.stderr.isatty():

        def quiet(_description: str) -> AbstractContextManager[object]:
            return nullcontext()

        return quiet

    @contextmanager
    def spinner(description: str) -> Iterator[None]:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=s.err_console,
            transient=True,
        ) as progress:
            progress.add_task(description, total=None)
            yield

    return spinner


def size(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    from thinmgr.ops.units import format_size

    return format_size(nbytes)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def say(ctx: typer.Context, text: str) -> None:
    settings(ctx).console.print(text)


def warn(ctx: typer.Context, text: str) -> None:
    settings(ctx).err_console.print(f"[yellow]warning:[/yellow] {text}")


def fields(ctx: typer.Context, rows: list[tuple[str, object]]) -> None:
    """A two-column key/value table, for one object (a pool, a volume)."""
    from rich.table import Table

    t = Table(show_header=False, show_edge=False, box=None, padding=(0, 2, 0, 0))
    t.add_column(style="bold")
    t.add_column()
    for key, value in rows:
        t.add_row(key, str(value))
    settings(ctx).console.print(t)
