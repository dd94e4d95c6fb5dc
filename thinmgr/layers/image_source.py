"""Image sources: OCI layout directories and archives (docker save, oci-archive, rootfs tar).

An outer archive is never extracted: its members are located once by a header scan and read
straight out of it (skopeo's legacy ``<id>/layer.tar`` members are symlinks: they are resolved
inside the archive's own names). The outer file may be plain, gzip, bzip2, xz or zstd
compressed; its compression is sniffed from the magic bytes.

Reading a layer (``LayerReader``) is one streaming pass: blob bytes are counted and hashed
(size and digest), decompressed within ``ImportLimits``, hashed again (diff_id), and parsed as a
tar stream whose every header is checked by ``EntryChecker`` before anything acts on it. The
same reader serves ``ImageSource.scan_layer`` (nothing written) and the confined applier
(``thinmgr.layers.apply``), so both see exactly the same, validated, entries.

Tar headers are read with a guarded ``TarInfo``: Python's tarfile reads a pax or GNU
long-name header in one piece whatever size it claims, so the size is checked first; a header
that fails its checksum or a stream that ends without the end-of-archive block is damage (tarfile
would silently stop there).
"""

from __future__ import annotations

import bz2
import enum
import gzip
import hashlib
import io
import lzma
import math
import os
import posixpath
import stat
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import zstandard

from thinmgr.errors import (
    CorruptImageError,
    NotFoundError,
    ThinmgrError,
    UnsupportedError,
    UsageError,
)
from thinmgr.kernel.errno_map import kernel_error
from thinmgr.layers.image_formats import (
    KIND_OCI_ARCHIVE,
    KIND_OCI_LAYOUT,
    KIND_ROOTFS_TAR,
    MEDIA_TYPE_OF_COMPRESSION,
    Compression,
    Descriptor,
    ImageDescription,
    LayerDescriptor,
    blob_path,
    describe_docker,
    describe_oci,
    layer_compression,
    load_json,
)

CHUNK = 1 << 20
NAME_MAX = 255  # bytes in one path component (linux/limits.h)
MAX_XATTR_VALUE = 65536  # XATTR_SIZE_MAX (linux/limits.h)
MAX_LINK_HOPS = 8  # symlinks followed inside an outer archive (skopeo needs 1)
SMALL_MEMBER = 1 << 20  # outer-archive members up to this size are kept in memory (JSON)
SMALL_MEMBER_BUDGET = 64 << 20
UID_MAX = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to chown
MTIME_LIMIT = 1 << 40  # seconds either side of 1970; beyond is nonsense (and overflows utime)
XATTR_PREFIX = "SCHILY.xattr."
XATTR_NAMESPACES = ("user.", "security.", "trusted.", "system.")


@dataclass(frozen=True)
class ImportLimits:
    """Bounds against decompression bombs and hostile headers: generous but finite."""

    max_layer_bytes: int = 64 << 30  # uncompressed bytes of one layer
    max_entries: int = 1_000_000  # tar members of one layer (and of an outer archive)
    max_name_bytes: int = 4096  # PATH_MAX: a member name or link target
    max_header_bytes: int = 1 << 20  # one pax / GNU long-name header
    max_json_bytes: int = 8 << 20  # manifest, index, config documents
    max_archive_bytes: int = 1 << 40  # decompressed bytes of a compressed outer archive


DEFAULT_LIMITS = ImportLimits()


@dataclass(frozen=True)
class LayerScan:
    diff_id: str  # "sha256:" of the uncompressed tar, verified against the config if named
    digest: str  # blob digest (== diff_id for uncompressed blobs / rootfs tars)
    entries: int
    content_bytes: int  # sum of regular file sizes
    whiteouts: int
    devices: int = 0  # char and block device nodes (allowed: images have /dev nodes)


# ------------------------------------------------------------------------------ streams

_MAGIC = (
    (b"\x1f\x8b", Compression.GZIP),
    (b"BZh", Compression.BZIP2),
    (b"\xfd7zXZ\x00", Compression.XZ),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
)


def sniff_compression(head: bytes) -> Compression:
    """The compression whose magic number ``head`` starts with (NONE otherwise)."""
    for magic, compression in _MAGIC:
        if head.startswith(magic):
            return compression
    return Compression.NONE


