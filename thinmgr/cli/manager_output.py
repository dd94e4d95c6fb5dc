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


# Above this many rows a listing is printed as plain aligned text: rich lays out every cell
# (about 0.6 s for 1,000 volumes on a small machine), which `volume list` cannot afford.
PLAIN_TABLE_ROWS = 100


def listing(
    ctx: typer.Context,
    columns: list[str],
    rows: list[tuple[object, ...]],
    *,
    right: tuple[str, ...] = (),
) -> None:
    """A table of many rows: rich for a short one, plain aligned columns for a long one."""
    from thinmgr.cli.output import table

    if len(rows) <= PLAIN_TABLE_ROWS:
        table(ctx, None, columns, rows, right=right)
        return
    cells = [columns, *([str(v) for v in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    out = []
    for line in cells:
        parts = [
            text.rjust(width) if name in right else text.ljust(width)
            for text, width, name in zip(line, widths, columns, strict=True)
        ]
        out.append("  ".join(parts).rstrip())
    sys.stdout.write("\n".join(out) + "\n")
