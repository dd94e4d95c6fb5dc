"""`thinmgr diff POOL A B`: the changed block ranges between two volumes of a pool."""

from __future__ import annotations

import json
import os
import sys
from enum import StrEnum
from typing import Annotated

import typer

from thinmgr.cli.output import settings, table, write_chunks


class DiffFormat(StrEnum):
    text = "text"
    json = "json"
    xml = "xml"


def diff(
    ctx: typer.Context,
    pool: Annotated[str, typer.Argument(help="Pool name.")],
    left: Annotated[str, typer.Argument(help="The older volume (e.g. the snapshot parent).")],
    right: Annotated[str, typer.Argument(help="The newer volume.")],
    fmt: Annotated[
        DiffFormat | None,
        typer.Option(
            "--format",
            help="text: a table of ranges; json; xml: thin_delta --changed-only's XML. "
            "[default: text, or json with --json]",
        ),
    ] = None,
    files: Annotated[
        bool,
        typer.Option(
            "--files",
            help="List the files that changed (both volumes hold ext4): kind and path. "
            "Only what lies in changed blocks is looked at (docs/file-diff.md).",
        ),
    ] = False,
    stats: Annotated[
        bool,
        typer.Option("--stats", help="With --files: print what the walk looked at to stderr."),
    ] = False,
) -> None:
    """Changed block ranges between two volumes, read from the pool metadata.

    Subtrees both volumes share are never read, so the cost follows the changes, not the
    volume size. Kinds: left_only (unmapped in B), right_only (new in B), different.

    With --files: the paths that differ, as added, removed, modified (contents),
    metadata (attributes only) or type-changed, sorted by path.
    """
    from thinmgr.ops.diff import diff_volumes
    from thinmgr.ops.manager import open_manager

    chosen = fmt or (DiffFormat.json if settings(ctx).json else DiffFormat.text)
    if files:
        _diff_files(ctx, pool, left, right, chosen, stats)
        return
    with open_manager(settings(ctx).home) as mgr:
        result = diff_volumes(mgr, pool, left, right, xml=chosen == DiffFormat.xml)
    if chosen == DiffFormat.xml:
        write_chunks(result.xml)
        return
    runs = [(r.kind.xml_name, r.begin, r.length) for r in result.delta.runs]
    if chosen == DiffFormat.json:
        document = {
            "pool": pool,
            "left": {"name": result.left.name, "thin_id": result.left.thin_id},
            "right": {"name": result.right.name, "thin_id": result.right.thin_id},
            "block_size": result.block_size,
            "changed_blocks": sum(n for _, _, n in runs),
            "ranges": [{"kind": k, "begin": b, "length": n} for k, b, n in runs],
        }
        write_chunks([json.dumps(document, indent=2, sort_keys=True), "\n"])
        return
    bs = result.block_size
    table(
        ctx,
        f"{pool}: {left} -> {right} ({len(runs)} ranges, {sum(n for *_, n in runs)} blocks "
        f"of {bs // 1024} KiB)",
        ["kind", "begin", "length", "bytes"],
        ((k, b, n, f"{b * bs}+{n * bs}") for k, b, n in runs),
        right=["begin", "length", "bytes"],
    )


def _printable(path: str) -> str:
    """A path on one line: undecodable bytes and control characters as backslash escapes."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _diff_files(
    ctx: typer.Context, pool: str, left: str, right: str, chosen: DiffFormat, stats: bool
) -> None:
    from thinmgr.errors import UsageError
    from thinmgr.ops.filediff import diff_files
    from thinmgr.ops.manager import open_manager

    if chosen == DiffFormat.xml:
        raise UsageError("--files has no XML form", hint="Use --format text or json.")
    with open_manager(settings(ctx).home) as mgr:
        result = diff_files(mgr, pool, left, right)
    changes = result.files.changes
    if stats:
        figures = {**result.files.stats.as_dict(), "changed_bytes": result.changed_bytes}
        sys.stderr.write(json.dumps(figures, sort_keys=True) + "\n")
    if chosen == DiffFormat.json:
        body = json.dumps([c.as_dict() for c in changes], indent=2, sort_keys=True)
        write_chunks([body, "\n"])
        return
    write_chunks(f"{c.kind.value:<13} {_printable(c.path)}\n" for c in changes)
