"""`thinmgr metadata check`: thin_check's checks, and the ones it misses.

Exit codes as thin_check's: 0 clean (or only non-fatal problems with
--ignore-non-fatal-errors), 1 problems found. A source that cannot be opened keeps its own
code (3 not found, 77 permission denied).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from thinmgr.cli.metadata import app
from thinmgr.cli.output import emit_json, settings
from thinmgr.cli.snapopt import parse_snap
from thinmgr.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from thinmgr.format.check import CheckReport

XML_HINT = "this looks like XML; `thinmgr metadata restore` turns thin_dump XML into metadata"


@app.command("check")
def check(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="Metadata file or device.")],
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing; only the exit code tells.")
    ] = False,
    metadata_snap: Annotated[
        str | None,
        typer.Option(
            "--metadata-snap",
            metavar="[=BLOCK]",
            help="Check only the held metadata snapshot (-m, --metadata-snap), or the one at "
            "BLOCK (--metadata-snap=BLOCK); its trees, no space maps.",
        ),
    ] = None,
    super_block_only: Annotated[
        bool, typer.Option("--super-block-only", help="Only check the superblock.")
    ] = False,
    skip_mappings: Annotated[
        bool,
        typer.Option(
            "--skip-mappings",
            help="Do not walk the per-device mapping trees (and so do not check the space maps).",
        ),
    ] = False,
    ignore_non_fatal: Annotated[
        bool,
        typer.Option(
            "--ignore-non-fatal-errors",
            help="Exit 0 when every problem is non-fatal (leaked blocks, under-full nodes).",
        ),
    ] = False,
    clear_needs_check: Annotated[
        bool,
        typer.Option(
            "--clear-needs-check-flag",
            help="After a clean full check, clear the superblock's "
            "NEEDS_CHECK flag (opens the source read-write).",
        ),
    ] = False,
) -> None:
    """Check pool metadata, like thin_check (exit 0 clean, 1 problems found)."""
    from thinmgr.format.check import CheckOptions
    from thinmgr.ops.check import check_file, clear_needs_check_flag

    snap = parse_snap(metadata_snap)
    if clear_needs_check and (snap is not False or super_block_only or skip_mappings):
        raise UsageError(
            "--clear-needs-check-flag needs a full check of the live metadata",
            hint="Drop --metadata-snap, --super-block-only and --skip-mappings.",
        )
    options = CheckOptions(
        super_block_only=super_block_only,
        skip_mappings=skip_mappings,
        metadata_snap=snap,
        ignore_non_fatal=ignore_non_fatal,
    )
    as_json = settings(ctx).json
    progress = None if quiet or as_json else _print_stage
    report = check_file(source, options, progress=progress)
    cleared = False
    if clear_needs_check and report.clean:
        cleared = clear_needs_check_flag(source)
    if as_json:
        data = report.as_dict()
        data["needs_check_cleared"] = cleared
        if report.looks_like_xml:
            data["hint"] = XML_HINT
        emit_json(data)
    elif not quiet:
        _print_report(report, cleared)
    if not report.clean:
        raise typer.Exit(int(ExitCode.CHECK_FAILED))


def _print_stage(name: str) -> None:
    sys.stderr.write(f"{name}\n")
    sys.stderr.flush()


def _print_report(report: CheckReport, cleared: bool) -> None:
    out = sys.stdout.write
    for problem in report.problems:
        out(f"{problem}\n")
    if report.unlisted:
        out(f"... {report.unlisted} more problems not listed\n")
    if report.looks_like_xml:
        out(f"{XML_HINT}\n")
    s = report.summary
    if s.transaction_id is not None:
        out(f"transaction id: {s.transaction_id}, time: {s.time}\n")
    if s.metadata_snap is not None:
        out(f"held metadata snapshot: block {s.metadata_snap}\n")
    if s.metadata_blocks is not None:
        out(f"metadata blocks: {s.metadata_blocks} ({s.metadata_blocks_free} free)\n")
    if s.data_blocks is not None:
        out(f"data blocks: {s.data_blocks} ({s.data_blocks_free} free)\n")
    if s.devices is not None:
        mappings = "not walked" if s.mappings is None else str(s.mappings)
        out(f"devices: {s.devices}, mappings: {mappings}\n")
    if cleared:
        out("NEEDS_CHECK flag cleared\n")
    verdict = (
        "clean"
        if report.fatal + report.non_fatal == 0
        else ("non-fatal problems only" if report.fatal == 0 else "FAILED")
    )
    out(
        f"result: {verdict} ({report.fatal} fatal, {report.non_fatal} non-fatal, "
        f"{report.warnings} warnings)\n"
    )
    sys.stdout.flush()
