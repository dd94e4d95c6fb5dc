"""Helpers for lab tests: loop devices and dm tables through the host's tools (in the guest).

Tables name devices by major:minor: without udev there may be no node to look up by name
(kernel-lab.md §9, pitfalls 1 and 2).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SECTOR = 512


def sh(*args: str | Path) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def devnum(path: str | Path) -> str:
    rdev = os.stat(path).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def dm_devnum(name: str) -> str:
    return sh("dmsetup", "info", "-c", "--noheadings", "-o", "major,minor", name).strip()


class Stack:
    """Loop devices and dm devices set up by a test, torn down in reverse order."""

    def __init__(self) -> None:
        self._undo: list[list[str]] = []

    def loop(self, backing: Path) -> str:
        device = sh("losetup", "-f", "--show", backing).strip()
        self._undo.append(["losetup", "-d", device])
        return device

    def dm_create(self, name: str, table: str) -> str:
        sh("dmsetup", "create", name, "--table", table)
        self._undo.append(["dmsetup", "remove", name])
        return f"/dev/mapper/{name}"

    def dm_remove(self, name: str) -> None:
        sh("dmsetup", "remove", name)
        self._undo.remove(["dmsetup", "remove", name])

    def close(self) -> None:
        while self._undo:
            subprocess.run(self._undo.pop(), capture_output=True, check=False)


@contextmanager
def stack() -> Iterator[Stack]:
    devices = Stack()
    try:
        yield devices
    finally:
        devices.close()


def message(pool: str, text: str) -> None:
    sh("dmsetup", "message", pool, "0", text)


def pool_status(pool: str) -> list[str]:
    """Fields of the thin-pool status line after "start length thin-pool"."""
    return sh("dmsetup", "status", pool).split()[3:]