def decompressing(raw: BinaryIO, compression: Compression) -> BinaryIO:
    """A reader of ``raw`` decompressed; every reader returns at most what is asked, so
    memory stays bounded whatever the ratio."""
    if compression is Compression.NONE:
        return raw
    if compression is Compression.GZIP:
        return cast(BinaryIO, gzip.GzipFile(fileobj=raw, mode="rb"))
    if compression is Compression.BZIP2:
        return cast(BinaryIO, bz2.BZ2File(raw, "rb"))
    if compression is Compression.XZ:
        return cast(BinaryIO, lzma.LZMAFile(raw, "rb"))
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return cast(BinaryIO, reader)


class _ArchiveDamage(Exception):
    """Raised inside tarfile's parsing (not a tarfile.HeaderError, so tarfile lets it out)."""


class Meter(io.RawIOBase):
    """Counts and hashes what is read through it; refuses to pass more than ``limit`` bytes."""

    def __init__(self, inner: IO[bytes], limit: int, over_limit: str) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.over_limit = over_limit
        self.count = 0
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self.limit - self.count + 1)
        data = self.inner.read(want)
        if not data:
            return 0
        self.count += len(data)
        if self.count > self.limit:
            raise _ArchiveDamage(self.over_limit)
        self.hash.update(data)
        view[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _Slice(io.RawIOBase):
    """``size`` bytes of a stream from where it stands; a short stream is a truncated archive."""

    def __init__(self, inner: IO[bytes], size: int, closing: list[IO[bytes]]) -> None:
        super().__init__()
        self.inner = inner
        self.left = size
        self.closing = closing

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.left == 0:
            return 0
        data = self.inner.read(min(len(view), self.left))
        if not data:
            raise _ArchiveDamage("the archive ends inside a member (truncated)")
        self.left -= len(data)
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        for handle in self.closing:
            handle.close()
        super().close()


def _skip(stream: IO[bytes], count: int) -> None:
    while count:
        data = stream.read(min(count, CHUNK))
        if not data:
            raise _ArchiveDamage("the archive ends before a member it lists (truncated)")
        count -= len(data)


# tarfile's own "end of archive" signal, which TarFile.next() treats as the normal end (not in
# typeshed).
_EOF_HEADER_ERROR: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]


def _guarded_tarinfo(limits: ImportLimits) -> type[tarfile.TarInfo]:
    """A TarInfo class that refuses oversized extended headers before tarfile reads them."""
    zero_block = bytes(tarfile.BLOCKSIZE)
    extended = (
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    )

    class GuardedTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tarfile_: tarfile.TarFile) -> GuardedTarInfo:
            # Same as TarInfo.fromtarfile, but a short read or a bad checksum is damage
            # instead of a silent end of the archive.
            fileobj = cast(IO[bytes], tarfile_.fileobj)
            buf = fileobj.read(tarfile.BLOCKSIZE)
            if len(buf) != tarfile.BLOCKSIZE:
                raise _ArchiveDamage("the tar stream ends without its end-of-archive block")
            if buf == zero_block:
                raise _EOF_HEADER_ERROR("end of file header")
            try:
                obj = cls.frombuf(buf, tarfile_.encoding or "utf-8", tarfile_.errors)
            except tarfile.HeaderError as error:
                raise _ArchiveDamage(f"bad tar header at byte {tarfile_.offset}: {error}") from None
            obj.offset = fileobj.tell() - tarfile.BLOCKSIZE
            return cast(GuardedTarInfo, obj._proc_member(tarfile_))

        def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
            if self.type in extended and self.size > limits.max_header_bytes:
                raise _ArchiveDamage(
                    f"an extended tar header claims {self.size} bytes "
                    f"(limit {limits.max_header_bytes})"
                )
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise _ArchiveDamage("GNU sparse members are not supported in image layers")
            return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]

    return GuardedTarInfo


def open_tar_stream(stream: IO[bytes], limits: ImportLimits, *, seekable: bool) -> tarfile.TarFile:
    mode = "r:" if seekable else "r|"
    return tarfile.open(  # type: ignore[call-overload,no-any-return]
        fileobj=stream,
        mode=mode,
        tarinfo=_guarded_tarinfo(limits),
        encoding="utf-8",
        errors="surrogateescape",
    )


def next_member(tar: tarfile.TarFile) -> tarfile.TarInfo | None:
    """The next member; forgets the earlier ones (tarfile keeps them all otherwise)."""
    info = tar.next()
    cast(Any, tar).members.clear()
    return info


