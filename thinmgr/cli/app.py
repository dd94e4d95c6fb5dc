"""The typer application: global options, command groups, and error reporting.

Errors: every ``ThinmgrError`` becomes one line "thinmgr: error: ..." plus a hint on stderr
and its fixed exit code; anything else is reported as an internal error. A traceback is
shown only with ``--debug``.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from thinmgr import __version__
from thinmgr.cli.output import Settings
from thinmgr.cli.snapopt import split_snap_args
from thinmgr.errors import ExitCode, InternalError, IOFailure, ThinmgrError
from thinmgr.service.protocol import command_word

DEFAULT_HOME = Path("/var/lib/thinmgr")


def _group(name: str) -> Callable[[typer.Typer], None]:
    """Adds the sub-application ``app`` of module thinmgr.cli.NAME as group NAME."""

    def add(app: typer.Typer) -> None:
        app.add_typer(importlib.import_module(f"thinmgr.cli.{name}").app, name=name)

    return add


def _command(name: str) -> Callable[[typer.Typer], None]:
    """Adds function NAME of module thinmgr.cli.NAME as top-level command NAME."""

    def add(app: typer.Typer) -> None:
        app.command(name)(getattr(importlib.import_module(f"thinmgr.cli.{name}"), name))

    return add


def _containers(app: typer.Typer) -> None:
    importlib.import_module("thinmgr.cli.container").register(app)


# Top-level words and what adds them, in the order `thinmgr --help` lists them. A command
# line loads only the module of its own word: importing every command module and letting
# typer build all ~40 commands cost ~45 ms on each invocation (measured), for commands the
# invocation never runs.
REGISTRARS: dict[str, Callable[[typer.Typer], None]] = {
    "metadata": _group("metadata"),
    "pool": _group("pool"),
    "volume": _group("volume"),
    "snapshot": _command("snapshot"),
    "doctor": _command("doctor"),
    "lab": _group("lab"),
    "diff": _command("diff"),
    "layer": _group("layer"),
    "image": _group("image"),
    "commit": _command("commit"),
    **dict.fromkeys(("run", "exec", "ps", "stop", "rm", "logs"), _containers),
    "service": _group("service"),
}


def build_app(word: str | None = None) -> typer.Typer:
    """The application with the commands for WORD, or all of them (help, unknown words)."""
    app = typer.Typer(
        name="thinmgr",
        help="Thin-provisioning block storage manager: dm-thin pools, thin volumes, O(1) "
        "snapshots, block diffs of image layers, and a container launcher.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(root)
    chosen = [REGISTRARS[word]] if word in REGISTRARS else list(REGISTRARS.values())
    for register in dict.fromkeys(chosen):  # the container commands register once
        register(app)
    return app


def _version(value: bool) -> None:
    if value:
        typer.echo(f"thinmgr {__version__}")
        raise typer.Exit()


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
    command = typer.main.get_command(build_app(command_word(args)))
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
