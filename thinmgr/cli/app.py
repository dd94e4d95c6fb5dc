"""The typer application: global options, command groups, and error reporting.

Errors: every ``ThinmgrError`` becomes one line "thinmgr: error: ..." plus a hint on stderr
and its fixed exit code; anything else is reported as an internal error. A traceback is
shown only with ``--debug``.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from thinmgr import __version__
from thinmgr.cli import commit as commit_cli
from thinmgr.cli import container as container_commands
from thinmgr.cli import diff, doctor, lab, layer, metadata, pool, snapshot, volume
from thinmgr.cli import image as image_cli
from thinmgr.cli.output import Settings
from thinmgr.cli.snapopt import split_snap_args
from thinmgr.errors import ExitCode, InternalError, IOFailure, ThinmgrError

DEFAULT_HOME = Path("/var/lib/thinmgr")

app = typer.Typer(
    name="thinmgr",
    help="Thin-provisioning block storage manager: dm-thin pools, thin volumes, O(1) "
    "snapshots, block diffs of image layers, and a container launcher.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(metadata.app, name="metadata")
app.add_typer(pool.app, name="pool")
app.add_typer(volume.app, name="volume")
app.command("snapshot")(snapshot.snapshot)
app.command("doctor")(doctor.doctor)
app.add_typer(lab.app, name="lab")
app.command("diff")(diff.diff)
app.add_typer(layer.app, name="layer")
app.add_typer(image_cli.app, name="image")
app.command("commit")(commit_cli.commit)
container_commands.register(app)  # run, exec, ps, stop, rm, logs


def _version(value: bool) -> None:
    if value:
        typer.echo(f"thinmgr {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            envvar="THINMGR_HOME",
            help="State directory: catalog, file-backed pools, run-time state. "
            "[default: /var/lib/thinmgr]",
        ),
    ] = None,
    json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    ctx.obj = Settings(home=home or DEFAULT_HOME, json=json, debug=debug)


def _report(error: ThinmgrError, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"thinmgr: error: {error.message}\n")
    if error.hint:
        sys.stderr.write(f"hint: {error.hint}\n")
    return int(error.exit_code)


def run(args: list[str]) -> int:
    command = typer.main.get_command(app)
    debug = "--debug" in args
    if "metadata" in args:  # thin-provisioning-tools' bare -m / --metadata-snap
        args = split_snap_args(args)
    try:
        # Standalone mode: click reports usage errors itself (exit 2) and ends every run,
        # successful or not, with SystemExit; its code is ours.
        command.main(args=args, prog_name="thinmgr", standalone_mode=True)
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except ThinmgrError as error:
        return _report(error, debug)
    except KeyboardInterrupt:
        sys.stderr.write("thinmgr: interrupted\n")
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        # `thinmgr metadata dump | head`: the reader left; that is not an error of ours.
        # Point stdout at /dev/null so that the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return int(ExitCode.OK)
    except MemoryError:
        return _report(IOFailure("out of memory"), debug)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _report(IOFailure(f"{where}{exc.strerror or exc}"), debug)
    except Exception as exc:
        return _report(InternalError(f"internal error: {type(exc).__name__}: {exc}"), debug)
    return int(ExitCode.OK)
