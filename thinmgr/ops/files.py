"""Writing files so that a reader never sees half of one: temp file, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from thinmgr.errors import IOFailure, PermissionDenied


@contextlib.contextmanager
def _atomic_fd(target: Path) -> Iterator[int]:
    """A temporary file beside ``target``: renamed over it after the body and an fsync,
    removed if the body fails. The body must leave the descriptor open."""
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    except PermissionError as exc:
        raise PermissionDenied(f"{target}: cannot write in {directory}") from exc
    except OSError as exc:
        raise IOFailure(f"{target}: {exc.strerror}") from exc
    try:
        yield fd
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_text_writer(target: Path) -> Iterator[IO[str]]:
    with _atomic_fd(target) as fd, os.fdopen(fd, "w", encoding="utf-8") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_binary_writer(target: Path) -> Iterator[IO[bytes]]:
    """Like ``atomic_text_writer``, for bytes: the target appears whole or not at all."""
    with _atomic_fd(target) as fd, os.fdopen(fd, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
