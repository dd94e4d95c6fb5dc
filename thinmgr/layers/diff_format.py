"""The layer-diff file: a streaming, versioned record of the blocks a volume changed.

Byte-level specification: docs/layer-diff-format.md. This module is pure (it reads and writes
``IO[bytes]`` streams it is given; opening files belongs to ``thinmgr.ops.layers``).

Layout (all integers little-endian)::

    header   magic "THINDIFF", version, flags, block size, volume size, data bytes,
             parent digest
    records  'D' data extent (offset, length in blocks) followed by its chunks
             'Z' discard extent (offset, length in blocks)
    trailer  'T', number of extents, data bytes, sha256 of every byte before the digest

Every number is checked against hard bounds before it is used: extents lie inside the
volume, in increasing order, without overlap; a chunk declares its compressed and
decompressed sizes, both capped, and decompression may not produce more than declared (a
decompression bomb stops at the cap); the data of all extents may not exceed what the header
declares, which may not exceed the volume size.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import IO, TYPE_CHECKING

import crc32c
import zstandard

from thinmgr.errors import ConflictError, ExitCode, ThinmgrError

if TYPE_CHECKING:
    from hashlib import _Hash

MAGIC = b"THINDIFF"
FORMAT_VERSION = 1
FLAG_HAS_PARENT = 1

# dm-thin's data block sizes: multiples of 64 KiB from 64 KiB to 1 GiB (format section 2).
MIN_BLOCK_SIZE = 64 << 10
MAX_BLOCK_SIZE = 1 << 30
MAX_VOLUME_BLOCKS = 1 << 40  # dm-thin's virtual block numbers are 40-bit
CHUNK_SIZE = 1 << 20  # what the writer puts in one chunk before compression
MAX_CHUNK_RAW = 4 << 20  # what a reader accepts
# zstd's worst case for incompressible input is ~ n + n/128 + 512; leave room for that.
MAX_CHUNK_COMPRESSED = MAX_CHUNK_RAW + (MAX_CHUNK_RAW >> 7) + 4096

HEADER = struct.Struct("<8sIIIIQQ32s")  # magic version flags block_size reserved volume data parent
EXTENT = struct.Struct("<cQQ")  # record type, offset (blocks), length (blocks)
CHUNK = struct.Struct("<III")  # raw size, compressed size, crc32c of the compressed bytes
TRAILER_COUNTS = struct.Struct("<cQQ")  # 'T', number of extents, data bytes
DIGEST_SIZE = 32

DATA_RECORD = b"D"
DISCARD_RECORD = b"Z"
TRAILER_RECORD = b"T"


class LayerFileError(ThinmgrError):
    """A layer-diff file that is not well formed: refused before anything is written."""

    exit_code = ExitCode.CORRUPT_METADATA
    default_hint = (
        "The file is damaged, truncated or not a thinmgr layer-diff file; export it again "
        "(see docs/layer-diff-format.md)."
    )


class ExtentKind(IntEnum):
    DATA = 1
    DISCARD = 2


@dataclass(frozen=True)
class LayerHeader:
    block_size: int  # bytes
    volume_size: int  # bytes, a whole number of blocks
    data_bytes: int  # total bytes of all data extents
    parent_digest: bytes | None  # 32 bytes: the parent volume's content digest

    @property
    def volume_blocks(self) -> int:
        return self.volume_size // self.block_size

    def pack(self) -> bytes:
        flags = FLAG_HAS_PARENT if self.parent_digest is not None else 0
        parent = self.parent_digest if self.parent_digest is not None else bytes(DIGEST_SIZE)
        return HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            flags,
            self.block_size,
            0,
            self.volume_size,
            self.data_bytes,
            parent,
        )


@dataclass(frozen=True)
class Extent:
    kind: ExtentKind
    offset: int  # blocks
    length: int  # blocks


@dataclass(frozen=True)
class Piece:
    """What a reader hands over: a discard, or one chunk of a data extent."""

    extent: Extent
    byte_offset: int  # in the volume
    data: bytes | None  # None: the extent is a discard of its whole range


@dataclass(frozen=True)
class LayerSummary:
    header: LayerHeader
    extents: int
    data_extents: int
    discard_extents: int
    data_bytes: int
    discard_bytes: int
    file_bytes: int
    digest: str  # sha256 of the whole file, hex


def check_header(header: LayerHeader) -> None:
    """The bounds every header must meet; the writer and the reader use the same test."""
    bs = header.block_size
    if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs % MIN_BLOCK_SIZE:
        raise LayerFileError(
            f"block size {bs} is not a dm-thin data block size (64 KiB to 1 GiB, "
            "a multiple of 64 KiB)"
        )
    if header.volume_size <= 0 or header.volume_size % bs:
        raise LayerFileError(
            f"volume size {header.volume_size} is not a positive whole number of {bs}-byte blocks"
        )
    if header.volume_blocks > MAX_VOLUME_BLOCKS:
        raise LayerFileError(f"volume size {header.volume_size} exceeds dm-thin's 2^40 blocks")
    if header.data_bytes < 0 or header.data_bytes > header.volume_size or header.data_bytes % bs:
        raise LayerFileError(
            f"declared data size {header.data_bytes} is not a whole number of blocks within "
            f"the volume size {header.volume_size}"
        )
    if header.parent_digest is not None and len(header.parent_digest) != DIGEST_SIZE:
        raise LayerFileError("parent digest is not 32 bytes")


class _ExtentOrder:
    """Extents must be non-empty, inside the volume, sorted and not overlapping."""

    def __init__(self, header: LayerHeader) -> None:
        self.blocks = header.volume_blocks
        self.next_free = 0
        self.count = 0

    def check(self, extent: Extent) -> None:
        if extent.length <= 0:
            raise LayerFileError(f"extent at block {extent.offset} is empty")
        end = extent.offset + extent.length
        if end > self.blocks:
            raise LayerFileError(
                f"extent of blocks {extent.offset}..{end - 1} lies beyond the volume's "
                f"{self.blocks} blocks"
            )
        if extent.offset < self.next_free:
            raise LayerFileError(
                f"extent at block {extent.offset} overlaps or precedes the previous extent "
                f"(which ends before block {self.next_free}); extents must be sorted"
            )
        self.next_free = end
        self.count += 1


# --------------------------------------------------------------------------- writer


class LayerWriter:
    """Streams a layer-diff file to ``out``: ``data``/``discard`` in volume order, then
    ``finish``. The writer enforces the reader's bounds, so it never writes a file that a
    reader would refuse."""

    def __init__(self, out: IO[bytes], header: LayerHeader, *, level: int = 3) -> None:
        check_header(header)
        self.out = out
        self.header = header
        self.hash = hashlib.sha256()
        self.order = _ExtentOrder(header)
        self.compressor = zstandard.ZstdCompressor(level=level)
        self.data_written = 0
        self._emit(header.pack())

    def _emit(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.out.write(chunk)

    def discard(self, offset: int, length: int) -> None:
        self.order.check(Extent(ExtentKind.DISCARD, offset, length))
        self._emit(EXTENT.pack(DISCARD_RECORD, offset, length))

    def data(self, offset: int, length: int, chunks: Iterable[bytes]) -> None:
        """One data extent; ``chunks`` together hold exactly ``length`` blocks."""
        self.order.check(Extent(ExtentKind.DATA, offset, length))
        expected = length * self.header.block_size
        if self.data_written + expected > self.header.data_bytes:
            raise LayerFileError("more data than the header declares")
        self._emit(EXTENT.pack(DATA_RECORD, offset, length))
        written = 0
        for chunk in chunks:
            for start in range(0, len(chunk), CHUNK_SIZE):
                piece = chunk[start : start + CHUNK_SIZE]
                written += len(piece)
                if written > expected:
                    raise LayerFileError(f"extent at block {offset}: more data than its length")
                packed = self.compressor.compress(piece)
                self._emit(CHUNK.pack(len(piece), len(packed), crc32c.crc32c(packed)))
                self._emit(packed)
        if written != expected:
            raise LayerFileError(f"extent at block {offset}: {written} bytes, not {expected}")
        self.data_written += written

    def finish(self) -> str:
        """Writes the trailer; returns the file's sha256 (hex)."""
        if self.data_written != self.header.data_bytes:
            raise LayerFileError(
                f"wrote {self.data_written} data bytes, "
                f"the header declares {self.header.data_bytes}"
            )
        self._emit(TRAILER_COUNTS.pack(TRAILER_RECORD, self.order.count, self.data_written))
        digest = self.hash.digest()
        self.out.write(digest)
        return _file_digest_hex(self.hash, digest)


