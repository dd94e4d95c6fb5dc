"""Entry point of the ``thinmgr`` command.

Start-up is kept short because users feel it on every command: this module imports nothing
but the standard library, and ``--version`` is answered before typer is even loaded. The
command modules import the heavy layers (format, catalog, engines) inside their functions.

Two interpreter defaults cost a short command more than its work (measured on `thinmgr run
--rm IMAGE -- /bin/true`, benchmarks/run.py): the cyclic garbage collector ran ~170 times
(44 ms) while SQLAlchemy and the command modules were imported, and the interpreter's
teardown (module clearing and final collections of SQLAlchemy's object graph) took ~100 ms
after the command had finished. So the collector's first generation is made larger, and a
finished command leaves with ``os._exit`` once what a normal exit would do for us is done.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from typing import NoReturn

# Objects allocated between collections of the youngest generation (CPython's default: 700).
# Start-up creates tens of thousands of long-lived objects (classes, functions, SQL
# constructs); a larger generation 0 collects them a few times instead of ~170.
GC_GEN0_THRESHOLD = 50_000
IO_ERROR_EXIT = 10  # ExitCode.IO_ERROR (thinmgr.errors), not imported to keep start-up short


def main(argv: list[str] | None = None, *, use_service: bool = True) -> NoReturn:
    """Runs the command line ``argv`` (default: sys.argv) and exits with its code.

    With ``use_service``, a command service running for the command's home runs it instead
    (cli/client.py); ``thinmgr service ...`` itself always runs here, and so do the service's
    workers (``use_service=False``).
    """
    args = sys.argv[1:] if argv is None else argv
    if args in (["--version"], ["-V"]):
        from thinmgr import __version__

        sys.stdout.write(f"thinmgr {__version__}\n")
        sys.exit(0)
    if sys.stdout is None:
        # Started with descriptor 1 closed (`thinmgr ... >&-`): refuse before doing anything,
        # rather than do the work and fail to report it.
        if sys.stderr is not None:
            sys.stderr.write(
                "thinmgr: error: cannot write to standard output: it is closed\n"
                "hint: Run it with standard output open (>/dev/null discards it).\n"
            )
        sys.exit(IO_ERROR_EXIT)
    if use_service and _service_may_run(args):
        from thinmgr.cli.client import run_via_service

        code = run_via_service(args)
        if code is not None:
            leave(code)
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
    from thinmgr.cli.app import run

    leave(run(args))


def _service_may_run(args: list[str]) -> bool:
    """True when a service socket exists for the command's home (one stat(2), no imports
    beyond the protocol's) and the command is not `service` itself."""
    from thinmgr.service.protocol import command_word, home_of, socket_path

    if command_word(args) == "service":
        return False
    return os.path.exists(socket_path(home_of(args, os.environ)))


def leave(code: int) -> NoReturn:
    """End the process with CODE, skipping the interpreter's teardown when that is safe.

    Safe means: no other thread is running (a normal exit would wait for non-daemon ones,
    so then we take the normal exit), the atexit callbacks have run (logging's flush,
    ``weakref.finalize`` clean-ups) and stdout/stderr are flushed. Everything else a
    command holds (files, locks, the catalog) was closed by its context managers, and
    what the kernel releases at exit (descriptors, flocks) it releases for ``os._exit`` too.
    """
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with the descriptor closed (`thinmgr ... >&-`)
            continue
        try:
            stream.flush()
        except BrokenPipeError:
            pass  # a reader that left (`thinmgr ... | head`) is not an error of ours
        except (OSError, ValueError):
            # Output that could not be written (a full disk, a closed stream): the command
            # did not do all it was asked, even if its work succeeded.
            code = code or IO_ERROR_EXIT
    os._exit(code)
