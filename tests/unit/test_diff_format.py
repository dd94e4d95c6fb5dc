"""The layer-diff file format: round trips, and hostile files refused with a clear error."""

from __future__ import annotations

import hashlib
import io
import os
import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from thinmgr.errors import ConflictError, ExitCode, ThinmgrError
from thinmgr.layers.diff_format import (
    CHUNK,
    HEADER,
    MAX_CHUNK_RAW,
    ExtentKind,
    LayerFileError,
    LayerHeader,
    LayerReader,
    LayerWriter,
    verify_layer,
)

BS = 64 << 10
PARENT = hashlib.sha256(b"parent").digest()


def build(
    extents: list[tuple[int, int, bytes | None]],
    *,
    blocks: int = 64,
    parent: bytes | None = PARENT,
) -> tuple[bytes, str]:
    data_bytes = sum(len(d) for _, _, d in extents if d is not None)
    out = io.BytesIO()
    writer = LayerWriter(out, LayerHeader(BS, blocks * BS, data_bytes, parent))
    for offset, length, data in extents:
        if data is None:
            writer.discard(offset, length)
        else:
            writer.data(offset, length, [data])
    digest = writer.finish()
    return out.getvalue(), digest


def read_all(raw: bytes, parent: bytes | None = PARENT) -> dict[int, bytes | None]:
    reader = LayerReader(io.BytesIO(raw))
    if reader.header.parent_digest != parent:
        verify_layer(io.BytesIO(raw), parent_digest=parent)
    pieces: dict[int, bytes | None] = {}
    for piece in reader.pieces():
        pieces[piece.byte_offset] = piece.data
    return pieces


def sample() -> tuple[bytes, str]:
    return build([(1, 2, os.urandom(2 * BS)), (5, 3, None), (10, 1, b"\0" * BS)])


def test_round_trip_and_digest() -> None:
    a, b = os.urandom(2 * BS), bytes(BS)
    raw, digest = build([(1, 2, a), (5, 3, None), (10, 1, b)])
    assert digest == hashlib.sha256(raw).hexdigest()
    summary = verify_layer(io.BytesIO(raw), parent_digest=PARENT)
    assert (summary.data_extents, summary.discard_extents) == (2, 1)
    assert (summary.data_bytes, summary.discard_bytes) == (3 * BS, 3 * BS)
    assert summary.digest == digest and summary.file_bytes == len(raw)
    pieces = read_all(raw)
    assert pieces == {BS: a, 5 * BS: None, 10 * BS: b}
    assert len(raw) < 2 * BS + 4096  # the zero block compresses to almost nothing


def test_large_extent_is_chunked() -> None:
    data = os.urandom(40 * BS)  # 2.5 MiB: three chunks
    raw, _ = build([(0, 40, data)])
    reader = LayerReader(io.BytesIO(raw))
    got = list(reader.pieces())
    assert len(got) == 3 and b"".join(p.data or b"" for p in got) == data
    assert all(p.extent.kind == ExtentKind.DATA for p in got)


def test_no_parent() -> None:
    raw, _ = build([(0, 1, bytes(BS))], parent=None)
    assert verify_layer(io.BytesIO(raw)).header.parent_digest is None


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3), st.booleans()), max_size=8))
def test_round_trip_property(spec: list[tuple[int, int, bool]]) -> None:
    extents: list[tuple[int, int, bytes | None]] = []
    cursor = 0
    for gap, length, is_data in spec:
        offset = cursor + gap
        extents.append((offset, length, bytes([offset % 251]) * (length * BS) if is_data else None))
        cursor = offset + length
    raw, _ = build(extents)
    pieces = read_all(raw)
    expected = {o * BS: d for o, _, d in extents}
    assert pieces == expected


# --------------------------------------------------------------------------- hostile files


def refused(raw: bytes, match: str, *, parent: bytes | None = PARENT) -> ThinmgrError:
    """The file is refused by a full check, and a streaming reader yields nothing unchecked."""
    with pytest.raises(ThinmgrError, match=match) as caught:
        verify_layer(io.BytesIO(raw), parent_digest=parent)
    assert caught.value.exit_code != ExitCode.OK and caught.value.hint
    return caught.value


def reseal(raw: bytes) -> bytes:
    """Recompute the trailer digest, as a deliberate forger would."""
    body = raw[:-32]
    return body + hashlib.sha256(body).digest()


def test_bad_magic() -> None:
    raw, _ = sample()
    error = refused(b"NOTADIFF" + raw[8:], "not a layer-diff file")
    assert error.exit_code == ExitCode.CORRUPT_METADATA


def test_unknown_version() -> None:
    raw, _ = sample()
    refused(raw[:8] + struct.pack("<I", 2) + raw[12:], "version 2 is not supported")


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.5, 0.8, 0.99])
def test_truncated_everywhere(fraction: float) -> None:
    raw, _ = sample()
    refused(raw[: int(len(raw) * fraction)], "truncated")


def test_truncated_at_every_byte_of_small_file() -> None:
    raw, _ = build([(1, 1, bytes(BS)), (3, 1, None)])
    for cut in range(len(raw)):
        with pytest.raises(LayerFileError):
            verify_layer(io.BytesIO(raw[:cut]), parent_digest=PARENT)


