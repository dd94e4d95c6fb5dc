"""`thinmgr service start|stop|status`: the resident command service of a home."""

from __future__ import annotations

import typer

from thinmgr.cli.manager_output import say
from thinmgr.cli.output import emit_json, settings

app = typer.Typer(
    help="A resident process that runs thinmgr's commands without their start-up cost: "
    "while it runs, every `thinmgr` command of this home is handed to it.",
    no_args_is_help=True,
)


@app.command("start")
def start(ctx: typer.Context) -> None:
    """Start the service in the background (its log: HOME/service.log)."""
    from thinmgr.service.control import start as start_service

    started = start_service(settings(ctx).home)
    if settings(ctx).json:
        emit_json(started.as_dict())
        return
    say(ctx, f"thinmgr service running (pid {started.pid}, socket {started.socket})")


@app.command("stop")
def stop(ctx: typer.Context) -> None:
    """Stop it (commands it runs are let finish first, up to 10 s)."""
    from thinmgr.service.control import stop as stop_service

    pid = stop_service(settings(ctx).home)
    if settings(ctx).json:
        emit_json({"stopped": pid})
        return
    say(ctx, "no thinmgr service was running" if pid is None else f"stopped (pid {pid})")


@app.command("status")
def status(ctx: typer.Context) -> None:
    """Whether a service runs for this home. Exit 0 if it does, 3 if not."""
    from thinmgr.errors import ExitCode
    from thinmgr.service.control import status as service_status

    found = service_status(settings(ctx).home)
    if settings(ctx).json:
        emit_json(found.as_dict())
    elif found.pid is None:
        say(ctx, f"no thinmgr service for {found.home}")
    else:
        say(ctx, f"thinmgr service running (pid {found.pid}, socket {found.socket})")
    if found.pid is None:
        raise typer.Exit(int(ExitCode.NOT_FOUND))
