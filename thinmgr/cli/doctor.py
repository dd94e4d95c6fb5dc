"""`thinmgr doctor [--fix]`: compare the catalog with the pools; repair what it finds."""

from __future__ import annotations

from typing import Annotated

import typer

from thinmgr.cli.manager_output import say
from thinmgr.cli.output import emit_json, settings, table
from thinmgr.errors import ExitCode


def doctor(
    ctx: typer.Context,
    fix: Annotated[bool, typer.Option("--fix", help="Repair what is found.")] = False,
    adopt: Annotated[
        bool,
        typer.Option(
            "--adopt",
            help="With --fix: accept a transaction id another tool set on a pool into the "
            "catalog (only when you know what changed it).",
        ),
    ] = False,
) -> None:
    """Find (and with --fix repair) differences between the catalog and the pools.

    Exit 0 when all is well (or was repaired), 8 when something is left.
    """
    from thinmgr.ops.doctor import doctor as run_doctor
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        findings = run_doctor(mgr, fix=fix, adopt=adopt)
    left = [f for f in findings if not f.fixed]
    if settings(ctx).json:
        emit_json({"findings": [f.as_dict() for f in findings], "ok": not left})
    elif not findings:
        say(ctx, "catalog and pools agree")
    else:
        table(
            ctx,
            None,
            ["POOL", "FINDING", "DETAIL", "STATUS"],
            [
                (
                    f.pool or "",
                    f.kind,
                    f.detail,
                    "fixed"
                    if f.fixed
                    else (
                        f"not fixed: {f.error}"
                        if f.error
                        else ("fixable" if f.fixable else "report only")
                    ),
                )
                for f in findings
            ],
        )
        if left and not fix:
            say(ctx, "run `thinmgr doctor --fix` to repair what is fixable")
    if left:
        raise typer.Exit(int(ExitCode.CATALOG_DRIFT))