def _tar_problem(error: BaseException) -> str | None:
    """What is wrong when ``error`` says the bytes are not a well-formed (compressed) tar."""
    if isinstance(error, _ArchiveDamage):
        return str(error)
    if isinstance(error, (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)):
        return str(error) or type(error).__name__
    if isinstance(error, (zstandard.ZstdError, UnicodeError, ValueError)):
        return str(error)
    if isinstance(error, OSError) and error.errno is None:  # BadGzipFile, bz2's bad data
        return str(error)
    return None


@contextmanager
def image_errors(what: str) -> Iterator[None]:
    """Turns what goes wrong while reading ``what`` into the matching ThinmgrError."""
    try:
        yield
    except ThinmgrError:
        raise
    except Exception as error:
        problem = _tar_problem(error)
        if problem is not None:
            raise CorruptImageError(f"{what}: {problem}") from None
        if isinstance(error, OSError):
            raise kernel_error(f"read {what}", error) from None
        raise


# ------------------------------------------------------------------------------ stores


def _open_regular(path: Path, what: str) -> BinaryIO:
    try:
        handle = open(path, "rb")  # noqa: SIM115 - handed to the caller
    except FileNotFoundError:
        raise CorruptImageError(f"{what} is missing ({path})") from None
    except OSError as error:
        raise kernel_error(f"open {what} {path}", error) from None
    if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
        handle.close()
        raise CorruptImageError(f"{what} ({path}) is not a regular file")
    return handle


class _DirectoryStore:
    """Blobs of an OCI layout directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open(self, location: str, what: str) -> BinaryIO:
        return _open_regular(self.root / location, what)


@dataclass
class _Member:
    offset: int = 0  # of the data in the decompressed archive
    size: int = 0
    link: str | None = None  # resolved target name for symlink / hardlink members
    head: bytes = b""  # first bytes of the data (compression magic)
    data: bytes | None = None  # kept in memory when small


@dataclass
class _ArchiveStore:
    """Members of an outer tar archive, read in place (never extracted)."""

    path: Path
    compression: Compression
    members: dict[str, _Member] = field(default_factory=dict)

    def resolve(self, name: str, what: str) -> tuple[str, _Member]:
        for _ in range(MAX_LINK_HOPS):
            member = self.members.get(name)
            if member is None:
                raise CorruptImageError(f"{what}: {name!r} is not in {self.path}")
            if member.link is None:
                return name, member
            name = member.link
        raise CorruptImageError(f"{what}: too many links to follow for {name!r} in {self.path}")

    def open(self, location: str, what: str) -> BinaryIO:
        _, member = self.resolve(location, what)
        if member.data is not None:
            return io.BytesIO(member.data)
        raw = _open_regular(self.path, "archive")
        with image_errors(str(self.path)):
            stream = decompressing(raw, self.compression)
            if self.compression is Compression.NONE:
                raw.seek(member.offset)
            else:
                _skip(stream, member.offset)
        return cast(BinaryIO, io.BufferedReader(_Slice(stream, member.size, [stream, raw]), CHUNK))

    def head(self, location: str, what: str) -> bytes:
        return self.resolve(location, what)[1].head


class _FileStore:
    """A bare rootfs tarball: the file is the one layer blob."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self, location: str, what: str) -> BinaryIO:
        return _open_regular(Path(location), what)


_Store = _DirectoryStore | _ArchiveStore | _FileStore


