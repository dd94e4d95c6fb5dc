"""How commands talk to people and scripts: rich for people, stable JSON for scripts.

This module and the command modules are the only places that print.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class Settings:
    """Global options, shared by every command through the click context."""

    home: Path
    json: bool = False
    debug: bool = False
    _console: Console | None = field(default=None, repr=False)
    _err_console: Console | None = field(default=None, repr=False)

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False)
        return self._console

    @property
    def err_console(self) -> Console:
        if self._err_console is None:
            from rich.console import Console

            self._err_console = Console(stderr=True, highlight=False)
        return self._err_console


def settings(ctx: typer.Context) -> Settings:
    obj = ctx.find_root().obj
    assert isinstance(obj, Settings)
    return obj


def emit_json(data: Any) -> None:
    """One JSON document on stdout: sorted keys, so that scripts can diff outputs."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_chunks(chunks: Iterable[str], target: Path | None = None) -> None:
    """Stream text (a dump, a delta) to stdout or to a file, written whole or not at all."""
    if target is None:
        write = sys.stdout.write
        for chunk in chunks:
            write(chunk)
        sys.stdout.flush()
        return
    from thinmgr.ops.files import atomic_text_writer

    with atomic_text_writer(target) as handle:
        for chunk in chunks:
            handle.write(chunk)


def table(
    ctx: typer.Context,
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[object]],
    *,
    right: Sequence[str] = (),
) -> None:
    from rich.table import Table

    t = Table(title=title, show_edge=False, header_style="bold")
    for name in columns:
        t.add_column(name, justify="right" if name in right else "left")
    for row in rows:
        t.add_row(*(str(v) for v in row))
    settings(ctx).console.print(t)
