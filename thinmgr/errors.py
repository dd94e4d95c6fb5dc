"""The one exception tree of thinmgr.

Every error a user can meet is a ``ThinmgrError`` with a fixed exit code and a hint that says
what to do. Lower layers raise these (or have theirs translated at the layer boundary); only
``thinmgr.cli`` turns them into a message and an exit status.

Exit codes are a contract (documented in README.md, "Exit codes"); never renumber them.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CHECK_FAILED = 1  # `metadata check` found errors (same meaning as thin_check's exit 1)
    USAGE = 2
    NOT_FOUND = 3
    CONFLICT = 4
    BUSY = 5
    NO_SPACE = 6
    CORRUPT_METADATA = 7
    CATALOG_DRIFT = 8
    UNSUPPORTED = 9
    IO_ERROR = 10
    INTERNAL = 70  # EX_SOFTWARE of sysexits.h
    # `thinmgr run`/`exec` could not start the command (docker's 125; 126, 127 and 128+n
    # are the container's own statuses, passed through).
    LAUNCH_FAILED = 125
    CANNOT_EXECUTE = 126  # the command exists but execve refused it (EACCES/ENOEXEC)
    COMMAND_NOT_FOUND = 127  # the command is not in the container (ENOENT)
    INTERRUPTED = 130  # 128 + SIGINT, as shells report it
    PERMISSION = 77


class ThinmgrError(Exception):
    """Base of every error thinmgr reports to a user."""

    exit_code: ExitCode = ExitCode.IO_ERROR
    default_hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class UsageError(ThinmgrError):
    exit_code = ExitCode.USAGE
    default_hint = "See `thinmgr COMMAND --help`."


class NotFoundError(ThinmgrError):
    exit_code = ExitCode.NOT_FOUND


class ConflictError(ThinmgrError):
    exit_code = ExitCode.CONFLICT


class BusyError(ThinmgrError):
    exit_code = ExitCode.BUSY
    default_hint = "Close what holds it open and try again."


class NoSpaceError(ThinmgrError):
    exit_code = ExitCode.NO_SPACE


class CorruptMetadataError(ThinmgrError):
    """The metadata failed a structural check.

    ``block`` and ``structure`` locate the fault so that a storage engineer can look at it
    with a hex dump; they are part of the message too.
    """

    exit_code = ExitCode.CORRUPT_METADATA
    default_hint = (
        "Run `thinmgr metadata check SOURCE` for a full report; restore from a "
        "`thinmgr metadata dump` backup if the pool cannot be repaired."
    )

    def __init__(
        self,
        message: str,
        *,
        block: int | None = None,
        structure: str | None = None,
        hint: str | None = None,
    ) -> None:
        where = []
        if structure:
            where.append(structure)
        if block is not None:
            where.append(f"block {block}")
        full = f"{', '.join(where)}: {message}" if where else message
        super().__init__(full, hint=hint)
        self.block = block
        self.structure = structure
        self.reason = message


class CorruptImageError(ThinmgrError):
    """An image or layer that is malformed or hostile: refused before anything is written
    where its headers show it, otherwise the partly applied layer is thrown away."""

    exit_code = ExitCode.CORRUPT_METADATA
    default_hint = (
        "The image is damaged, truncated or unsafe; export it again (docker save, "
        "skopeo copy) and check where it came from."
    )


class CatalogDriftError(ThinmgrError):
    exit_code = ExitCode.CATALOG_DRIFT
    default_hint = "Run `thinmgr doctor` to compare the catalog with the pool, then `--fix`."


class UnsupportedError(ThinmgrError):
    exit_code = ExitCode.UNSUPPORTED


class IOFailure(ThinmgrError):
    exit_code = ExitCode.IO_ERROR


class PermissionDenied(ThinmgrError):
    exit_code = ExitCode.PERMISSION
    default_hint = "Run as root (or with the capabilities the command needs)."


class InternalError(ThinmgrError):
    """A bug in thinmgr: anything not foreseen. Reported without a traceback unless --debug."""

    exit_code = ExitCode.INTERNAL
    default_hint = "This is a bug in thinmgr: run again with --debug and report the traceback."
