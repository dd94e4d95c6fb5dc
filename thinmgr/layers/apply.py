"""The confined layer applier: one image layer applied onto a mounted file tree.

The layer is applied in a forked child that ``chroot()``s into the tree first, so whatever a
hostile layer's names and links say, every path the kernel resolves stays inside the tree
(moby's *chrootarchive* idea; runtime-and-images.md 4.3 and 5). Two traps of that design are
avoided: the blob and its decompressors are opened before the chroot (the blob's path is not
reachable after it), and every module the child needs is imported at the top of this module
(tarfile's lazy ``import gzip`` fails after the chroot).

Headers are checked by ``EntryChecker`` (no ``..``, no NUL, bounded names) before the child
acts on them, and checked again here as a second line of defence. The layer is applied in one
streaming pass with OCI layer.md semantics:

- ``dir/.wh.name`` removes ``name`` unless this layer itself made it (whiteouts hide lower
  layers only);
- ``dir/.wh..wh..opq`` removes every child of ``dir`` this layer did not make, so the result is
  the same wherever the marker sits in the tar;
- over an existing path, a directory onto a directory keeps it and updates its attributes;
  anything else is unlinked (a directory removed without following symlinks) and recreated;
- owners are numeric (``lchown``) and set before the mode, so setuid bits survive; xattrs come
  from PAX ``SCHILY.xattr.*`` and are set after the owner (chown clears file capabilities);
  directory mtimes are set last, since creating their children changes them.

The child reports its result over a pipe as JSON; the parent turns it into the right
``ThinmgrError``.
"""

from __future__ import annotations

# Imported for the child: after chroot() nothing can be imported any more (trap 1 of 4.3).
import bz2  # noqa: F401
import errno
import grp  # noqa: F401
import gzip  # noqa: F401
import json
import lzma  # noqa: F401
import os
import pwd  # noqa: F401
import shutil
import stat
import sys
import tarfile
import time
import zlib  # noqa: F401
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import zstandard  # noqa: F401

from thinmgr.errors import (
    CorruptImageError,
    InternalError,
    IOFailure,
    NoSpaceError,
    NotFoundError,
    PermissionDenied,
    ThinmgrError,
    UnsupportedError,
    UsageError,
)
from thinmgr.layers.image_source import (
    EntryKind,
    ImageSource,
    LayerEntry,
    LayerReader,
    LayerScan,
)

# Errors the child may report, by class name (anything else comes back as IOFailure).
_REPORTABLE: dict[str, type[ThinmgrError]] = {
    cls.__name__: cls
    for cls in (
        CorruptImageError,
        NoSpaceError,
        IOFailure,
        UnsupportedError,
        UsageError,
        NotFoundError,
        PermissionDenied,
        InternalError,
    )
}
_NOT_SUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP)


@dataclass(frozen=True)
class ApplyStats:
    entries: int
    content_bytes: int
    whiteouts: int
    seconds: float


def apply_layer(source: ImageSource, index: int, root: Path) -> ApplyStats:
    """Applies layer ``index`` of ``source`` onto the tree mounted at ``root``.

    The caller mounted the layer's snapshot at ``root`` and throws it away if this fails."""
    started = time.perf_counter()
    root = Path(root).resolve()
    if not root.is_dir():
        raise NotFoundError(f"cannot apply a layer onto {root}: not a directory")
    reader = source.open_layer(index)  # opened before fork and chroot (trap 2 of 4.3)
    try:
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            _child(reader, root, write_end)
        os.close(write_end)
    finally:
        reader.close()  # the parent's copy; the child has its own descriptors
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read()
    _, status = os.waitpid(pid, 0)
    what = source.layer_name(index)
    if os.WIFSIGNALED(status):
        raise IOFailure(
            f"applying {what} failed: the applier was killed by signal {os.WTERMSIG(status)}"
        )
    try:
        result: dict[str, Any] = json.loads(report) if report else {}
    except ValueError:
        result = {}
    if result.get("ok") is True and os.WEXITSTATUS(status) == 0:
        return ApplyStats(
            int(result["entries"]),
            int(result["content_bytes"]),
            int(result["whiteouts"]),
            time.perf_counter() - started,
        )
    if "error" not in result:
        raise IOFailure(f"applying {what} failed: the applier exited with status {status}")
    cls = _REPORTABLE.get(str(result["error"]), IOFailure)
    raise cls(str(result["message"]), hint=result.get("hint") or None)


