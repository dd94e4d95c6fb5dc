"""Streaming parser of thin_dump XML (format section 9.1), 0.9.0 form plus 1.x def/ref.

The XML is fed in chunks to expat, so a multi-gigabyte dump never sits in memory as a tree.
Mappings are collected into plain lists and handed on in numpy batches; the numeric checks
over them (ranges, 24-bit times, the data device size) are vectorised, and every error names
the line of the offending element.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol
from xml.parsers import expat

import numpy as np
import numpy.typing as npt

from thinmgr.errors import UsageError
from thinmgr.format.constants import (
    MAX_DATA_BLOCK,
    MAX_DATA_BLOCK_SECTORS,
    MAX_DEV_ID,
    MAX_TIME,
    MIN_DATA_BLOCK_SECTORS,
)

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
BATCH_RUNS = 1 << 16  # runs collected in Python lists before they move into numpy


class XmlInputError(UsageError):
    """The XML is not a valid thin_dump document; ``line`` says where (exit code 2)."""

    default_hint = (
        "Fix the XML at that line; it must follow the format thin_dump writes "
        "(`thinmgr metadata dump` makes one from existing metadata)."
    )

    def __init__(self, message: str, *, line: int | None = None, hint: str | None = None):
        super().__init__(f"line {line}: {message}" if line is not None else message, hint=hint)
        self.line = line
        self.reason = message


@dataclass(frozen=True)
class XmlSuperblock:
    time: int
    transaction: int
    flags: int
    version: int
    data_block_size: int
    nr_data_blocks: int
    line: int


@dataclass(frozen=True)
class XmlDevice:
    dev_id: int
    transaction: int
    creation_time: int
    snap_time: int
    line: int


@dataclass(frozen=True)
class RunBatch:
    """Consecutive mappings of one section as runs (a single mapping is a run of one)."""

    vbegin: U64
    dbegin: U64
    length: U64
    time: U64
    line: I64


class XmlVisitor(Protocol):
    def superblock(self, sb: XmlSuperblock) -> None: ...
    def begin_def(self, name: str, line: int) -> None: ...
    def end_def(self, line: int) -> None: ...
    def begin_device(self, dev: XmlDevice) -> None: ...
    def end_device(self, line: int) -> None: ...
    def runs(self, batch: RunBatch) -> None: ...
    def ref(self, name: str, line: int) -> None: ...


# (required, optional) attributes of each element.
_SPECS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "superblock": (
        frozenset({"time", "transaction", "data_block_size", "nr_data_blocks"}),
        frozenset({"uuid", "flags", "version", "metadata_snap"}),
    ),
    "device": (
        frozenset({"dev_id", "transaction", "creation_time", "snap_time"}),
        frozenset({"mapped_blocks"}),
    ),
    "def": (frozenset({"name"}), frozenset()),
    "ref": (frozenset({"name"}), frozenset()),
    "single_mapping": (frozenset({"origin_block", "data_block", "time"}), frozenset()),
    "range_mapping": (frozenset({"origin_begin", "data_begin", "length", "time"}), frozenset()),
}
# Which elements may appear inside which ("" is the document level).
_CHILDREN = {
    "": ("superblock",),
    "superblock": ("def", "device"),
    "device": ("single_mapping", "range_mapping", "ref"),
    "def": ("single_mapping", "range_mapping"),
    "single_mapping": (),
    "range_mapping": (),
    "ref": (),
}
_SINGLE = "single_mapping"
_RANGE = "range_mapping"


def _is_uint(text: str) -> bool:
    return text.isascii() and text.isdigit()


class ThinXmlParser:
    """Feeds expat and turns its events into ``XmlVisitor`` calls."""

    def __init__(self, visitor: XmlVisitor) -> None:
        self.visitor = visitor
        self.sb: XmlSuperblock | None = None
        self._stack: list[str] = [""]
        self._parser = expat.ParserCreate()
        self._parser.buffer_text = True
        self._parser.buffer_size = 1 << 16
        self._parser.StartElementHandler = self._start
        self._parser.EndElementHandler = self._end
        self._parser.CharacterDataHandler = self._text
        self._parser.ordered_attributes = True
        self._in_section = False  # inside <device> or <def>
        self._open_mapping = False  # inside a mapping element (which must stay empty)
        # (origin, data, length, time, line) of the runs not yet handed on
        self._rows: list[tuple[int, int, int, int, int]] = []

    # -- driving --------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        self._parse(chunk, False)

    def close(self) -> None:
        self._parse(b"", True)
        if self.sb is None:
            raise XmlInputError("no <superblock> element", line=1)

    def _parse(self, data: bytes, final: bool) -> None:
        try:
            self._parser.Parse(data, final)
        except expat.ExpatError as exc:
            reason = expat.errors.messages[exc.code]
            if reason == expat.errors.XML_ERROR_NO_ELEMENTS:
                reason += " (the XML is empty or truncated)"
            raise XmlInputError(
                f"not well-formed XML: {reason} (column {exc.offset + 1})", line=exc.lineno
            ) from None

    @property
    def line(self) -> int:
        return int(self._parser.CurrentLineNumber)

    # -- expat handlers -------------------------------------------------------------------

    def _start(self, name: str, attrs: list[str]) -> None:
        # The two mapping elements are nearly every element of a dump, so they get a fast
        # path for the attribute order thin_dump writes; anything else takes the slow path,
        # which checks everything and names what is wrong.
        if self._in_section and not self._open_mapping:
            if (
                name == _SINGLE
                and len(attrs) == 6
                and attrs[0] == "origin_block"
                and attrs[2] == "data_block"
                and attrs[4] == "time"
            ):
                o, d, t = attrs[1], attrs[3], attrs[5]
                digits = o + d + t
                if digits.isdigit() and digits.isascii():
                    self._rows.append((int(o), int(d), 1, int(t), self._parser.CurrentLineNumber))
                    self._open_mapping = True
                    if len(self._rows) >= BATCH_RUNS:
                        self._flush()
                    return
            elif (
                name == _RANGE
                and len(attrs) == 8
                and attrs[0] == "origin_begin"
                and attrs[2] == "data_begin"
                and attrs[4] == "length"
                and attrs[6] == "time"
            ):
                o, d, n, t = attrs[1], attrs[3], attrs[5], attrs[7]
                digits = o + d + n + t
                if digits.isdigit() and digits.isascii():
                    self._rows.append(
                        (int(o), int(d), int(n), int(t), self._parser.CurrentLineNumber)
                    )
                    self._open_mapping = True
                    if len(self._rows) >= BATCH_RUNS:
                        self._flush()
                    return
        self._start_slow(name, dict(zip(attrs[::2], attrs[1::2], strict=True)), attrs[::2])

    def _start_slow(self, name: str, attrs: dict[str, str], names: list[str]) -> None:
        line = self.line
        parent = _SINGLE if self._open_mapping else self._stack[-1]
        if len(names) != len(attrs):
            raise XmlInputError(f"<{name}> repeats an attribute", line=line)
        if name not in _SPECS:
            raise XmlInputError(f"unknown element <{name}>", line=line)
        if name not in _CHILDREN[parent]:
            where = f"inside <{parent}>" if parent else "as the document element"
            allowed = ", ".join(f"<{c}>" for c in _CHILDREN[parent]) or "nothing"
            raise XmlInputError(f"<{name}> is not allowed {where} (allowed: {allowed})", line=line)
        required, optional = _SPECS[name]
        missing = sorted(required - attrs.keys())
        if missing:
            raise XmlInputError(f"<{name}> lacks attribute {', '.join(missing)}", line=line)
        extra = sorted(attrs.keys() - required - optional)
        if extra:
            raise XmlInputError(f"<{name}> has unknown attribute {', '.join(extra)}", line=line)
        if name in (_SINGLE, _RANGE, "ref"):
            self._open_mapping = True  # an empty element: nothing may open inside it
            if name == "ref":
                self._flush()
                self.visitor.ref(attrs["name"], line)
            else:
                self._mapping(name, attrs, line)
            return
        self._stack.append(name)
        self._in_section = name in ("device", "def")
        if name == "superblock":
            self.sb = self._superblock(attrs, line)
            self.visitor.superblock(self.sb)
        elif name == "device":
            self.visitor.begin_device(self._device(attrs, line))
        else:
            self._flush()
            self.visitor.begin_def(attrs["name"], line)

    def _end(self, name: str) -> None:
        if self._open_mapping:
            self._open_mapping = False
            return
        self._stack.pop()
        if name in ("device", "def"):
            self._in_section = False
            self._flush()
            if name == "device":
                self.visitor.end_device(self.line)
            else:
                self.visitor.end_def(self.line)

    def _text(self, text: str) -> None:
        if not text.isspace():
            raise XmlInputError(
                f"unexpected text {text.strip()[:40]!r} inside <{self._stack[-1] or 'document'}>",
                line=self.line,
            )

    # -- attribute decoding ---------------------------------------------------------------

    @staticmethod
    def _uint(
        element: str,
        attrs: dict[str, str],
        key: str,
        line: int,
        *,
        maximum: int = U64_MAX,
        default: int | None = None,
    ) -> int:
        text = attrs.get(key)
        if text is None:
            assert default is not None
            return default
        if not _is_uint(text):
            raise XmlInputError(
                f"<{element}> attribute {key}={text!r} is not a non-negative integer", line=line
            )
        value = int(text)
        if value > maximum:
            raise XmlInputError(
                f"<{element}> attribute {key}={value} exceeds the limit {maximum}", line=line
            )
        return value

    def _superblock(self, attrs: dict[str, str], line: int) -> XmlSuperblock:
        u = self._uint
        # Mapping times are 24 bits and the kernel does not mask them, so the clock they are
        # taken from must stay below 2^24 too (section 4.3).
        time = u("superblock", attrs, "time", line, maximum=MAX_TIME)
        flags = u(
            "superblock", attrs, "flags", line, maximum=1, default=0
        )  # only NEEDS_CHECK exists
        version = u("superblock", attrs, "version", line, default=2)
        if version not in (1, 2):
            raise XmlInputError(f"<superblock> version {version} is not 1 or 2", line=line)
        dbs = u("superblock", attrs, "data_block_size", line, maximum=U32_MAX)
        if not (
            MIN_DATA_BLOCK_SECTORS <= dbs <= MAX_DATA_BLOCK_SECTORS
            and dbs % MIN_DATA_BLOCK_SECTORS == 0
        ):
            raise XmlInputError(
                f"data_block_size {dbs} sectors is not a multiple of 128 between "
                f"{MIN_DATA_BLOCK_SECTORS} and {MAX_DATA_BLOCK_SECTORS} (64 KiB .. 1 GiB)",
                line=line,
            )
        if "metadata_snap" in attrs:
            # thin_dump -m prints it; 0.9.0 restore copies it into held_root and produces
            # broken metadata, 1.x ignores it (section 9.1). Ignored here too, but checked.
            u("superblock", attrs, "metadata_snap", line)
        return XmlSuperblock(
            time=time,
            transaction=u("superblock", attrs, "transaction", line),
            flags=flags,
            version=version,
            data_block_size=dbs,
            nr_data_blocks=u(
                "superblock", attrs, "nr_data_blocks", line, maximum=MAX_DATA_BLOCK + 1
            ),
            line=line,
        )

    def _device(self, attrs: dict[str, str], line: int) -> XmlDevice:
        u = self._uint
        if "mapped_blocks" in attrs:
            # Checked but not used: the count written is that of the mappings (0.9.0 does so).
            u("device", attrs, "mapped_blocks", line)
        return XmlDevice(
            dev_id=u("device", attrs, "dev_id", line, maximum=MAX_DEV_ID),
            transaction=u("device", attrs, "transaction", line),
            creation_time=u("device", attrs, "creation_time", line, maximum=U32_MAX),
            snap_time=u("device", attrs, "snap_time", line, maximum=U32_MAX),
            line=line,
        )

    def _mapping(self, name: str, attrs: dict[str, str], line: int) -> None:
        u = self._uint
        if name == _SINGLE:
            v, d, n = (u(name, attrs, "origin_block", line), u(name, attrs, "data_block", line), 1)
        else:
            v, d, n = (
                u(name, attrs, "origin_begin", line),
                u(name, attrs, "data_begin", line),
                u(name, attrs, "length", line),
            )
        self._rows.append((v, d, n, u(name, attrs, "time", line), line))
        if len(self._rows) >= BATCH_RUNS:
            self._flush()

    # -- batches --------------------------------------------------------------------------

    def _flush(self) -> None:
        if not self._rows:
            return
        columns = list(zip(*self._rows, strict=True))
        self._rows = []
        lines = np.array(columns[4], dtype=np.int64)
        arrays = []
        for values, what in (
            (columns[0], "origin block"),
            (columns[1], "data block"),
            (columns[2], "length"),
            (columns[3], "time"),
        ):
            try:
                arrays.append(np.array(values, dtype=np.uint64))
            except OverflowError:
                bad = next(i for i, x in enumerate(values) if x > U64_MAX)
                raise XmlInputError(
                    f"{what} {values[bad]} does not fit in 64 bits", line=int(lines[bad])
                ) from None
        batch = RunBatch(arrays[0], arrays[1], arrays[2], arrays[3], lines)
        self._check(batch)
        self.visitor.runs(batch)

    def _check(self, b: RunBatch) -> None:
        assert self.sb is not None
        nr_data = self.sb.nr_data_blocks

        def fail(mask: npt.NDArray[np.bool_], message: str) -> None:
            if mask.any():
                i = int(np.argmax(mask))
                raise XmlInputError(
                    message.format(
                        v=int(b.vbegin[i]), d=int(b.dbegin[i]), n=int(b.length[i]), t=int(b.time[i])
                    ),
                    line=int(b.line[i]),
                )

        fail(b.length == 0, "range_mapping of length 0")
        fail(b.time > MAX_TIME, f"mapping time {{t}} does not fit in 24 bits (max {MAX_TIME})")
        fail(
            b.vbegin > np.uint64(U64_MAX) - (b.length - np.uint64(1)),
            "mapping of {n} blocks from origin block {v} runs past 2^64-1",
        )
        fail(
            b.dbegin > np.uint64(MAX_DATA_BLOCK) - (b.length - np.uint64(1)),
            f"data block {{d}} (run of {{n}}) is beyond the 40-bit limit {MAX_DATA_BLOCK}",
        )
        last = b.dbegin + (b.length - np.uint64(1))  # cannot wrap: checked just above
        fail(
            last >= np.uint64(nr_data),
            f"data block {{d}} (run of {{n}}) is beyond the data device (nr_data_blocks={nr_data})",
        )


def parse_thin_xml(chunks: Iterable[bytes], visitor: XmlVisitor) -> XmlSuperblock:
    """Parse a whole document, calling ``visitor``; returns the superblock attributes."""
    parser = ThinXmlParser(visitor)
    for chunk in chunks:
        parser.feed(chunk)
    parser.close()
    assert parser.sb is not None
    return parser.sb


class _HeadOnly:
    """A visitor that stops the parse as soon as the superblock element is known."""

    class StopParseError(Exception):
        pass

    def superblock(self, sb: XmlSuperblock) -> None:
        raise self.StopParseError

    def begin_def(self, name: str, line: int) -> None: ...
    def end_def(self, line: int) -> None: ...
    def begin_device(self, dev: XmlDevice) -> None: ...
    def end_device(self, line: int) -> None: ...
    def runs(self, batch: RunBatch) -> None: ...
    def ref(self, name: str, line: int) -> None: ...


def read_superblock_element(chunks: Iterable[bytes]) -> XmlSuperblock:
    """Only the ``<superblock>`` attributes (to size a new metadata file before restoring)."""
    parser = ThinXmlParser(_HeadOnly())
    try:
        for chunk in chunks:
            parser.feed(chunk)
        parser.close()
    except _HeadOnly.StopParseError:
        pass
    if parser.sb is None:
        raise XmlInputError("no <superblock> element", line=1)
    return parser.sb