def _member_name(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


def _list_archive(path: Path, compression: Compression, limits: ImportLimits) -> _ArchiveStore:
    """One pass over the outer archive's headers: where each member's data lies."""
    store = _ArchiveStore(path, compression)
    budget = SMALL_MEMBER_BUDGET
    raw = _open_regular(path, "archive")
    with raw, image_errors(f"{path} (not a readable tar archive)"):
        inner = decompressing(raw, compression)
        seekable = compression is Compression.NONE
        stream: IO[bytes] = inner
        if not seekable:
            meter = Meter(inner, limits.max_archive_bytes, "archive decompresses past the limit")
            stream = cast(IO[bytes], meter)
        tar = open_tar_stream(stream, limits, seekable=seekable)
        links: dict[str, str] = {}
        count = 0
        while (info := next_member(tar)) is not None:
            count += 1
            if count > limits.max_entries:
                raise _ArchiveDamage(f"more than {limits.max_entries} members")
            name = _member_name(info.name)
            if info.issym():
                links[name] = posixpath.normpath(
                    posixpath.join(posixpath.dirname(name), info.linkname)
                )
            elif info.islnk():
                links[name] = _member_name(info.linkname)
            elif info.isreg():
                member = _Member(info.offset_data, info.size)
                data = cast(IO[bytes], tar.extractfile(info))
                if info.size <= SMALL_MEMBER and info.size <= budget:
                    member.data = data.read()
                    budget -= info.size
                    member.head = member.data[:8]
                else:
                    member.head = data.read(8)
                store.members[name] = member
        for name, target in links.items():
            if target.startswith("../") or target == ".." or target.startswith("/"):
                continue  # points outside the archive: treated as missing
            store.members[name] = _Member(link=target)
    return store


# ------------------------------------------------------------------------------ entries


class EntryKind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    WHITEOUT = "whiteout"  # dir/.wh.name: remove name from lower layers
    OPAQUE = "opaque"  # dir/.wh..wh..opq: hide every lower child of dir


_KIND_OF_TYPE = {
    tarfile.REGTYPE: EntryKind.FILE,
    tarfile.AREGTYPE: EntryKind.FILE,
    tarfile.CONTTYPE: EntryKind.FILE,
    tarfile.DIRTYPE: EntryKind.DIR,
    tarfile.SYMTYPE: EntryKind.SYMLINK,
    tarfile.LNKTYPE: EntryKind.HARDLINK,
    tarfile.CHRTYPE: EntryKind.CHAR,
    tarfile.BLKTYPE: EntryKind.BLOCK,
    tarfile.FIFOTYPE: EntryKind.FIFO,
}

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


@dataclass(frozen=True)
class LayerEntry:
    """A checked tar member. ``path`` is relative to the layer root, normalised, without
    ``..``; for a hardlink ``link`` is the normalised target path, for a symlink the target
    as stored, for a whiteout the path it removes, for an opaque marker the directory."""

    path: str
    kind: EntryKind
    link: str
    mode: int
    uid: int
    gid: int
    mtime: float
    size: int
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]