def _child(reader: LayerReader, root: Path, write_end: int) -> NoReturn:
    """Runs in the forked child: never returns, always reports."""
    status = 1
    try:
        try:
            os.chroot(root)
            os.chdir("/")
            os.umask(0)
            scan = _Applier(reader).run()
            report: dict[str, Any] = {
                "ok": True,
                "entries": scan.entries,
                "content_bytes": scan.content_bytes,
                "whiteouts": scan.whiteouts,
            }
            status = 0
        except ThinmgrError as error:
            report = {"error": type(error).__name__, "message": error.message, "hint": error.hint}
        except OSError as error:
            failure = _os_failure(reader.what, error)
            report = {"error": type(failure).__name__, "message": failure.message}
        except BaseException as error:
            report = {"error": "InternalError", "message": f"{type(error).__name__}: {error}"}
        data = json.dumps(report).encode()
        while data:
            data = data[os.write(write_end, data) :]
    finally:
        os._exit(status)


def _os_failure(what: str, error: OSError) -> ThinmgrError:
    reason = error.strerror or str(error)
    message = f"{what}: {reason}" + (f": {error.filename}" if error.filename else "")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(message, hint="Give the layer a larger device (import --size).")
    if error.errno in (errno.EIO, errno.EROFS, errno.EPERM, errno.EACCES):
        return IOFailure(message)
    # ENOENT, ENOTDIR, EEXIST, ELOOP, EISDIR...: what the layer asks for cannot be done here.
    return CorruptImageError(message)


def _absolute(relative: str) -> str:
    """The path inside the chroot, checked once more (defence in depth)."""
    if "\x00" in relative or ".." in relative.split("/"):
        raise CorruptImageError(f"refusing path {relative!r}")
    return "/" + relative


def _ancestors(relative: str) -> list[str]:
    parts = relative.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


