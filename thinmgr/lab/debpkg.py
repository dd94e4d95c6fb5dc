"""Read Debian packages (.deb: an ar archive holding control.tar.* and data.tar.*).

Pure Python, so that preparing the lab kernel needs neither dpkg-deb nor a full unpack: the
kernel package holds about 400 MB of modules and the lab needs a few megabytes of them.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

AR_MAGIC = b"!<arch>\n"


def ar_members(stream: BinaryIO) -> Iterator[tuple[str, int]]:
    """Yield (name, size) per member, leaving ``stream`` at the member's data."""
    if stream.read(8) != AR_MAGIC:
        raise ValueError("not a .deb (ar) archive")
    while True:
        header = stream.read(60)
        if len(header) < 60:
            return
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        start = stream.tell()
        yield name, size
        stream.seek(start + size + (size % 2))


def _open_member(path: Path, prefix: str) -> tuple[BinaryIO, str]:
    stream = path.open("rb")
    for name, _size in ar_members(stream):
        if name.startswith(prefix):
            return stream, name
    stream.close()
    raise ValueError(f"{path}: no {prefix}* member")


def control_fields(path: Path) -> dict[str, str]:
    """The package's control file as a dict (continuation lines joined)."""
    stream, _ = _open_member(path, "control.tar")
    with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.name.lstrip("./") == "control":
                handle = tar.extractfile(member)
                assert handle is not None
                text = handle.read().decode()
                break
        else:
            raise ValueError(f"{path}: no control file")
    fields: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if line.startswith((" ", "\t")) and key:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def extract_data(path: Path, select: Callable[[str], str | None]) -> list[Path]:
    """Stream data.tar.* and write each regular file for which ``select(name)`` gives a
    destination path; return the paths written. One pass, never the whole tree on disk."""
    written: list[Path] = []
    stream, _ = _open_member(path, "data.tar")
    with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            target = select(member.name.lstrip("./"))
            if target is None:
                continue
            handle = tar.extractfile(member)
            assert handle is not None
            out = Path(target)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(handle.read())
            written.append(out)
    return written
