"""`thinmgr run|exec|ps|stop|rm|logs`: containers on thin snapshots, with docker's exit codes.

`run` and `exec` exit with the command's status (docker's convention: 125 when thinmgr
could not start it, 126 not executable, 127 not found, 128+n killed by signal n). A
ThinmgrError during their setup is reported as usual (message and hint) but with exit 125,
and so is a malformed option, so that a script cannot mistake thinmgr's own failure for the
command's (docker run does the same).

Options come before IMAGE; everything after IMAGE (or after ``--``) is the command, passed
untouched: ``thinmgr run img -- sh -c 'echo --x'``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer
from typer.core import TyperCommand

from thinmgr.cli.manager_output import listing, say, warn
from thinmgr.cli.output import emit_json, settings
from thinmgr.errors import ExitCode, ThinmgrError

if TYPE_CHECKING:
    from thinmgr.ops.containers import ContainerInfo
    from thinmgr.ops.timings import Timings

# Options before the first positional argument only: the rest is the command, even where it
# looks like an option (docker's flag parsing stops at IMAGE too).
COMMAND_CONTEXT: dict[str, Any] = {"allow_interspersed_args": False}
LAUNCHER_CODES = (ExitCode.LAUNCH_FAILED, ExitCode.CANNOT_EXECUTE, ExitCode.COMMAND_NOT_FOUND)


class LaunchCommand(TyperCommand):
    """A command whose malformed options exit 125 (docker: "flag provided but not defined")."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            exc.exit_code = int(ExitCode.LAUNCH_FAILED)
            raise


@contextmanager
def setup_failures_exit_125() -> Iterator[None]:
    """ThinmgrErrors keep their message and hint but exit 125 (setup failed, docker's code),
    except the launcher's 126 (not executable) and 127 (not found)."""
    try:
        yield
    except ThinmgrError as error:
        # The launcher's own errors already carry docker's 125/126/127: keep those.
        if error.exit_code not in LAUNCHER_CODES:
            error.exit_code = ExitCode.LAUNCH_FAILED
        raise


def command_args(words: Sequence[str] | None) -> list[str]:
    """The command after IMAGE/NAME. Click stops parsing options at the first positional
    (``allow_interspersed_args=False``) and then keeps a ``--`` that follows it as a word; that
    separator is ours, not the command's, so exactly one leading ``--`` is dropped."""
    args = list(words or [])
    return args[1:] if args[:1] == ["--"] else args


def register(app: typer.Typer) -> None:
    """Add the container commands to the top level of ``app``."""
    for name, function in (("run", run), ("exec", exec_)):
        app.command(name, context_settings=COMMAND_CONTEXT, cls=LaunchCommand)(function)
    app.command("ps")(ps)
    app.command("stop")(stop)
    app.command("rm")(rm)
    app.command("logs")(logs)


Env = Annotated[
    list[str] | None,
    typer.Option(
        "--env", "-e", help="KEY=VALUE for the command's environment (KEY alone: the host's)."
    ),
]
Workdir = Annotated[
    str | None, typer.Option("--workdir", "-w", help="Working directory inside the container.")
]
User = Annotated[
    str | None, typer.Option("--user", "-u", help="USER[:GROUP] or UID[:GID] to run as.")
]
Tty = Annotated[bool, typer.Option("--tty", "-t", help="Allocate a pseudo-terminal.")]
Interactive = Annotated[bool, typer.Option("--interactive", "-i", help="Keep stdin open.")]
Name = Annotated[str, typer.Argument(help="Container name.", show_default=False)]


def run(
    ctx: typer.Context,
    target: Annotated[
        str, typer.Argument(metavar="IMAGE|POOL/VOLUME", help="Image (NAME[:TAG]) or volume.")
    ],
    command: Annotated[
        list[str] | None,
        typer.Argument(metavar="[--] [CMD [ARG...]]", help="Command (default: the image's)."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Container name.")] = None,
    remove: Annotated[bool, typer.Option("--rm", help="Remove the container when it exits.")] = (
        False
    ),
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Run in the background; print its name.")
    ] = False,
    tty: Tty = False,
    interactive: Interactive = False,
    env: Env = None,
    workdir: Workdir = None,
    user: User = None,
    hostname: Annotated[str | None, typer.Option("--hostname", help="Host name.")] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Read-only root file system (writable /tmp).")
    ] = False,
    init: Annotated[
        bool, typer.Option("--init/--no-init", help="A reaping, signal-forwarding PID 1.")
    ] = True,
    net: Annotated[str, typer.Option("--net", help="Network: none or host.")] = "none",
    userns: Annotated[
        bool,
        typer.Option("--userns", help="User namespace: container root is host uid 100000."),
    ] = False,
    memory: Annotated[
        str | None, typer.Option("--memory", "-m", help="Memory limit, e.g. 256M (no swap).")
    ] = None,
    cpus: Annotated[float | None, typer.Option("--cpus", help="CPU quota, e.g. 1.5.")] = None,
    cpu_shares: Annotated[
        int | None, typer.Option("--cpu-shares", help="Relative CPU weight.")
    ] = None,
    cpuset_cpus: Annotated[
        str | None, typer.Option("--cpuset-cpus", help="CPUs allowed, e.g. 0-1.")
    ] = None,
    pids_limit: Annotated[
        int | None, typer.Option("--pids-limit", help="Maximum number of processes.")
    ] = None,
    device_read_bps: Annotated[
        str | None, typer.Option("--device-read-bps", help="[DEV:]RATE read limit, e.g. 1M.")
    ] = None,
    device_write_bps: Annotated[
        str | None, typer.Option("--device-write-bps", help="[DEV:]RATE write limit.")
    ] = None,
    device_read_iops: Annotated[
        str | None, typer.Option("--device-read-iops", help="[DEV:]N read I/Os per second.")
    ] = None,
    device_write_iops: Annotated[
        str | None, typer.Option("--device-write-iops", help="[DEV:]N write I/Os per second.")
    ] = None,
) -> None:
    """Run a command in a new container on a snapshot of IMAGE or POOL/VOLUME.

    The container's disk is a writable thin snapshot (ctr-NAME in the image's pool); the image
    or volume itself is never changed. Exits with the command's status (125: thinmgr failed).
    """
    timings = _timings()
    with setup_failures_exit_125():
        with timings.phase("cli-imports"):
            from thinmgr.ops.containers import RunOptions, parse_env, run_container
            from thinmgr.ops.manager import open_manager
        options = RunOptions(
            name=name,
            remove=remove,
            tty=tty,
            interactive=interactive,
            env=parse_env(env or [], os.environ),
            workdir=workdir,
            user=user,
            hostname=hostname,
            read_only=read_only,
            init=init,
            net=net,
            userns=userns,
            memory=memory,
            cpus=cpus,
            cpu_shares=cpu_shares,
            cpuset_cpus=cpuset_cpus,
            pids_limit=pids_limit,
            device_read_bps=device_read_bps,
            device_write_bps=device_write_bps,
            device_read_iops=device_read_iops,
            device_write_iops=device_write_iops,
        )
        with ExitStack() as stack:
            with timings.phase("catalog-open"):
                mgr = stack.enter_context(open_manager(settings(ctx).home))
            outcome = run_container(
                mgr,
                target,
                command_args(command),
                options,
                detach=detach,
                notify=lambda text: warn(ctx, text),
                timings=timings,
            )
    if timings.enabled:
        sys.stderr.write(timings.report())
    if detach:
        say(ctx, outcome.name)
        return
    raise typer.Exit(outcome.exit_code or 0)


