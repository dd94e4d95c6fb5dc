"""The lab's errors: all ``ThinmgrError``s, so the CLI reports them with a hint."""

from __future__ import annotations

from thinmgr.errors import IOFailure, NotFoundError


class QemuMissingError(NotFoundError):
    default_hint = "Install qemu: `apt-get install qemu-system-x86`."


class KernelNotFetchedError(NotFoundError):
    default_hint = "Run `thinmgr lab fetch` (needs `apt-get update` done and network access)."


class FetchError(IOFailure):
    default_hint = (
        "Check that `apt-get update` has been run and the Debian mirror is reachable; "
        "then run `thinmgr lab fetch` again."
    )


class InitramfsError(NotFoundError):
    default_hint = "Install a static busybox: `apt-get install busybox-static`."


class GuestError(IOFailure):
    """The guest crashed, hung or never reached its command."""

    default_hint = "Run `thinmgr lab run -- true` to see the boot log; `thinmgr lab status`."

    def __init__(self, message: str, *, console_tail: list[str], hint: str | None = None):
        tail = "\n".join(f"  | {line}" for line in console_tail)
        full = f"{message}; last console lines:\n{tail}" if tail else message
        super().__init__(full, hint=hint)
        self.console_tail = console_tail
