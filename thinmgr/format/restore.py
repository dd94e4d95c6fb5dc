"""Building dm-thin metadata from thin_dump XML (format sections 4-7, 9.1, 12).

A restore-style writer from scratch: blocks are allocated linearly (0 superblock, 1 metadata
index, 2 metadata ref-count root, 3.. metadata bitmaps, then everything else, section 6.7),
every tree is built bottom-up (``node_writer``), reference counts are exactly those of
section 5.1, and the superblock is written last because it is the commit point (section 8).

Devices are built while the XML streams past: a device's leaves are written as its mappings
arrive (a buffer of at most a few leaves is held back so that the last leaves can be
balanced), so memory follows the largest ``<def>`` and the number of distinct data blocks,
not the size of the XML.

``<def>``/``<ref>`` (thin-provisioning-tools 1.x): a def's leaves are built once and every
device that refs them points at the same leaf blocks. As in the 1.x builder, internal nodes
are never shared, and a shared leaf that would break the occupancy rule next to a device's
own mappings is copied into the device instead (unshared).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from thinmgr.errors import NoSpaceError
from thinmgr.format.checksum import seal
from thinmgr.format.constants import (
    BITMAP_CSUM_XOR,
    BLOCK_SIZE,
    DETAILS_VALUE_SIZE,
    ENTRIES_PER_BITMAP,
    INDEX_VALUE_SIZE,
    LEAF_NODE,
    MAPPING_VALUE_SIZE,
    MAX_METADATA_BLOCKS,
    REFCOUNT_VALUE_SIZE,
    THIN_VERSION,
    max_entries_for,
)
from thinmgr.format.node_writer import (
    NodeRef,
    build_btree,
    build_upper_levels,
    encode_node,
    node_sizes,
)
from thinmgr.format.spacemap import (
    IndexEntry,
    encode_bitmap,
    encode_metadata_index,
    nr_bitmaps,
)
from thinmgr.format.superblock import SpaceMapRoot, Superblock
from thinmgr.format.xmlparse import (
    RunBatch,
    XmlDevice,
    XmlInputError,
    XmlSuperblock,
    parse_thin_xml,
)

U64 = npt.NDArray[np.uint64]
WriteBlock = Callable[[int, bytes | bytearray], None]

LEAF_MAX = max_entries_for(MAPPING_VALUE_SIZE)  # 252
LEAF_MIN = LEAF_MAX // 3  # 84: thin_check's "too few entries" bound for non-root nodes
EXPAND_LIMIT = 1 << 20  # mappings expanded from runs at a time (bounds memory)
METADATA_INDEX_BLOCK = 1
METADATA_REFCOUNT_ROOT = 2
FIRST_METADATA_BITMAP = 3
_DETAILS_DTYPE = np.dtype([("mapped", "<u8"), ("trans", "<u8"), ("ctime", "<u4"), ("stime", "<u4")])
_INDEX_DTYPE = np.dtype([("blocknr", "<u8"), ("nr_free", "<u4"), ("none_free_before", "<u4")])
assert _DETAILS_DTYPE.itemsize == DETAILS_VALUE_SIZE
assert _INDEX_DTYPE.itemsize == INDEX_VALUE_SIZE


class MetadataTooSmallError(NoSpaceError):
    """The metadata does not fit the target; ``needed_blocks`` says how much would."""

    def __init__(self, needed_blocks: int, nr_blocks: int, line: int | None) -> None:
        where = f" (it ran out at line {line} of the XML)" if line is not None else ""
        super().__init__(
            f"the metadata needs at least {needed_blocks} blocks of 4 KiB "
            f"({_mib(needed_blocks)}) but the target holds {nr_blocks} ({_mib(nr_blocks)})"
            f"{where}",
            hint=f"Use a metadata device or file of at least {_mib(needed_blocks)}.",
        )
        self.needed_blocks = needed_blocks
        self.nr_blocks = nr_blocks


def _mib(blocks: int) -> str:
    return f"{-(-blocks * BLOCK_SIZE // (1 << 20))} MiB"


@dataclass(frozen=True)
class RestoreSummary:
    devices: int
    mappings: int
    metadata_blocks_used: int
    metadata_nr_blocks: int
    data_blocks_used: int
    nr_data_blocks: int
    held_root: int


class LinearAllocator:
    """Hands out blocks in order. Past the end it keeps counting ("dry run") so that the
    caller can say how large a target the XML needs; nothing is written then."""

    def __init__(self, nr_blocks: int, first: int) -> None:
        self.nr_blocks = nr_blocks
        self.next = first

    def allocate(self) -> int:
        block = self.next
        if block >= MAX_METADATA_BLOCKS:
            raise _NoMetadataFitsError
        self.next += 1
        return block

    @property
    def exhausted(self) -> bool:
        return self.next > self.nr_blocks


class _NoMetadataFitsError(Exception):
    """More blocks than any metadata device holds (section 6.4): give up at once."""


# -- data reference counts -----------------------------------------------------------------


class DataRefs:
    """Data block references (one per leaf entry, section 5.1), compacted as they grow."""

    COMPACT_AT = 1 << 23

    def __init__(self) -> None:
        self._pending: list[U64] = []
        self._pending_n = 0
        self.blocks: U64 = np.zeros(0, dtype=np.uint64)
        self.counts: npt.NDArray[np.int64] = np.zeros(0, dtype=np.int64)

    def add(self, data_blocks: U64) -> None:
        self._pending.append(data_blocks)
        self._pending_n += len(data_blocks)
        if self._pending_n >= self.COMPACT_AT:
            self.compact()

    def compact(self) -> None:
        if not self._pending:
            return
        new_blocks, new_counts = np.unique(np.concatenate(self._pending), return_counts=True)
        self._pending, self._pending_n = [], 0
        if len(self.blocks) == 0:
            self.blocks, self.counts = new_blocks, new_counts.astype(np.int64)
            return
        merged, inverse = np.unique(np.concatenate((self.blocks, new_blocks)), return_inverse=True)
        counts = np.zeros(len(merged), dtype=np.int64)
        np.add.at(counts, inverse, np.concatenate((self.counts, new_counts)))
        self.blocks, self.counts = merged, counts


# -- leaves of one device -------------------------------------------------------------------


@dataclass(eq=False)
class SharedLeaf:
    """A leaf of a ``<def>``: written once, on first use, then pointed at by every user."""

    keys: U64
    values: U64
    blocknr: int | None = None

    @property
    def count(self) -> int:
        return len(self.keys)


LeafItem = NodeRef | SharedLeaf


@dataclass
class DefSequence:
    leaves: list[SharedLeaf]
    first_key: int
    last_key: int
    mappings: int


def expand_runs(b: RunBatch) -> Iterator[tuple[U64, U64]]:
    """(keys, block_time values) of the mappings of ``b``, at most EXPAND_LIMIT at a time."""
    vbegin, dbegin, length, time = b.vbegin, b.dbegin, b.length, b.time
    limit = np.uint64(EXPAND_LIMIT)
    if bool((length > limit).any()):
        pieces = (length + limit - np.uint64(1)) // limit
        idx = np.repeat(np.arange(len(length)), pieces.astype(np.int64))
        within = np.arange(len(idx), dtype=np.uint64) - np.repeat(
            np.cumsum(pieces) - pieces, pieces.astype(np.int64)
        )
        offset = within * limit
        vbegin, dbegin = vbegin[idx] + offset, dbegin[idx] + offset
        length, time = np.minimum(length[idx] - offset, limit), time[idx]
    ends = np.cumsum(length)
    start = 0
    while start < len(length):
        base = int(ends[start - 1]) if start else 0
        stop = max(int(np.searchsorted(ends, base + EXPAND_LIMIT, side="right")), start + 1)
        n = length[start:stop].astype(np.int64)
        total = int(n.sum())
        first = np.cumsum(n) - n
        offset = (np.arange(total, dtype=np.int64) - np.repeat(first, n)).astype(np.uint64)
        keys = np.repeat(vbegin[start:stop], n) + offset
        data = np.repeat(dbegin[start:stop], n) + offset
        values = (data << np.uint64(24)) | np.repeat(time[start:stop], n)
        yield keys, values
        start = stop


class LeafStream:
    """Turns one device's mappings and shared leaves into a valid sequence of leaves.

    Own mappings are written as full leaves while more than two leaves' worth is buffered;
    what is left (at a ``<ref>`` or at the end) goes out as one or two balanced leaves, so
    no leaf of a multi-leaf tree holds fewer than LEAF_MIN entries (section 3.5).
    """

    def __init__(self, restorer: Restorer) -> None:
        self.r = restorer
        self.items: list[LeafItem] = []
        self._keys: list[U64] = []
        self._values: list[U64] = []
        self._buffered = 0
        self._alone: SharedLeaf | None = None  # a small shared leaf that may yet be the root
        self.mapped = 0

    def push_own(self, keys: U64, values: U64) -> None:
        self._take_alone()
        self._buffer(keys, values)
        self.mapped += len(keys)
        if self._buffered > 2 * LEAF_MAX:
            self._emit_full()

    def push_shared(self, leaves: list[SharedLeaf]) -> None:
        for leaf in leaves:
            self.mapped += leaf.count
            if leaf.count < LEAF_MIN:
                # Only a def with a single small leaf makes one: it can be shared only as the
                # device's whole tree (a root may be small), so wait and see.
                if not self.items and not self._buffered and self._alone is None:
                    self._alone = leaf
                else:
                    self._take_alone()
                    self._buffer(leaf.keys, leaf.values)
                continue
            self._take_alone()
            if 0 < self._buffered < LEAF_MIN:
                # Too few own mappings for a leaf of their own: copy this shared leaf in.
                self._buffer(leaf.keys, leaf.values)
                self._emit_all()
            else:
                self._emit_all()
                self.items.append(leaf)

    def finish(self) -> list[LeafItem]:
        if self._alone is not None and not self.items and not self._buffered:
            return [self._alone]
        self._take_alone()
        if 0 < self._buffered < LEAF_MIN and self.items:
            last = self.items.pop()
            # Full own leaves leave more than LEAF_MAX entries buffered, so the leaf before a
            # small remainder is always a shared one: unshare it to balance.
            assert isinstance(last, SharedLeaf)
            self._keys.insert(0, last.keys)
            self._values.insert(0, last.values)
            self._buffered += last.count
        self._emit_all()
        if not self.items:
            self.items.extend(
                self.r.write_leaves(np.zeros(0, np.uint64), np.zeros(0, np.uint64), [0])
            )
        return self.items

    def _take_alone(self) -> None:
        if self._alone is not None:
            leaf, self._alone = self._alone, None
            self._buffer(leaf.keys, leaf.values)

    def _buffer(self, keys: U64, values: U64) -> None:
        if len(keys):
            self._keys.append(keys)
            self._values.append(values)
            self._buffered += len(keys)

    def _take(self) -> tuple[U64, U64]:
        keys = np.concatenate(self._keys) if len(self._keys) != 1 else self._keys[0]
        values = np.concatenate(self._values) if len(self._values) != 1 else self._values[0]
        self._keys, self._values, self._buffered = [], [], 0
        return keys, values

    def _emit_full(self) -> None:
        keys, values = self._take()
        full = -(-(len(keys) - 2 * LEAF_MAX) // LEAF_MAX)
        cut = full * LEAF_MAX
        self.items.extend(self.r.write_leaves(keys[:cut], values[:cut], [LEAF_MAX] * full))
        self._buffer(keys[cut:], values[cut:])

    def _emit_all(self) -> None:
        if not self._buffered:
            return
        keys, values = self._take()
        self.items.extend(self.r.write_leaves(keys, values, node_sizes(len(keys), LEAF_MAX)))


@dataclass
class _Section:
    kind: str  # "device" or "def"
    line: int
    last_key: int | None = None
    stream: LeafStream | None = None
    device: XmlDevice | None = None
    name: str = ""
    def_keys: list[U64] = field(default_factory=list)
    def_values: list[U64] = field(default_factory=list)


@dataclass(frozen=True)
class _BuiltDevice:
    device: XmlDevice
    root: int
    mapped: int


class Restorer:
    """The XmlVisitor that writes metadata as the XML streams past."""

    def __init__(
        self, nr_blocks: int, write_block: WriteBlock, *, hold_snapshot: bool = False
    ) -> None:
        # Only the first 4161600 blocks can be described by the metadata space map (6.4).
        self.nr_blocks = min(nr_blocks, MAX_METADATA_BLOCKS)
        self._write_block = write_block
        self.hold_snapshot = hold_snapshot
        self.nr_meta_bitmaps = nr_bitmaps(self.nr_blocks)
        self.alloc = LinearAllocator(self.nr_blocks, FIRST_METADATA_BITMAP + self.nr_meta_bitmaps)
        self.meta_counts = np.zeros(self.nr_blocks, dtype=np.uint32)
        self.data_refs = DataRefs()
        self.defs: dict[str, DefSequence] = {}
        self.devices: dict[int, _BuiltDevice] = {}
        self.section: _Section | None = None
        self.sb: XmlSuperblock | None = None
        self.current_line: int | None = None
        self.mappings = 0

    # -- blocks ---------------------------------------------------------------------------

    def write(self, blocknr: int, block: bytes | bytearray) -> None:
        if not self.alloc.exhausted:
            self._write_block(blocknr, block)

    def reference(self, blocknr: int) -> None:
        """One more reference to a metadata block (section 5.1)."""
        if blocknr < self.nr_blocks:
            self.meta_counts[blocknr] += 1

    def write_leaves(self, keys: U64, values: U64, sizes: list[int]) -> list[NodeRef]:
        """Own (unshared) mapping leaves: their data blocks count once each."""
        refs = []
        start = 0
        raw = values.astype("<u8", copy=False).data.cast("B")
        for size in sizes:
            blocknr = self.alloc.allocate()
            end = start + size
            if not self.alloc.exhausted:
                self._write_block(
                    blocknr,
                    encode_node(blocknr, LEAF_NODE, keys[start:end], raw[start * 8 : end * 8], 8),
                )
            refs.append(NodeRef(int(keys[start]) if size else 0, blocknr))
            start = end
        if len(values):
            self.data_refs.add(values >> np.uint64(24))
        return refs

    # -- XmlVisitor -----------------------------------------------------------------------

    def superblock(self, sb: XmlSuperblock) -> None:
        self.sb = sb
        data_bitmaps = nr_bitmaps(sb.nr_data_blocks)
        if data_bitmaps + FIRST_METADATA_BITMAP > MAX_METADATA_BLOCKS:
            raise XmlInputError(
                f"nr_data_blocks={sb.nr_data_blocks} needs {data_bitmaps} space-map bitmaps, "
                f"more than a metadata device can hold ({MAX_METADATA_BLOCKS} blocks)",
                line=sb.line,
            )

    def begin_def(self, name: str, line: int) -> None:
        if name in self.defs:
            raise XmlInputError(f"<def name={name!r}> is defined twice", line=line)
        self.section = _Section("def", line, name=name)

    def end_def(self, line: int) -> None:
        s = self._current()
        keys = np.concatenate(s.def_keys) if s.def_keys else np.zeros(0, np.uint64)
        values = np.concatenate(s.def_values) if s.def_values else np.zeros(0, np.uint64)
        leaves = []
        start = 0
        for size in node_sizes(len(keys), LEAF_MAX) if len(keys) else []:
            leaves.append(SharedLeaf(keys[start : start + size], values[start : start + size]))
            start += size
        first = int(keys[0]) if len(keys) else 0
        last = int(keys[-1]) if len(keys) else 0
        self.defs[s.name] = DefSequence(leaves, first, last, len(keys))
        self.section = None

    def begin_device(self, dev: XmlDevice) -> None:
        if dev.dev_id in self.devices:
            raise XmlInputError(
                f"device {dev.dev_id} appears twice (first at line "
                f"{self.devices[dev.dev_id].device.line})",
                line=dev.line,
            )
        self.section = _Section("device", dev.line, stream=LeafStream(self), device=dev)

    def end_device(self, line: int) -> None:
        s = self._current()
        assert s.stream is not None and s.device is not None
        self.current_line = line
        items = s.stream.finish()
        children = [self._use_leaf(item) for item in items]
        root, internal = build_upper_levels(children, self.alloc, self.write)
        # Every node has one parent; the root's "parent" is its top-level mapping entry.
        for blocknr in internal:
            self.reference(blocknr)
        self.devices[s.device.dev_id] = _BuiltDevice(s.device, root, s.stream.mapped)
        self.mappings += s.stream.mapped
        self.section = None

    def runs(self, batch: RunBatch) -> None:
        s = self._current()
        self._check_order(s, batch)
        for keys, values in expand_runs(batch):
            if s.stream is not None:
                self.current_line = int(batch.line[-1])
                s.stream.push_own(keys, values)
            else:
                s.def_keys.append(keys)
                s.def_values.append(values)

    def ref(self, name: str, line: int) -> None:
        s = self._current()
        assert s.stream is not None
        seq = self.defs.get(name)
        if seq is None:
            raise XmlInputError(f"<ref name={name!r}> names no <def> seen before it", line=line)
        if not seq.mappings:
            return
        if s.last_key is not None and seq.first_key <= s.last_key:
            raise XmlInputError(
                f"<ref name={name!r}> starts at origin block {seq.first_key}, which does not "
                f"follow the previous mapping (ending at {s.last_key})",
                line=line,
            )
        s.last_key = seq.last_key
        self.current_line = line
        s.stream.push_shared(seq.leaves)

    # -- helpers --------------------------------------------------------------------------

    def _current(self) -> _Section:
        assert self.section is not None
        return self.section

    @staticmethod
    def _check_order(s: _Section, b: RunBatch) -> None:
        vend = b.vbegin + (b.length - np.uint64(1))
        bad = b.vbegin[1:] <= vend[:-1]
        first_bad = s.last_key is not None and int(b.vbegin[0]) <= s.last_key
        if first_bad or bool(bad.any()):
            i = 0 if first_bad else int(np.argmax(bad)) + 1
            previous = s.last_key if i == 0 else int(vend[i - 1])
            raise XmlInputError(
                f"mapping at origin block {int(b.vbegin[i])} is out of order or overlaps the "
                f"previous mapping of this {s.kind} (which ends at origin block {previous})",
                line=int(b.line[i]),
            )
        s.last_key = int(vend[-1])

    def _use_leaf(self, item: LeafItem) -> NodeRef:
        if isinstance(item, NodeRef):
            self.reference(item.blocknr)  # from its parent, or from the top-level tree
            return item
        if item.blocknr is None:
            # First use of a shared leaf: write it, and count its data blocks once.
            item.blocknr = self.alloc.allocate()
            self.write(
                item.blocknr,
                encode_node(
                    item.blocknr,
                    LEAF_NODE,
                    item.keys,
                    item.values.astype("<u8", copy=False).data.cast("B"),
                    8,
                ),
            )
            self.data_refs.add(item.values >> np.uint64(24))
        self.reference(item.blocknr)
        return NodeRef(int(item.keys[0]), item.blocknr)

    # -- the rest of the metadata, once the XML is read -----------------------------------

    def finish(self) -> RestoreSummary:
        sb = self.sb
        assert sb is not None
        ids = np.array(sorted(self.devices), dtype=np.uint64)
        built = [self.devices[int(i)] for i in ids]
        details = np.zeros(len(built), dtype=_DETAILS_DTYPE)
        details["mapped"] = [b.mapped for b in built]  # as 0.9.0: the mappings written
        details["trans"] = [b.device.transaction for b in built]
        details["ctime"] = [b.device.creation_time for b in built]
        details["stime"] = [b.device.snap_time for b in built]
        details_root = self._tree(ids, details, DETAILS_VALUE_SIZE)
        roots = np.array([b.root for b in built], dtype="<u8")
        mapping_root = self._tree(ids, roots, MAPPING_VALUE_SIZE)
        data_sm = self._data_space_map(sb.nr_data_blocks)
        held_root = 0
        if self.hold_snapshot:
            # reserve_metadata_snap (section 7.1): a copy of the superblock, and one more
            # reference to each tree root it shares with the live superblock.
            held_root = self.alloc.allocate()
            self.reference(held_root)
            self.reference(details_root)
            self.reference(mapping_root)
        live = Superblock(
            flags=sb.flags,
            version=THIN_VERSION,
            time=sb.time,
            trans_id=sb.transaction,
            held_root=held_root,
            data_mapping_root=mapping_root,
            device_details_root=details_root,
            data_block_size=sb.data_block_size,
            metadata_nr_blocks=self.nr_blocks,
            data_sm=data_sm,
        )
        if held_root:
            self.write(held_root, live.snapshot_copy(held_root).pack())
        metadata_sm = self._metadata_space_map()
        live = replace(live, metadata_sm=metadata_sm)
        self._write_block(0, live.pack())  # last: the commit point (section 8)
        return RestoreSummary(
            devices=len(built),
            mappings=self.mappings,
            metadata_blocks_used=metadata_sm.nr_allocated,
            metadata_nr_blocks=self.nr_blocks,
            data_blocks_used=data_sm.nr_allocated,
            nr_data_blocks=sb.nr_data_blocks,
            held_root=held_root,
        )

    def _tree(
        self,
        keys: U64,
        values: npt.NDArray[np.generic],
        value_size: int,
        root_block: int | None = None,
    ) -> int:
        tree = build_btree(keys, values, value_size, self.alloc, self.write, root_block=root_block)
        for blocknr in tree.nodes:
            self.reference(blocknr)
        return tree.root

    def _data_space_map(self, nr_data_blocks: int) -> SpaceMapRoot:
        refs = self.data_refs
        refs.compact()
        count = nr_bitmaps(nr_data_blocks)
        bounds = np.searchsorted(
            refs.blocks, np.arange(count + 1, dtype=np.uint64) * np.uint64(ENTRIES_PER_BITMAP)
        )
        entries = np.zeros(count, dtype=_INDEX_DTYPE)
        zero = bytearray(BLOCK_SIZE)
        for i in range(count):
            blocknr = self.alloc.allocate()
            self.reference(blocknr)  # from its index entry
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            entries[i] = (blocknr, ENTRIES_PER_BITMAP - (hi - lo), 0)
            if self.alloc.exhausted:
                continue
            if lo == hi:
                block = bytearray(zero)
                block[8:16] = blocknr.to_bytes(8, "little")
                seal(block, BITMAP_CSUM_XOR)
            else:
                counts = np.zeros(ENTRIES_PER_BITMAP, dtype=np.uint8)
                offsets = (refs.blocks[lo:hi] - np.uint64(i * ENTRIES_PER_BITMAP)).astype(np.int64)
                counts[offsets] = np.minimum(refs.counts[lo:hi], 3)
                entries["none_free_before"][i] = _first_free(counts)
                block = encode_bitmap(counts, blocknr)
            self._write_block(blocknr, block)
        index_root = self._tree(np.arange(count, dtype=np.uint64), entries, INDEX_VALUE_SIZE)
        over = refs.counts > 2
        if bool((refs.counts > 0xFFFFFFFF).any()):
            raise XmlInputError("a data block has more than 2^32-1 references")
        overflow_root = self._tree(
            refs.blocks[over], refs.counts[over].astype("<u4"), REFCOUNT_VALUE_SIZE
        )
        return SpaceMapRoot(
            nr_blocks=nr_data_blocks,
            nr_allocated=len(refs.blocks),
            bitmap_root=index_root,
            ref_count_root=overflow_root,
        )

    def _metadata_space_map(self) -> SpaceMapRoot:
        for blocknr in range(FIRST_METADATA_BITMAP, FIRST_METADATA_BITMAP + self.nr_meta_bitmaps):
            self.reference(blocknr)  # each bitmap, from its index entry
        self.reference(0)  # the superblock
        self.reference(METADATA_INDEX_BLOCK)  # from the superblock's sm root
        counts = self.meta_counts
        over = np.flatnonzero(counts > 2).astype(np.uint64)
        # The ref-count tree's own nodes have one reference each, never more than 2, so
        # they do not change the set of overflowing blocks they describe.
        self._tree(
            over,
            counts[over.astype(np.int64)].astype("<u4"),
            REFCOUNT_VALUE_SIZE,
            root_block=METADATA_REFCOUNT_ROOT,
        )
        if self.alloc.exhausted or self.nr_blocks <= FIRST_METADATA_BITMAP:
            raise MetadataTooSmallError(self._needed_blocks(), self.nr_blocks, self.current_line)
        entries = []
        for i in range(self.nr_meta_bitmaps):
            chunk = counts[i * ENTRIES_PER_BITMAP : (i + 1) * ENTRIES_PER_BITMAP]
            blocknr = FIRST_METADATA_BITMAP + i
            self._write_block(blocknr, encode_bitmap(chunk, blocknr))
            # nr_free counts against the full 16320 entries, as the kernel does (6.3).
            used = int(np.count_nonzero(chunk))
            entries.append(IndexEntry(blocknr, ENTRIES_PER_BITMAP - used, _first_free(chunk)))
        self._write_block(
            METADATA_INDEX_BLOCK, encode_metadata_index(entries, METADATA_INDEX_BLOCK)
        )
        return SpaceMapRoot(
            nr_blocks=self.nr_blocks,
            nr_allocated=int(np.count_nonzero(counts)),
            bitmap_root=METADATA_INDEX_BLOCK,
            ref_count_root=METADATA_REFCOUNT_ROOT,
        )

    def _needed_blocks(self) -> int:
        # Blocks used besides the metadata bitmaps, plus the bitmaps a device of n blocks
        # needs; the smallest n that holds both.
        others = self.alloc.next - self.nr_meta_bitmaps + 1  # +1: slack for the rc tree
        needed = others
        while needed < others + nr_bitmaps(needed):
            needed = others + nr_bitmaps(needed)
        return needed


def _first_free(counts: npt.NDArray[np.integer]) -> int:
    """none_free_before: every entry below it is in use (section 6.3)."""
    free = np.flatnonzero(counts == 0)
    return int(free[0]) if len(free) else ENTRIES_PER_BITMAP


def restore(
    chunks: Iterable[bytes], nr_blocks: int, write_block: WriteBlock, *, hold_snapshot: bool = False
) -> RestoreSummary:
    """Build the metadata an XML dump describes on a device of ``nr_blocks`` 4 KiB blocks.

    ``write_block(blocknr, data)`` receives every block once, the superblock last. Invalid
    XML raises ``XmlInputError`` naming the line; too small a device raises
    ``MetadataTooSmallError`` (nothing more is written once it is known not to fit, and the
    superblock never is).
    """
    restorer = Restorer(nr_blocks, write_block, hold_snapshot=hold_snapshot)
    try:
        parse_thin_xml(chunks, restorer)
    except _NoMetadataFitsError:
        raise XmlInputError(
            f"the XML describes more metadata than any metadata device can hold "
            f"({MAX_METADATA_BLOCKS} blocks)",
            line=restorer.current_line,
        ) from None
    try:
        return restorer.finish()
    except _NoMetadataFitsError:
        raise XmlInputError(
            f"the XML describes more metadata than any metadata device can hold "
            f"({MAX_METADATA_BLOCKS} blocks)"
        ) from None


def restore_to_image(xml: str | bytes, nr_blocks: int, *, hold_snapshot: bool = False) -> bytearray:
    """A whole metadata image in memory (for tests and small tools)."""
    image = bytearray(nr_blocks * BLOCK_SIZE)

    def write_block(blocknr: int, data: bytes | bytearray) -> None:
        image[blocknr * BLOCK_SIZE : (blocknr + 1) * BLOCK_SIZE] = data

    raw = xml.encode() if isinstance(xml, str) else xml
    restore([raw], nr_blocks, write_block, hold_snapshot=hold_snapshot)
    return image