def _file_digest_hex(before_digest: _Hash, digest: bytes) -> str:
    """The sha256 of the whole file (what names it): the running hash plus the digest bytes."""
    whole = before_digest.copy()
    whole.update(digest)
    return whole.hexdigest()


# --------------------------------------------------------------------------- reader


class _Input:
    """Exact reads that hash what they read; a short read is a truncated file."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.hash = hashlib.sha256()
        self.position = 0

    def read(self, size: int, what: str, *, hashed: bool = True) -> bytes:
        data = self.stream.read(size)
        if len(data) != size:
            raise LayerFileError(
                f"file truncated: {what} at byte {self.position} needs {size} bytes, "
                f"{len(data)} left"
            )
        if hashed:
            self.hash.update(data)
        self.position += size
        return data


def read_header(source: _Input) -> LayerHeader:
    raw = source.read(HEADER.size, "header")
    magic, version, flags, block_size, _reserved, volume, data, parent = HEADER.unpack(raw)
    if magic != MAGIC:
        raise LayerFileError(f"not a layer-diff file (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise LayerFileError(
            f"layer-diff format version {version} is not supported (this thinmgr reads "
            f"version {FORMAT_VERSION})",
            hint="Upgrade thinmgr, or export the layer with the version that reads it.",
        )
    if flags & ~FLAG_HAS_PARENT:
        raise LayerFileError(f"unknown header flags {flags:#x}")
    has_parent = bool(flags & FLAG_HAS_PARENT)
    if not has_parent and parent != bytes(DIGEST_SIZE):
        raise LayerFileError("header has a parent digest but no parent flag")
    header = LayerHeader(block_size, volume, data, parent if has_parent else None)
    check_header(header)
    return header


class LayerReader:
    """Reads and checks a layer-diff file as it streams; ``pieces()`` ends only after the
    trailer and the whole-file digest are verified. A consumer that must not act on an
    unverified file reads it once with ``verify_layer`` first."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.input = _Input(stream)
        self.header = read_header(self.input)
        self.order = _ExtentOrder(self.header)
        self.decompressor = zstandard.ZstdDecompressor()
        self.data_bytes = 0
        self.discard_bytes = 0
        self.data_extents = 0
        self.digest = ""

    def pieces(self) -> Iterator[Piece]:
        while True:
            kind = self.input.read(1, "record type")
            if kind == TRAILER_RECORD:
                self._trailer()
                return
            if kind not in (DATA_RECORD, DISCARD_RECORD):
                raise LayerFileError(
                    f"unknown record type {kind!r} at byte {self.input.position - 1}"
                )
            offset, length = struct.unpack("<QQ", self.input.read(16, "extent"))
            extent_kind = ExtentKind.DATA if kind == DATA_RECORD else ExtentKind.DISCARD
            extent = Extent(extent_kind, offset, length)
            self.order.check(extent)
            byte_offset = offset * self.header.block_size
            size = length * self.header.block_size
            if extent_kind == ExtentKind.DISCARD:
                self.discard_bytes += size
                yield Piece(extent, byte_offset, None)
                continue
            if self.data_bytes + size > self.header.data_bytes:
                raise LayerFileError(
                    f"extent at block {offset} takes the data past the "
                    f"{self.header.data_bytes} bytes the header declares"
                )
            self.data_bytes += size
            self.data_extents += 1
            yield from self._chunks(extent, byte_offset, size)

    def _chunks(self, extent: Extent, byte_offset: int, size: int) -> Iterator[Piece]:
        done = 0
        while done < size:
            raw_size, packed_size, crc = CHUNK.unpack(self.input.read(CHUNK.size, "chunk header"))
            where = f"chunk at volume byte {byte_offset + done}"
            if raw_size == 0 or raw_size > MAX_CHUNK_RAW or raw_size > size - done:
                raise LayerFileError(
                    f"{where}: declared size {raw_size} is out of bounds "
                    f"(1..{min(MAX_CHUNK_RAW, size - done)})"
                )
            if packed_size == 0 or packed_size > MAX_CHUNK_COMPRESSED:
                raise LayerFileError(f"{where}: compressed size {packed_size} is out of bounds")
            packed = self.input.read(packed_size, "chunk data")
            if crc32c.crc32c(packed) != crc:
                raise LayerFileError(f"{where}: checksum mismatch")
            yield Piece(extent, byte_offset + done, self._decompress(packed, raw_size, where))
            done += raw_size

    def _decompress(self, packed: bytes, raw_size: int, where: str) -> bytes:
        # max_output_size caps what zstd may produce, whatever the frame claims: a
        # decompression bomb stops one byte past the declared size and is refused.
        try:
            raw = self.decompressor.decompress(packed, max_output_size=raw_size + 1)
        except zstandard.ZstdError as exc:
            raise LayerFileError(f"{where}: cannot decompress ({exc})") from None
        if len(raw) != raw_size:
            raise LayerFileError(
                f"{where}: decompresses to {'more than' if len(raw) > raw_size else ''} "
                f"{len(raw)} bytes, declared {raw_size}"
            )
        return raw

    def _trailer(self) -> None:
        count, data = struct.unpack("<QQ", self.input.read(16, "trailer"))
        if count != self.order.count or data != self.data_bytes:
            raise LayerFileError(
                f"trailer says {count} extents and {data} data bytes, the file holds "
                f"{self.order.count} and {self.data_bytes}"
            )
        if data != self.header.data_bytes:
            raise LayerFileError(
                f"the file holds {data} data bytes, the header declares {self.header.data_bytes}"
            )
        before = self.input.hash.copy()
        digest = self.input.read(DIGEST_SIZE, "trailer digest", hashed=False)
        if digest != before.digest():
            raise LayerFileError("whole-file sha256 mismatch: the file was altered or damaged")
        if self.input.stream.read(1):
            raise LayerFileError("bytes after the trailer")
        self.digest = _file_digest_hex(before, digest)

    def summary(self) -> LayerSummary:
        return LayerSummary(
            header=self.header,
            extents=self.order.count,
            data_extents=self.data_extents,
            discard_extents=self.order.count - self.data_extents,
            data_bytes=self.data_bytes,
            discard_bytes=self.discard_bytes,
            file_bytes=self.input.position,
            digest=self.digest,
        )


def verify_layer(stream: IO[bytes], *, parent_digest: bytes | None = None) -> LayerSummary:
    """Reads the whole file and checks everything, the parent included; writes nothing."""
    reader = LayerReader(stream)
    check_parent(reader.header, parent_digest)
    for _piece in reader.pieces():
        pass
    return reader.summary()


def check_parent(header: LayerHeader, parent_digest: bytes | None) -> None:
    """The file must have been made against the parent it is applied to (or against none)."""
    if header.parent_digest == parent_digest:
        return
    if header.parent_digest is None:
        raise ConflictError(
            "the layer-diff file holds a whole volume (no parent), but a parent was given",
            hint="Import it without --parent.",
        )
    if parent_digest is None:
        raise ConflictError(
            f"the layer-diff file was made against a parent (content digest "
            f"{header.parent_digest.hex()[:16]}...), none was given",
            hint="Pass --parent with the volume it was exported against.",
        )
    raise ConflictError(
        f"wrong parent: the file was made against content digest "
        f"{header.parent_digest.hex()[:16]}..., the parent given has "
        f"{parent_digest.hex()[:16]}...",
        hint="Import it onto a copy of the volume it was exported against.",
    )
