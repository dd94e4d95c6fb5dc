"""Translate an ``OSError`` from a kernel call into the matching ``ThinmgrError``."""

from __future__ import annotations

import errno

from thinmgr.errors import (
    BusyError,
    IOFailure,
    NoSpaceError,
    NotFoundError,
    PermissionDenied,
    ThinmgrError,
    UnsupportedError,
)


def kernel_error(what: str, exc: OSError, *, hint: str | None = None) -> ThinmgrError:
    """``what`` names the action and the object, e.g. "attach /dev/loop3 to /x/volume"."""
    code = exc.errno
    reason = exc.strerror or (errno.errorcode.get(code, str(code)) if code else str(exc))
    message = f"cannot {what}: {reason}"
    if code == errno.EBUSY:
        return BusyError(message, hint=hint)
    if code in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
        return NotFoundError(message, hint=hint)
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(message, hint=hint)
    if code in (errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS):
        return UnsupportedError(message, hint=hint or "The running kernel lacks this feature.")
    if code == errno.ENOSPC:
        return NoSpaceError(message, hint=hint)
    return IOFailure(message, hint=hint)