class EntryChecker:
    """Validates the members of one layer from their headers alone, before anything acts.

    Absolute names are made relative to the layer root, as Docker does (moby's archive.Apply
    joins each name onto the destination); a ``..`` component anywhere is refused rather than
    resolved, as are NUL bytes, names longer than PATH_MAX or a component longer than
    NAME_MAX, unknown member types, duplicate paths (OCI layer.md: a layer MUST NOT have
    them), and whiteout names that name nothing or sit inside a whiteout.
    """

    def __init__(self, limits: ImportLimits, what: str) -> None:
        self.limits = limits
        self.what = what
        self.seen: set[str] = set()
        self.entries = 0
        self.content_bytes = 0
        self.whiteouts = 0
        self.devices = 0

    def refuse(self, name: str, reason: str) -> CorruptImageError:
        shown = name if len(name) <= 200 else name[:200] + "..."
        return CorruptImageError(f"{self.what}: entry {shown!r}: {reason}")

    def normalise(self, name: str, shown: str, what: str = "name") -> str:
        if "\x00" in name:
            raise self.refuse(shown, f"the {what} holds a NUL byte")
        encoded = name.encode("utf-8", "surrogateescape")
        if len(encoded) > self.limits.max_name_bytes:
            raise self.refuse(
                shown, f"the {what} is {len(encoded)} bytes (limit {self.limits.max_name_bytes})"
            )
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise self.refuse(shown, f"the {what} has a '..' component")
        for part in parts:
            if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX:
                raise self.refuse(shown, f"a component of the {what} is over {NAME_MAX} bytes")
        return "/".join(parts)

    def check(self, info: tarfile.TarInfo) -> LayerEntry | None:
        """The checked entry, or None for the layer root itself ("./"), which is skipped."""
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise CorruptImageError(
                f"{self.what}: more than {self.limits.max_entries} entries",
                hint="Raise the entry limit if this image is genuine.",
            )
        name = info.name
        path = self.normalise(name, name)
        kind = _KIND_OF_TYPE.get(info.type)
        if kind is None:
            raise self.refuse(name, f"tar member type {info.type!r} is not allowed in a layer")
        if not path:
            if kind is not EntryKind.DIR:
                raise self.refuse(name, "the layer root must be a directory")
            return None
        if path in self.seen:
            raise self.refuse(name, "duplicate path (a layer must not repeat a path)")
        self.seen.add(path)
        parts = path.split("/")
        if any(part.startswith(WHITEOUT_PREFIX) for part in parts[:-1]):
            raise self.refuse(name, "a path inside a whiteout")
        link = ""
        base = parts[-1]
        parent = "/".join(parts[:-1])
        if base.startswith(WHITEOUT_PREFIX):
            if kind is EntryKind.DIR:
                raise self.refuse(name, "a whiteout must not be a directory")
            if base == OPAQUE_MARKER:
                kind, link = EntryKind.OPAQUE, parent
            elif base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                raise self.refuse(name, "unknown whiteout meta-entry (only .wh..wh..opq exists)")
            else:
                hidden = base[len(WHITEOUT_PREFIX) :]
                if hidden in ("", ".", ".."):
                    raise self.refuse(name, "a whiteout that names nothing")
                kind, link = EntryKind.WHITEOUT, f"{parent}/{hidden}" if parent else hidden
            self.whiteouts += 1
        elif kind is EntryKind.HARDLINK:
            # The target is taken inside the layer root, like the name (absolute = from the root).
            link = self.normalise(info.linkname, name, "hardlink target")
            if not link:
                raise self.refuse(name, "a hardlink to the layer root")
            if link == path:
                raise self.refuse(name, "a hardlink to itself")
            if any(part.startswith(WHITEOUT_PREFIX) for part in link.split("/")):
                raise self.refuse(name, "a hardlink to a whiteout")
        elif kind is EntryKind.SYMLINK:
            link = info.linkname
            if not link or "\x00" in link:
                raise self.refuse(name, "a symlink with an empty target or a NUL byte")
            if len(link.encode("utf-8", "surrogateescape")) > self.limits.max_name_bytes:
                raise self.refuse(name, "the symlink target is longer than PATH_MAX")
        elif kind in (EntryKind.CHAR, EntryKind.BLOCK):
            self.devices += 1
        size = 0
        if kind is EntryKind.FILE:
            size = info.size
            if size < 0:
                raise self.refuse(name, "a negative size")
            self.content_bytes += size
            if self.content_bytes > self.limits.max_layer_bytes:
                raise self.refuse(
                    name, f"the layer's files exceed {self.limits.max_layer_bytes} bytes"
                )
        for value, label in ((info.uid, "uid"), (info.gid, "gid")):
            if not 0 <= value <= UID_MAX:
                raise self.refuse(name, f"{label} {value} is out of range")
        mtime = float(info.mtime)
        if not math.isfinite(mtime) or abs(mtime) > MTIME_LIMIT:
            raise self.refuse(name, f"mtime {info.mtime!r} is out of range")
        return LayerEntry(
            path=path,
            kind=kind,
            link=link,
            mode=info.mode & 0o7777,
            uid=info.uid,
            gid=info.gid,
            mtime=mtime,
            size=size,
            devmajor=info.devmajor,
            devminor=info.devminor,
            xattrs=self.xattrs(info, name),
        )

    def xattrs(self, info: tarfile.TarInfo, name: str) -> dict[str, bytes]:
        found: dict[str, bytes] = {}
        for key, value in info.pax_headers.items():
            if not key.startswith(XATTR_PREFIX):
                continue
            attr = key[len(XATTR_PREFIX) :]
            if "\x00" in attr or not attr or len(attr.encode()) > NAME_MAX:
                raise self.refuse(name, f"bad xattr name {attr!r}")
            if not attr.startswith(XATTR_NAMESPACES):
                raise self.refuse(name, f"xattr {attr!r} is in an unknown namespace")
            # tarfile decodes pax values as UTF-8 with surrogateescape: this gives the bytes back.
            raw = value.encode("utf-8", "surrogateescape")
            if len(raw) > MAX_XATTR_VALUE:
                raise self.refuse(name, f"xattr {attr!r} is over {MAX_XATTR_VALUE} bytes")
            found[attr] = raw
        return found


# ------------------------------------------------------------------------------ layers