def _timings() -> Timings:
    from thinmgr.ops.timings import Timings, tracing_enabled

    return Timings(enabled=tracing_enabled())


def exec_(
    ctx: typer.Context,
    name: Name,
    command: Annotated[list[str], typer.Argument(metavar="[--] CMD [ARG...]", help="Command.")],
    tty: Tty = False,
    interactive: Interactive = False,
    env: Env = None,
    workdir: Workdir = None,
    user: User = None,
) -> None:
    """Run a command in a running container (same namespaces, cgroups and confinement)."""
    with setup_failures_exit_125():
        from thinmgr.ops.containers import exec_container, parse_env
        from thinmgr.ops.manager import open_manager

        with open_manager(settings(ctx).home) as mgr:
            code = exec_container(
                mgr,
                name,
                command_args(command),
                env=parse_env(env or [], os.environ),
                workdir=workdir,
                user=user,
                tty=tty,
                interactive=interactive,
            )
    raise typer.Exit(code)


def ps(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", "-a", help="Also stopped containers.")] = False,
    json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
) -> None:
    """List containers (running ones; -a: all). Settles those whose thinmgr died."""
    from thinmgr.ops.containers import list_containers
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        containers = list_containers(mgr, all=all_)
    if json or settings(ctx).json:
        emit_json([c.as_dict() for c in containers])
        return
    listing(
        ctx,
        ["NAME", "IMAGE", "COMMAND", "STATE", "STATUS", "PID", "CREATED"],
        [_row(c) for c in containers],
        right=("PID",),
    )


def _row(c: ContainerInfo) -> tuple[object, ...]:
    command = " ".join(c.command)
    if len(command) > 30:
        command = command[:29] + "…"
    if c.state == "exited":
        status = f"exited ({'?' if c.exit_code is None else c.exit_code})"
    else:
        status = c.state
    created = c.created_at.replace("T", " ")[:19]  # ISO 8601 UTC, to the second
    return (c.name, c.image or "", command, c.state, status, c.pid or "", created)


def stop(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(metavar="CONTAINER...", help="Containers.")],
    time_: Annotated[
        float, typer.Option("--time", "-t", help="Seconds to wait before SIGKILL.")
    ] = 10.0,
) -> None:
    """Stop containers: SIGTERM to PID 1, SIGKILL after --time seconds."""
    from thinmgr.ops.containers import stop_container
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        _each(ctx, names, lambda name: stop_container(mgr, name, timeout=time_))


def rm(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(metavar="CONTAINER...", help="Containers.")],
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Kill a running container first.")
    ] = False,
) -> None:
    """Remove containers: their row, disk (ctr-NAME), state directory and cgroups."""
    from thinmgr.ops.containers import remove_container
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        _each(ctx, names, lambda name: remove_container(mgr, name, force=force))


def _each(ctx: typer.Context, names: Sequence[str], action: Any) -> None:
    """Do ``action`` for every name, as docker does: go on after a failure, report each, and
    exit with the last failure's code."""
    failure: ThinmgrError | None = None
    for name in names:
        try:
            action(name)
        except ThinmgrError as error:
            sys.stderr.write(f"thinmgr: error: {error.message}\n")
            failure = error
            continue
        say(ctx, name)
    if failure is not None:
        if failure.hint:
            sys.stderr.write(f"hint: {failure.hint}\n")
        raise typer.Exit(int(failure.exit_code))


def logs(
    ctx: typer.Context,
    name: Name,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Wait for more output until it exits.")
    ] = False,
) -> None:
    """Print the output (stdout and stderr) of a detached container."""
    from thinmgr.ops.containers import container_logs
    from thinmgr.ops.manager import open_manager

    with open_manager(settings(ctx).home) as mgr:
        chunks = container_logs(mgr, name, follow=follow)
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
        out.flush()
