"""The lab's newc cpio writer: read back by our parser and by cpio(1) when installed."""

from __future__ import annotations

import io
import shutil
import stat
import subprocess

import pytest

from thinmgr.lab.cpio import CpioWriter, parse


def archive() -> bytes:
    out = io.BytesIO()
    writer = CpioWriter(out)
    writer.directory("bin")
    writer.file("bin/busybox", b"\x7fELF" + bytes(1001), perm=0o755)
    writer.symlink("bin/sh", "busybox")
    writer.char_device("dev/console", 5, 1)
    writer.file("init", b"#!/bin/sh\n", perm=0o755)
    writer.file("empty", b"")
    writer.close()
    return out.getvalue()


def test_round_trip() -> None:
    entries = {name: (mode, data, rdev) for name, mode, data, rdev in parse(archive())}
    assert list(entries) == ["bin", "bin/busybox", "bin/sh", "dev/console", "init", "empty"]
    assert stat.S_ISDIR(entries["bin"][0])
    assert entries["bin/busybox"][1] == b"\x7fELF" + bytes(1001)
    assert stat.S_IMODE(entries["bin/busybox"][0]) == 0o755
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)
    assert entries["empty"][1] == b""


def test_alignment_and_trailer() -> None:
    data = archive()
    assert len(data) % 4 == 0
    assert data.startswith(b"070701")
    assert b"TRAILER!!!\0" in data[-128:]


def test_duplicate_names_are_refused() -> None:
    writer = CpioWriter(io.BytesIO())
    writer.file("a", b"1")
    with pytest.raises(ValueError, match="duplicate"):
        writer.file("/a/", b"2")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_cpio_tool_lists_it() -> None:
    listing = subprocess.run(
        ["cpio", "-t", "--quiet"], input=archive(), capture_output=True, check=True
    ).stdout.decode()
    assert listing.split() == ["bin", "bin/busybox", "bin/sh", "dev/console", "init", "empty"]
