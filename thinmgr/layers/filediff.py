"""Which files differ between two mounted ext4 trees, given the device byte ranges that differ.

The two trees are the same file system at two moments (a volume and its snapshot), so a
byte range the block diff calls unchanged holds the same bytes on both devices. A path is
looked at closely (a *candidate*) only when something it depends on lies in a changed range:

* its inode: every change made through the kernel rewrites the inode (POSIX updates ctime on
  any change of data or status), so its inode-table slot (``Ext4Layout.inode_ranges``) changed;
* its data or directory blocks, from FIEMAP of the path in the newer tree (an in-place
  overwrite rewrites data blocks; this does not rely on ctime at all);
* its directory entry: a directory that is itself a candidate is listed in both trees and
  compared by name and inode number, which finds added, removed and renamed paths.

Everything else is identical in both trees without being looked at: same directory entry,
same on-disk inode (attributes, extent root, in-inode xattrs), same data blocks. The newer
tree is walked with ``os.scandir`` (names, inode numbers and types from the directory blocks,
no stat); candidates get ``lstat`` and xattrs on both sides; a candidate regular file of equal
size on both sides has its contents compared only over the logical ranges where the two
files' extents are not the same unchanged device bytes, so contents of unchanged files are
never read (``FileDiffStats.files_read`` counts the files whose contents were opened).

Kinds, per path (sorted by path; "/" is the root):
* ``added`` / ``removed``: the path exists on one side only (every path under a removed or
  added directory is listed too);
* ``type-changed``: file type differs (e.g. a file replaced by a symlink);
* ``modified``: a regular file's contents or a symlink's target differ;
* ``metadata``: only attributes differ: permission bits, owner, group, mtime (ns), link
  count, device number, a directory's size, or xattrs. atime and ctime are not compared
  (reading changes atime; ctime changes on every change and cannot be restored).
"""

from __future__ import annotations

import bisect
import errno
import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from thinmgr.errors import ThinmgrError
from thinmgr.kernel.fiemap import (
    FIEMAP_EXTENT_DATA_INLINE,
    Extent,
    fiemap_path,
)
from thinmgr.layers.ext4_layout import Ext4Layout

READ_CHUNK = 1 << 20