def test_trailing_garbage() -> None:
    raw, _ = sample()
    refused(raw + b"x", "after the trailer")


def test_bad_chunk_checksum() -> None:
    raw, _ = build([(0, 1, os.urandom(BS))])
    start = HEADER.size + 17 + CHUNK.size
    damaged = bytearray(raw)
    damaged[start + 10] ^= 0xFF
    refused(reseal(bytes(damaged)), "checksum mismatch")


def test_bad_whole_file_digest() -> None:
    raw, _ = sample()
    refused(raw[:-1] + bytes([raw[-1] ^ 1]), "sha256 mismatch")


def raw_file(
    records: bytes, *, blocks: int = 64, data: int = 0, parent: bytes | None = PARENT
) -> bytes:
    header = LayerHeader(BS, blocks * BS, data, parent)
    body = header.pack() + records
    return body  # callers add a trailer with ``seal``


def seal(body: bytes, count: int, data: int) -> bytes:
    body += b"T" + struct.pack("<QQ", count, data)
    return body + hashlib.sha256(body).digest()


def discard(offset: int, length: int) -> bytes:
    return b"Z" + struct.pack("<QQ", offset, length)


def test_extent_beyond_volume() -> None:
    refused(seal(raw_file(discard(60, 10)), 1, 0), "beyond the volume")
    refused(seal(raw_file(discard(2**63, 2**63)), 1, 0), "beyond the volume")


def test_overlapping_and_unsorted_extents() -> None:
    refused(seal(raw_file(discard(5, 5) + discard(8, 1)), 2, 0), "overlaps or precedes")
    refused(seal(raw_file(discard(5, 1) + discard(1, 1)), 2, 0), "sorted")
    refused(seal(raw_file(discard(5, 0)), 1, 0), "empty")


def test_absurd_sizes() -> None:
    header = bytearray(LayerHeader(BS, 64 * BS, 0, PARENT).pack())
    struct.pack_into("<I", header, 16, 3)  # block size 3 bytes
    refused(seal(bytes(header), 0, 0), "block size 3")
    refused(seal(raw_file(b"", blocks=1 << 41), 0, 0), "2\\^40 blocks")
    huge_data = bytearray(LayerHeader(BS, 64 * BS, 0, PARENT).pack())
    struct.pack_into("<Q", huge_data, 32, 1 << 60)
    refused(seal(bytes(huge_data), 0, 0), "declared data size")
    # A chunk that declares more than the cap, or more than its extent holds.
    record = b"D" + struct.pack("<QQ", 0, 1) + CHUNK.pack(MAX_CHUNK_RAW + 1, 10, 0)
    refused(seal(raw_file(record, data=BS) + bytes(10), 1, BS), "out of bounds")
    record = b"D" + struct.pack("<QQ", 0, 1) + CHUNK.pack(BS, 0xFFFFFFFF, 0)
    refused(seal(raw_file(record, data=BS), 1, BS), "compressed size")
    # Data extents adding up to more than the header declares.
    record = b"D" + struct.pack("<QQ", 0, 2)
    refused(seal(raw_file(record, data=BS), 1, 2 * BS), "header declares")


def test_decompression_bomb() -> None:
    import crc32c

    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 30))  # 1 GiB of zeros, ~32 KiB
    record = b"D" + struct.pack("<QQ", 0, 1) + CHUNK.pack(BS, len(bomb), crc32c.crc32c(bomb))
    refused(seal(raw_file(record + bomb, data=BS), 1, BS), "more than")


def test_short_decompression_and_garbage_frame() -> None:
    import crc32c

    short = zstandard.ZstdCompressor().compress(bytes(100))
    record = b"D" + struct.pack("<QQ", 0, 1) + CHUNK.pack(BS, len(short), crc32c.crc32c(short))
    refused(seal(raw_file(record + short, data=BS), 1, BS), "declared")
    junk = b"not zstd at all"
    record = b"D" + struct.pack("<QQ", 0, 1) + CHUNK.pack(BS, len(junk), crc32c.crc32c(junk))
    refused(seal(raw_file(record + junk, data=BS), 1, BS), "cannot decompress")


def test_unknown_record_and_wrong_counts() -> None:
    refused(seal(raw_file(b"Q"), 0, 0), "unknown record type")
    refused(seal(raw_file(discard(1, 1)), 5, 0), "trailer says 5 extents")


def test_wrong_parent() -> None:
    raw, _ = sample()
    error = refused(raw, "wrong parent", parent=hashlib.sha256(b"other").digest())
    assert isinstance(error, ConflictError) and error.exit_code == ExitCode.CONFLICT
    refused(raw, "none was given", parent=None)
    whole, _ = build([(0, 1, bytes(BS))], parent=None)
    refused(whole, "no parent", parent=PARENT)


def test_writer_refuses_what_a_reader_would() -> None:
    out = io.BytesIO()
    writer = LayerWriter(out, LayerHeader(BS, 4 * BS, BS, None))
    with pytest.raises(LayerFileError, match="beyond"):
        writer.discard(3, 2)
    with pytest.raises(LayerFileError, match="more data"):
        writer.data(0, 2, [bytes(2 * BS)])
    with pytest.raises(LayerFileError, match="declares"):
        writer.finish()