class LayerReader:
    """One streaming pass over a layer blob: verified, bounded, every header checked.

    Open it (which opens the blob and the decompressor and reads the first header), iterate
    ``entries()``, read a file's data with ``content()`` while it is current, then call
    ``finish()`` which checks size, digest and diff_id."""

    def __init__(
        self, raw: BinaryIO, layer: LayerDescriptor, limits: ImportLimits, what: str
    ) -> None:
        self.layer = layer
        self.what = what
        self.raw = raw
        expected = layer.size if layer.size is not None else limits.max_archive_bytes
        self.blob = Meter(raw, expected, f"{what}: the blob is larger than the manifest says")
        with image_errors(what):
            compression = layer_compression(layer.media_type)
            self.plain = Meter(
                decompressing(cast(BinaryIO, io.BufferedReader(self.blob, CHUNK)), compression),
                limits.max_layer_bytes,
                f"{what}: decompresses to more than {limits.max_layer_bytes} bytes "
                "(decompression bomb?)",
            )
            self.tar = open_tar_stream(cast(IO[bytes], self.plain), limits, seekable=False)
        self.checker = EntryChecker(limits, what)

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> LayerReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(self) -> Iterator[tuple[LayerEntry, tarfile.TarInfo]]:
        while True:
            with image_errors(self.what):
                info = next_member(self.tar)
            if info is None:
                return
            entry = self.checker.check(info)
            if entry is not None:
                yield entry, info

    def content(self, info: tarfile.TarInfo) -> Iterator[bytes]:
        """The data of the current member, in chunks."""
        with image_errors(self.what):
            data = cast(IO[bytes], self.tar.extractfile(info))
            left = info.size
            while left:
                chunk = data.read(min(left, CHUNK))
                if not chunk:
                    raise _ArchiveDamage(f"entry {info.name!r} is truncated")
                left -= len(chunk)
                yield chunk

    def finish(self) -> LayerScan:
        with image_errors(self.what):
            self.plain.drain()
            self.blob.drain()
        layer = self.layer
        if layer.size is not None and self.blob.count != layer.size:
            raise CorruptImageError(
                f"{self.what}: the blob has {self.blob.count} bytes, the manifest says {layer.size}"
            )
        if layer.digest is not None and self.blob.digest != layer.digest:
            raise CorruptImageError(
                f"{self.what}: the blob's digest is {self.blob.digest}, not {layer.digest}"
            )
        if layer.diff_id is not None and self.plain.digest != layer.diff_id:
            raise CorruptImageError(
                f"{self.what}: the uncompressed layer's digest is {self.plain.digest}, "
                f"not the diff_id {layer.diff_id} the config names"
            )
        c = self.checker
        return LayerScan(
            self.plain.digest, self.blob.digest, c.entries, c.content_bytes, c.whiteouts, c.devices
        )


class ImageSource:
    """An image to import: its description and a way to read each layer."""

    def __init__(
        self, path: Path, description: ImageDescription, store: _Store, limits: ImportLimits
    ) -> None:
        self.path = path
        self.description = description
        self.limits = limits
        self._store = store

    def _layer(self, index: int) -> LayerDescriptor:
        layers = self.description.layers
        if not 0 <= index < len(layers):
            raise UsageError(f"{self.path} has {len(layers)} layers; there is no layer {index}")
        return layers[index]

    def layer_name(self, index: int) -> str:
        layer = self._layer(index)
        label = layer.digest or layer.diff_id or layer.location
        return f"layer {index} ({label}) of {self.path}"

    def open_layer(self, index: int) -> LayerReader:
        """A reader of layer ``index`` (a fresh file handle of its own, so that a forked child
        can use it without sharing a file offset with the parent)."""
        layer = self._layer(index)
        what = self.layer_name(index)
        raw = self._store.open(layer.location, what)
        try:
            return LayerReader(raw, layer, self.limits, what)
        except BaseException:
            raw.close()
            raise

    def scan_layer(self, index: int) -> LayerScan:
        """Reads layer ``index`` once without writing anything and checks it all."""
        with self.open_layer(index) as reader:
            for _entry, _info in reader.entries():
                pass
            return reader.finish()


# ------------------------------------------------------------------------------ opening


def _read_small(store: _Store, location: str, size: int | None, limit: int, what: str) -> bytes:
    if size is not None and size > limit:
        raise CorruptImageError(f"{what} claims {size} bytes (limit {limit})")
    with store.open(location, what) as handle, image_errors(what):
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise CorruptImageError(f"{what} is over {limit} bytes")
    return data


def _blob_reader(store: _Store, limits: ImportLimits) -> Any:
    def read_blob(desc: Descriptor) -> bytes:
        what = f"blob {desc.digest}"
        data = _read_small(store, blob_path(desc.digest), desc.size, limits.max_json_bytes, what)
        if len(data) != desc.size:
            raise CorruptImageError(
                f"{what} has {len(data)} bytes, its descriptor says {desc.size}"
            )
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != desc.digest:
            raise CorruptImageError(f"{what} has digest {actual} (corrupt or tampered)")
        return data

    return read_blob