class IntervalSet:
    """Disjoint half-open integer intervals, sorted; overlap tests by bisection."""

    def __init__(self, intervals: list[tuple[int, int]]) -> None:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(i for i in intervals if i[0] < i[1]):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        self.intervals = merged
        self._starts = [lo for lo, _ in merged]

    def __len__(self) -> int:
        return len(self.intervals)

    def total(self) -> int:
        return sum(hi - lo for lo, hi in self.intervals)

    def overlaps(self, lo: int, hi: int) -> bool:
        """Whether [lo, hi) meets any interval."""
        i = bisect.bisect_right(self._starts, lo) - 1
        if i >= 0 and self.intervals[i][1] > lo:
            return True
        return i + 1 < len(self.intervals) and self.intervals[i + 1][0] < hi

    def __contains__(self, value: int) -> bool:
        return self.overlaps(value, value + 1)

    def clip(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The parts of [lo, hi) inside the intervals."""
        i = max(bisect.bisect_right(self._starts, lo) - 1, 0)
        out = []
        while i < len(self.intervals) and self.intervals[i][0] < hi:
            a, b = max(lo, self.intervals[i][0]), min(hi, self.intervals[i][1])
            if a < b:
                out.append((a, b))
            i += 1
        return out


class ChangeKind(StrEnum):
    added = "added"
    removed = "removed"
    modified = "modified"
    metadata = "metadata"
    type_changed = "type-changed"


@dataclass(frozen=True)
class FileChange:
    kind: ChangeKind
    path: str  # "/"-separated from the file system's root, starting with "/"
    size_before: int | None  # st_size in the older tree (None: absent)
    size_after: int | None

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind.value,
            "path": self.path,
            "size_before": self.size_before,
            "size_after": self.size_after,
        }


@dataclass
class FileDiffStats:
    entries: int = 0  # directory entries walked in the newer tree
    changed_inodes: int = 0  # inode slots lying in changed byte ranges
    extent_maps: int = 0  # FIEMAP calls
    candidates: int = 0  # paths compared with the older tree (lstat, xattrs)
    dirs_relisted: int = 0  # directories listed in both trees
    files_read: int = 0  # regular files whose contents were read (pairs: older and newer)
    bytes_read: int = 0  # content bytes read, both sides together
    decided_by_extents: int = 0  # equal-size candidate files found identical without a read

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class FileDiff:
    changes: list[FileChange]
    stats: FileDiffStats = field(default_factory=FileDiffStats)


def changed_inodes(layouts: list[Ext4Layout], changed: IntervalSet) -> IntervalSet:
    """Inode numbers whose on-disk inode overlaps a changed byte range (on either side)."""
    ranges: list[tuple[int, int]] = []
    for layout in layouts:
        for lo, hi in changed.intervals:
            ranges.extend(layout.inode_ranges(lo, hi))
    return IntervalSet(ranges)


def _join(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
        return {n: os.getxattr(path, n, follow_symlinks=False) for n in sorted(names)}
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENODATA):
            return {}
        raise


def _attributes(st: os.stat_result) -> tuple[int, ...]:
    size = st.st_size if stat.S_ISDIR(st.st_mode) else 0  # a file's size is its contents
    return (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_nlink, st.st_rdev, size)


@dataclass(frozen=True)
class _Segment:
    """What a file holds over a logical range: zeros, device bytes from ``physical``, or
    bytes whose place on the device FIEMAP does not give (inline, unknown, encoded)."""

    kind: str  # "zeros", "device", "opaque"
    physical: int = 0


def _segments(extents: list[Extent], size: int) -> list[tuple[int, int, _Segment]]:
    """(start, end, what) covering [0, size) without gaps, from a file's extents."""
    out: list[tuple[int, int, _Segment]] = []
    pos = 0
    for e in extents:
        lo, hi = max(e.logical, pos), min(e.logical + e.length, size)
        if lo >= hi:
            continue
        if lo > pos:
            out.append((pos, lo, _Segment("zeros")))
        if e.unwritten:
            seg = _Segment("zeros")  # allocated, never written: reads as zeros
        elif e.on_device:
            seg = _Segment("device", e.physical + (lo - e.logical))
        else:
            seg = _Segment("opaque")
        out.append((lo, hi, seg))
        pos = hi
    if pos < size:
        out.append((pos, size, _Segment("zeros")))
    return out


def ranges_to_compare(
    before: list[Extent], after: list[Extent], size: int, changed: IntervalSet
) -> list[tuple[int, int]]:
    """Logical ranges of two equal-size files whose bytes cannot be shown equal from the
    extents: equal where both are holes, or both map the same device bytes and those bytes
    lie outside every changed range (then both devices hold them, unchanged)."""
    a, b = _segments(before, size), _segments(after, size)
    cuts = sorted({0, size, *(s for s, _, _ in a), *(s for s, _, _ in b)})
    out: list[tuple[int, int]] = []
    ia = ib = 0
    for lo, hi in itertools.pairwise(cuts):
        while a[ia][1] <= lo:
            ia += 1
        while b[ib][1] <= lo:
            ib += 1
        sa, sb = a[ia][2], b[ib][2]
        if sa.kind == sb.kind == "zeros":
            continue
        pending = [(lo, hi)]
        if sa.kind == sb.kind == "device":
            pa = sa.physical + (lo - a[ia][0])
            pb = sb.physical + (lo - b[ib][0])
            if pa == pb:  # the same device bytes: only those in changed ranges may differ
                pending = [(lo + c - pb, lo + d - pb) for c, d in changed.clip(pb, pb + hi - lo)]
        for start, end in pending:
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
    return out


class TreeDiff:
    """One comparison of ``older`` and ``newer`` (two mount points of one ext4 lineage)."""

    def __init__(
        self,
        older: str,
        newer: str,
        changed: IntervalSet,
        layouts: list[Ext4Layout],
        *,
        sync: bool = False,
    ) -> None:
        self.older, self.newer = older, newer
        self.changed = changed
        self.inodes = changed_inodes(layouts, changed)
        self.sync = sync  # FIEMAP_FLAG_SYNC: needed on a live (writable) mount only
        self.stats = FileDiffStats(changed_inodes=self.inodes.total())
        self.changes: list[FileChange] = []
        self._content_cache: dict[tuple[int, int], bool] = {}
        self._newer_extents: dict[str, list[Extent]] = {}  # from the walk, reused to compare

    # -- the walk ---------------------------------------------------------------------------

    def run(self) -> FileDiff:
        root_b = os.lstat(self.newer)
        root_changed = root_b.st_ino in self.inodes or self._data_changed("")
        self.stats.entries += 1
        if root_changed:
            self._compare("/", root_b)
        self._walk("/", root_changed, added=False)
        self.changes.sort(key=lambda c: c.path)
        return FileDiff(self.changes, self.stats)

    def _walk(self, top: str, top_changed: bool, *, added: bool) -> None:
        """Depth-first over the newer tree; ``added``: ``top`` has no directory in the older."""
        stack = [(top, top_changed, added)]
        while stack:
            path, dir_changed, dir_added = stack.pop()
            entries = self._list(self.newer + path)
            older = {}
            if dir_changed and not dir_added:
                self.stats.dirs_relisted += 1
                older = self._list(self.older + path)
                for name in sorted(older.keys() - entries.keys()):
                    self._removed(_join(path, name))
            for name, (ino, kind) in sorted(entries.items()):
                child = _join(path, name)
                self.stats.entries += 1
                candidate = (
                    dir_added
                    or ino in self.inodes
                    or (dir_changed and older.get(name, (None, ""))[0] != ino)
                    or (kind != "o" and self._data_changed(child))
                )
                child_added = dir_added
                if candidate:
                    child_added = self._compare(child, os.lstat(self.newer + child), dir_added)
                self._newer_extents.pop(child, None)
                if kind == "d":
                    stack.append((child, candidate, child_added))

    def _list(self, directory: str) -> dict[str, tuple[int, str]]:
        """name -> (inode number, "d" directory / "f" regular file / "o" other), from the
        directory entries alone (d_ino, d_type: ext4's filetype feature), without a stat."""
        with os.scandir(directory) as it:
            return {e.name: (e.inode(), _entry_kind(e)) for e in it}

    def _data_changed(self, path: str) -> bool:
        """Whether the data (or directory) blocks of a newer-tree path meet a changed range.

        Called for regular files and directories only; symlinks, devices, fifos and sockets
        hold nothing outside their inode (a long symlink's target block is written once, when
        the inode is created, so a new target means a new inode).
        """
        self.stats.extent_maps += 1
        extents = self._newer_extents[path] = fiemap_path(self.newer + path, sync=self.sync)
        for e in extents:
            if not e.on_device and not e.flags & FIEMAP_EXTENT_DATA_INLINE:
                return True  # delayed, unknown or encoded: cannot tell, so look closely
            if self.changed.overlaps(e.physical, e.physical + max(e.length, 1)):
                return True
        return False

    # -- comparing one path -----------------------------------------------------------------

    def _compare(self, path: str, b: os.stat_result, parent_added: bool = False) -> bool:
        """Record how ``path`` changed; True when the older tree has no directory there."""
        self.stats.candidates += 1
        a = None if parent_added else _lstat(self.older + path)
        if a is None:
            self.changes.append(FileChange(ChangeKind.added, path, None, b.st_size))
            return True
        kind = self._kind(path, a, b)
        if kind is not None:
            self.changes.append(FileChange(kind, path, a.st_size, b.st_size))
        if kind is ChangeKind.type_changed:
            if stat.S_ISDIR(a.st_mode):
                self._removed_below(path)
            return True
        return False

    def _kind(self, path: str, a: os.stat_result, b: os.stat_result) -> ChangeKind | None:
        if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
            return ChangeKind.type_changed
        if stat.S_ISREG(b.st_mode) and not self._same_content(path, a, b):
            return ChangeKind.modified
        if stat.S_ISLNK(b.st_mode) and os.readlink(self.older + path) != os.readlink(
            self.newer + path
        ):
            return ChangeKind.modified
        if _attributes(a) != _attributes(b):
            return ChangeKind.metadata
        if _xattrs(self.older + path) != _xattrs(self.newer + path):
            return ChangeKind.metadata
        return None

    def _same_content(self, path: str, a: os.stat_result, b: os.stat_result) -> bool:
        if a.st_size != b.st_size:
            return False  # decided from the inodes alone
        key = (a.st_ino, b.st_ino)  # hard links: one comparison per pair of inodes
        if key not in self._content_cache:
            self._content_cache[key] = self._compare_contents(path, b.st_size)
        return self._content_cache[key]

    def _compare_contents(self, path: str, size: int) -> bool:
        self.stats.extent_maps += 1
        before = fiemap_path(self.older + path)
        after = self._newer_extents.pop(path, None)
        if after is None:
            self.stats.extent_maps += 1
            after = fiemap_path(self.newer + path, sync=self.sync)
        ranges = ranges_to_compare(before, after, size, self.changed)
        if not ranges:
            self.stats.decided_by_extents += 1
            return True
        return self._read_compare(path, ranges)

    def _read_compare(self, path: str, ranges: list[tuple[int, int]]) -> bool:
        """The only place file contents are read: both sides, over ``ranges`` only."""
        self.stats.files_read += 1
        fds = [_open_contents(root + path) for root in (self.older, self.newer)]
        try:
            for lo, hi in ranges:
                for offset in range(lo, hi, READ_CHUNK):
                    length = min(READ_CHUNK, hi - offset)
                    left = os.pread(fds[0], length, offset)
                    right = os.pread(fds[1], length, offset)
                    self.stats.bytes_read += len(left) + len(right)
                    if left != right:
                        return False
            return True
        finally:
            for fd in fds:
                os.close(fd)

    # -- removed paths ----------------------------------------------------------------------

    def _removed(self, path: str) -> None:
        a = os.lstat(self.older + path)
        self.changes.append(FileChange(ChangeKind.removed, path, a.st_size, None))
        if stat.S_ISDIR(a.st_mode):
            self._removed_below(path)

    def _removed_below(self, top: str) -> None:
        for path, st in _walk_with_stat(self.older, top):
            self.changes.append(FileChange(ChangeKind.removed, path, st.st_size, None))


def _entry_kind(entry: os.DirEntry[str]) -> str:
    if entry.is_dir(follow_symlinks=False):
        return "d"
    return "f" if entry.is_file(follow_symlinks=False) else "o"


def _open_contents(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ThinmgrError(f"cannot open {path} to compare its contents: {exc.strerror}") from exc


def _walk_with_stat(root: str, top: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every path below ``top`` (not ``top`` itself) in the tree at ``root``, with lstat."""
    stack = [top]
    while stack:
        path = stack.pop()
        with os.scandir(root + path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            child = _join(path, entry.name)
            st = entry.stat(follow_symlinks=False)
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)


def diff_trees(
    older: str,
    newer: str,
    changed: IntervalSet,
    layouts: list[Ext4Layout],
    *,
    sync: bool = False,
) -> FileDiff:
    """The changed paths between two mounted trees of one ext4 lineage (module docstring)."""
    return TreeDiff(older, newer, changed, layouts, sync=sync).run()
