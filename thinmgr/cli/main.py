"""Entry point of the ``thinmgr`` command.

Start-up is kept short because users feel it on every command: this module imports nothing
but the standard library, and ``--version`` is answered before typer is even loaded. The
command modules import the heavy layers (format, catalog, engines) inside their functions.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--version"], ["-V"]):
        from thinmgr import __version__

        sys.stdout.write(f"thinmgr {__version__}\n")
        sys.exit(0)
    from thinmgr.cli.app import run

    sys.exit(run(args))