def _check_layout_version(data: bytes, source: str) -> None:
    doc = load_json(data, f"{source} oci-layout")
    version = doc.get("imageLayoutVersion") if isinstance(doc, dict) else None
    if not isinstance(version, str) or not version.startswith("1."):
        raise UnsupportedError(f"{source}: image layout version {version!r} is not supported")


def _host_platform() -> tuple[str, str]:
    machine = os.uname().machine
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(machine)
    return ("linux", arch or machine)


def _describe_layout(path: Path, tag: str | None, limits: ImportLimits) -> ImageSource:
    store = _DirectoryStore(path)
    if not (path / "oci-layout").is_file():
        raise UsageError(
            f"{path} is a directory but not an OCI image layout (no oci-layout file)",
            hint="Pass an OCI layout directory, a docker save or oci-archive tarball, or a rootfs "
            "tar.",
        )
    _check_layout_version(_read_small(store, "oci-layout", None, 4096, "oci-layout"), str(path))
    index = _read_small(store, "index.json", None, limits.max_json_bytes, f"{path}/index.json")
    description = describe_oci(
        index,
        _blob_reader(store, limits),
        kind=KIND_OCI_LAYOUT,
        tag=tag,
        source=str(path),
        platform=_host_platform(),
    )
    return ImageSource(path, description, store, limits)


def _describe_archive(path: Path, tag: str | None, limits: ImportLimits) -> ImageSource:
    with _open_regular(path, "image") as handle, image_errors(str(path)):
        compression = sniff_compression(handle.read(8))
    store = _list_archive(path, compression, limits)
    source = str(path)
    if "manifest.json" in store.members:

        def read_member(name: str) -> bytes:
            what = f"{source}: {name}"
            _, member = store.resolve(_member_name(name), what)
            return _read_small(store, _member_name(name), member.size, limits.max_json_bytes, what)

        def sniff(name: str) -> str:
            head = store.head(_member_name(name), f"{source}: layer {name}")
            return MEDIA_TYPE_OF_COMPRESSION[sniff_compression(head)]

        manifest = read_member("manifest.json")
        description = describe_docker(manifest, read_member, sniff, tag=tag, source=source)
        layers = [
            LayerDescriptor(d.digest, d.diff_id, d.media_type, d.size, _member_name(d.location))
            for d in description.layers
        ]
        description = ImageDescription(
            description.kind,
            description.tags,
            description.config_digest,
            description.config,
            layers,
        )
        return ImageSource(path, description, store, limits)
    if "index.json" in store.members and "oci-layout" in store.members:
        layout = _read_small(store, "oci-layout", None, 4096, f"{source}: oci-layout")
        _check_layout_version(layout, source)
        index = _read_small(
            store, "index.json", None, limits.max_json_bytes, f"{source}: index.json"
        )
        description = describe_oci(
            index,
            _blob_reader(store, limits),
            kind=KIND_OCI_ARCHIVE,
            tag=tag,
            source=source,
            platform=_host_platform(),
        )
        return ImageSource(path, description, store, limits)
    # Anything else is a root file system tarball: the file is the one layer.
    layer = LayerDescriptor(
        None, None, MEDIA_TYPE_OF_COMPRESSION[compression], path.stat().st_size, str(path)
    )
    description = ImageDescription(KIND_ROOTFS_TAR, [], None, {}, [layer])
    return ImageSource(path, description, _FileStore(path), limits)


@contextmanager
def open_image_source(
    path: Path, *, tag: str | None = None, limits: ImportLimits = DEFAULT_LIMITS
) -> Iterator[ImageSource]:
    """An image source at ``path``: an OCI layout directory, or a file (docker save legacy or
    >= 25, oci-archive, or a rootfs tarball; plain, gzip, bzip2, xz or zstd). ``tag`` picks one
    image when the source holds several."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise NotFoundError(f"image source {path} does not exist") from None
    except OSError as error:
        raise kernel_error(f"read image source {path}", error) from None
    if stat.S_ISDIR(mode):
        yield _describe_layout(path, tag, limits)
    elif stat.S_ISREG(mode):
        yield _describe_archive(path, tag, limits)
    else:
        raise UsageError(f"image source {path} is neither a directory nor a regular file")