class _Applier:
    def __init__(self, reader: LayerReader) -> None:
        self.reader = reader
        self.made: set[str] = set()  # paths this layer made, with their parents
        self.dir_times: list[tuple[str, float]] = []

    def run(self) -> LayerScan:
        for entry, info in self.reader.entries():
            try:
                self.apply(entry, info)
            except OSError as error:
                raise _entry_failure(self.reader.what, entry, error) from None
        for path, mtime in reversed(self.dir_times):
            os.utime(path, (mtime, mtime), follow_symlinks=False)
        return self.reader.finish()

    def mark(self, relative: str) -> None:
        self.made.update(_ancestors(relative))
        self.made.add(relative)

    def apply(self, entry: LayerEntry, info: tarfile.TarInfo) -> None:
        kind = entry.kind
        if kind is EntryKind.WHITEOUT:
            self.whiteout(entry.link)
            return
        if kind is EntryKind.OPAQUE:
            self.prune(entry.link)
            if entry.link:
                self.mark(entry.link)
            return
        path = _absolute(entry.path)
        self.ensure_parent(path)
        if kind is EntryKind.DIR:
            self.make_dir(path, entry)
        else:
            remove_tree(path)
            if kind is EntryKind.FILE:
                self.write_file(path, entry, info)
            elif kind is EntryKind.SYMLINK:
                os.symlink(entry.link, path)
                self.set_attributes(path, entry, symlink=True)
            elif kind is EntryKind.HARDLINK:
                # Resolved in the chroot: the target can only be a file of this tree; with
                # follow_symlinks=False a link to a symlink links the symlink itself.
                os.link(_absolute(entry.link), path, follow_symlinks=False)
                # Docker's createTarFile re-applies the link header's owner, xattrs and
                # (unless the target is a symlink) mode and times to the shared inode: the
                # last header of an inode wins, as when docker or tar extracts the layer.
                self.set_attributes(path, entry, symlink=stat.S_ISLNK(os.lstat(path).st_mode))
            elif kind in (EntryKind.CHAR, EntryKind.BLOCK):
                kind_bits = stat.S_IFCHR if kind is EntryKind.CHAR else stat.S_IFBLK
                os.mknod(path, kind_bits | 0o600, os.makedev(entry.devmajor, entry.devminor))
                self.set_attributes(path, entry)
            elif kind is EntryKind.FIFO:
                os.mkfifo(path, 0o600)
                self.set_attributes(path, entry)
        self.mark(entry.path)

    def ensure_parent(self, path: str) -> None:
        parent = os.path.dirname(path)
        if parent != "/" and not os.path.isdir(parent):
            # Like Docker: missing parents are created; an existing symlinked parent is
            # followed (inside the chroot), a parent that is a file is an error.
            os.makedirs(parent, 0o755, exist_ok=True)

    def make_dir(self, path: str, entry: LayerEntry) -> None:
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
        except FileNotFoundError:
            is_dir = False
        if not is_dir:
            remove_tree(path)
            os.mkdir(path, 0o700)
        os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
        os.chmod(path, entry.mode)
        self.set_xattrs(path, entry, symlink=False)
        self.dir_times.append((path, entry.mtime))

    def write_file(self, path: str, entry: LayerEntry, info: tarfile.TarInfo) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(path, flags, 0o600)
        try:
            for chunk in self.reader.content(info):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode)  # after chown, which clears setuid/setgid
            for name, value in entry.xattrs.items():
                _setxattr(fd, name, value, symlink=False)
            os.utime(fd, (entry.mtime, entry.mtime))
        finally:
            os.close(fd)

    def set_attributes(self, path: str, entry: LayerEntry, *, symlink: bool = False) -> None:
        os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
        if not symlink:
            os.chmod(path, entry.mode)  # just made here, not a symlink
        self.set_xattrs(path, entry, symlink=symlink)
        os.utime(path, (entry.mtime, entry.mtime), follow_symlinks=False)

    def set_xattrs(self, path: str, entry: LayerEntry, *, symlink: bool) -> None:
        for name, value in entry.xattrs.items():
            _setxattr(path, name, value, symlink=symlink)

    def whiteout(self, relative: str) -> None:
        if relative in self.made:
            # Whiteouts hide lower layers only; what this layer put there stays, but lower
            # content under a directory it merged into goes, whatever the order in the tar.
            self.prune(relative)
            return
        remove_tree(_absolute(relative))

    def prune(self, relative: str) -> None:
        """Removes what lower layers left under directory ``relative`` (opaque semantics)."""
        path = _absolute(relative) if relative else "/"
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return  # a symlink or file: there is no directory here to make opaque
        except (FileNotFoundError, NotADirectoryError):
            return
        for name in os.listdir(path):
            child = f"{relative}/{name}" if relative else name
            if child in self.made:
                self.prune(child)
            else:
                remove_tree(_absolute(child))


def remove_tree(path: str) -> None:
    """Removes ``path`` if it exists, never following a symlink (a symlink is unlinked)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)  # fd-based in 3.11: does not follow symlinks inside
    else:
        os.unlink(path)


def _setxattr(target: str | int, name: str, value: bytes, *, symlink: bool) -> None:
    try:
        if isinstance(target, int):
            os.setxattr(target, name, value)
        else:
            os.setxattr(target, name, value, follow_symlinks=False)
    except OSError as error:
        # Like Docker: a file system without xattrs (or user.* on a symlink) is not fatal.
        if error.errno in _NOT_SUPPORTED or (symlink and error.errno == errno.EPERM):
            return
        raise


def _entry_failure(what: str, entry: LayerEntry, error: OSError) -> ThinmgrError:
    failure = _os_failure(what, error)
    reason = error.strerror or str(error)
    failure.message = f"{what}: cannot apply entry {entry.path!r} ({entry.kind.value}): {reason}"
    failure.args = (failure.message,)
    return failure
