"""`thinmgr diff --files` on the real user engine (root tier), against a full tree comparison.

An ext4 volume with a few hundred files (0 bytes to several MiB, nested directories, short
and long symlinks, hard links, xattrs, sparse files) is snapshotted; each seed applies a
random change set to a fresh snapshot (in-place overwrites, the same bytes written back,
appends, truncations, whole rewrites, chmod/chown/touch, xattrs, new files and directories,
removed files and trees, renames, files replaced by symlinks or directories, new hard links).
``--files`` must name exactly the paths a full comparison of the two mounted trees names,
with the same kinds. The full comparison reads everything; ``--files`` may read only files
whose data lies in changed blocks, which an instrumented in-process run checks.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import random
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.root.test_manager_user import Env, run
from tests.root.test_manager_user import env as env  # noqa: PLC0414 (the fixture)
from thinmgr.ops.manager import open_manager

pytestmark = pytest.mark.root

MiB = 1 << 20


# --- the reference: a full comparison of two mounted trees --------------------------------


def _xattrs(path: str) -> dict[str, bytes]:
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
    }


def _content(path: str, st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(path)
    if stat.S_ISREG(st.st_mode):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(MiB):
                digest.update(chunk)
        return digest.hexdigest()
    return None


def full_snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """path -> (type, content, attributes, size): everything but atime and ctime."""
    out = {}
    paths = [str(root)]
    for top, dirs, files in os.walk(root):
        paths.extend(os.path.join(top, name) for name in dirs + files)
    for full in paths:
        rel = "/" + os.path.relpath(full, root) if full != str(root) else "/"
        st = os.lstat(full)
        attrs = (
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            st.st_nlink,
            st.st_rdev,
            st.st_size if stat.S_ISDIR(st.st_mode) else 0,
            _xattrs(full),
        )
        out[rel] = (stat.S_IFMT(st.st_mode), _content(full, st), attrs, st.st_size)
    return out


def reference_diff(older: Path, newer: Path) -> list[dict[str, Any]]:
    return compare_snapshots(full_snapshot(older), full_snapshot(newer))


def compare_snapshots(
    a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]]
) -> list[dict[str, Any]]:
    changes = []
    for path in sorted(a.keys() | b.keys()):
        if path not in b:
            kind = "removed"
        elif path not in a:
            kind = "added"
        elif a[path][0] != b[path][0]:
            kind = "type-changed"
        elif a[path][1] != b[path][1]:
            kind = "modified"
        elif a[path][2] != b[path][2]:
            kind = "metadata"
        else:
            continue
        before = a[path][3] if path in a else None
        after = b[path][3] if path in b else None
        changes.append({"kind": kind, "path": path, "size_before": before, "size_after": after})
    return changes


# --- building and changing trees -----------------------------------------------------------


def populate(root: Path, rng: random.Random) -> None:
    dirs = [root]
    for i in range(30):
        d = rng.choice(dirs) / f"dir{i}"
        d.mkdir()
        dirs.append(d)
    files = []
    for i in range(300):
        r = rng.random()
        if r < 0.25:
            size = rng.randrange(0, 100)
        elif r < 0.75:
            size = rng.randrange(100, 64 << 10)
        elif r < 0.97:
            size = rng.randrange(64 << 10, 256 << 10)
        else:
            size = rng.randrange(1 * MiB, 3 * MiB)
        path = rng.choice(dirs) / f"file{i}"
        path.write_bytes(rng.randbytes(size))
        files.append(path)
    for i in range(5):  # sparse: data, a hole, data
        path = rng.choice(dirs) / f"sparse{i}"
        with open(path, "wb") as f:
            f.write(rng.randbytes(5000))
            f.seek(1 * MiB)
            f.write(rng.randbytes(7000))
    for i in range(20):
        target = "x" * rng.choice([5, 80, 200])  # fast (in-inode) and slow symlinks
        os.symlink(f"{target}{i}", rng.choice(dirs) / f"link{i}")
    for i in range(10):
        os.link(rng.choice(files), rng.choice(dirs) / f"hard{i}")
    for path in rng.sample(files, 20):
        os.setxattr(path, "user.tag", rng.randbytes(8))
    os.mkfifo(root / "fifo")


def entries(root: Path) -> tuple[list[Path], list[Path]]:
    files, dirs = [], []
    for top, ds, fs in os.walk(root):
        dirs.extend(Path(top) / d for d in ds)
        files.extend(Path(top) / f for f in fs)
    return sorted(files), sorted(dirs)


def regular(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.exists() and stat.S_ISREG(p.lstat().st_mode)]


def change(root: Path, rng: random.Random, count: int) -> None:
    """``count`` random changes of every kind the issue lists."""
    for step in range(count):
        files, dirs = entries(root)
        regs = regular(files)
        op = rng.choice(OPS)
        op(root, rng, step, regs, files, dirs)
    os.sync()


def _overwrite(root: Path, rng: random.Random, step: int, regs: list[Path], *_: Any) -> None:
    path = rng.choice(regs)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(rng.randrange(0, size + 1))
        f.write(rng.randbytes(rng.randrange(1, 9000)))


def _same_bytes(root: Path, rng: random.Random, step: int, regs: list[Path], *_: Any) -> None:
    path = rng.choice([p for p in regs if p.stat().st_size] or regs)
    data = path.read_bytes()
    with open(path, "r+b") as f:
        f.write(data[:4096])  # rewritten in place, identical: only mtime changes


def _append(root: Path, rng: random.Random, step: int, regs: list[Path], *_: Any) -> None:
    with open(rng.choice(regs), "ab") as f:
        f.write(rng.randbytes(rng.randrange(1, 100_000)))


def _truncate(root: Path, rng: random.Random, step: int, regs: list[Path], *_: Any) -> None:
    path = rng.choice(regs)
    os.truncate(path, rng.choice([0, path.stat().st_size // 2, path.stat().st_size + 70_000]))


def _rewrite(root: Path, rng: random.Random, step: int, regs: list[Path], *_: Any) -> None:
    path = rng.choice(regs)
    path.write_bytes(rng.randbytes(path.stat().st_size))  # same size, new blocks or not


def _attrs(root: Path, rng: random.Random, step: int, regs: list[Path], *rest: Any) -> None:
    path = rng.choice(regs + rest[1])
    what = rng.randrange(5)
    if what == 0:
        os.chmod(path, 0o600 if path.stat().st_mode & 0o44 else 0o644)
    elif what == 1:
        os.lchown(path, 1000 + step, 100)
    elif what == 2:
        os.utime(path, ns=(1, 1_600_000_000_123_456_789))
    elif what == 3:
        os.setxattr(path, f"user.s{step}", b"v")
    else:  # chmod and back: only ctime changes, no difference to report
        mode = stat.S_IMODE(path.stat().st_mode)
        os.chmod(path, 0o700)
        os.chmod(path, mode)


def _add(
    root: Path, rng: random.Random, step: int, regs: list[Path], files: Any, dirs: Any
) -> None:
    parent = rng.choice([root, *dirs])
    if rng.random() < 0.5:
        (parent / f"new{step}").write_bytes(rng.randbytes(rng.randrange(0, 300_000)))
    else:
        d = parent / f"newdir{step}"
        d.mkdir()
        (d / "inner").write_bytes(rng.randbytes(3000))
        (d / "sub").mkdir()
        os.symlink("inner", d / "sub" / "ln")


def _remove(
    root: Path, rng: random.Random, step: int, regs: list[Path], files: Any, dirs: Any
) -> None:
    if dirs and rng.random() < 0.3:
        shutil.rmtree(rng.choice(dirs))
    else:
        rng.choice(files).unlink()


def _rename(
    root: Path, rng: random.Random, step: int, regs: list[Path], files: Any, dirs: Any
) -> None:
    source = rng.choice(files + dirs)
    targets = [d for d in [root, *dirs] if not d.is_relative_to(source)]
    source.rename(rng.choice(targets) / f"moved{step}")


def _retype(root: Path, rng: random.Random, step: int, regs: list[Path], *_: Any) -> None:
    path = rng.choice(regs)
    path.unlink()
    if rng.random() < 0.6:
        os.symlink("somewhere/else", path)
    else:
        path.mkdir()
        (path / "child").write_bytes(b"c")


def _hardlink(root: Path, rng: random.Random, step: int, regs: list[Path], *rest: Any) -> None:
    os.link(rng.choice(regs), rng.choice([root, *rest[1]]) / f"hl{step}")


OPS = [
    _overwrite,
    _overwrite,
    _same_bytes,
    _append,
    _truncate,
    _rewrite,
    _attrs,
    _attrs,
    _add,
    _remove,
    _rename,
    _retype,
    _hardlink,
]


# --- the tests --------------------------------------------------------------------------------


def mount_ro(env: Env, device: str, name: str) -> Path:
    point = env.root / "mnt" / name
    point.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", "ro,noload", device, point)
    env.mounts.append(point)
    return point


@pytest.fixture
def base(env: Env) -> Iterator[str]:
    """A pool with volume ``base`` holding the populated ext4 tree; the pool's name."""
    pool = env.pool_name("f")
    env.cli("pool", "create", pool, "--size", "2G", "--engine", "user")
    env.cli("volume", "create", pool, "base", "--size", "256M")
    link = env.cli("volume", "activate", pool, "base").stdout.strip()
    run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", link)
    point = env.mount(link, "base")
    populate(point, random.Random(1234))
    env.umount(point)
    env.cli("volume", "deactivate", pool, "base")
    yield pool


def files_diff(env: Env, pool: str, left: str, right: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = env.json("diff", pool, left, right, "--files")
    return result


def reference_mounted(env: Env, pool: str, name: str) -> dict[str, tuple[Any, ...]]:
    link = env.cli("volume", "activate", pool, name).stdout.strip()
    point = mount_ro(env, link, f"ref-{name}")
    try:
        return full_snapshot(point)
    finally:
        env.umount(point)
        env.cli("volume", "deactivate", pool, name)


def test_files_match_a_full_comparison(env: Env, base: str) -> None:
    """Three seeded change sets, each on its own snapshot of ``base``."""
    before = reference_mounted(env, base, "base")
    for seed in (1, 2, 3):
        name = f"snap{seed}"
        env.cli("snapshot", base, "base", name)
        link = env.cli("volume", "activate", base, name).stdout.strip()
        point = env.mount(link, name)
        change(point, random.Random(seed), 40)
        env.umount(point)
        env.cli("volume", "deactivate", base, name)
        ours = files_diff(env, base, "base", name)
        assert ours == compare_snapshots(before, reference_mounted(env, base, name)), seed
        assert {c["kind"] for c in ours} >= {"added", "removed", "modified", "metadata"}
        states = {v["name"]: v["state"] for v in env.json("volume", "list", base)}
        assert set(states.values()) == {"inactive"}  # activated for the diff, put back


def test_unchanged_snapshot_and_live_mount(env: Env, base: str) -> None:
    env.cli("snapshot", base, "base", "same")
    assert files_diff(env, base, "base", "same") == []
    assert env.cli("diff", base, "base", "same", "--files").stdout == ""

    # The snapshot mounted read-write on the host, changed and not unmounted: read through
    # that mount (synced first), and the result still equals the full comparison.
    link = env.cli("volume", "activate", base, "same").stdout.strip()
    point = env.mount(link, "same")
    (point / "live-new").write_bytes(b"x" * 10_000)
    shutil.rmtree(entries(point)[1][0])
    ours = files_diff(env, base, "base", "same")
    base_link = env.cli("volume", "activate", base, "base").stdout.strip()
    older = mount_ro(env, base_link, "ref-base")
    assert ours == reference_diff(older, point)
    assert {"kind": "added", "path": "/live-new", "size_before": None, "size_after": 10_000} in ours
    assert env.json("volume", "show", base, "same")["state"] == "active"  # left as it was
    env.umount(older)
    env.umount(point)
    for volume in ("base", "same"):
        env.cli("volume", "deactivate", base, volume)


def test_reads_only_candidates(env: Env, base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unchanged files are never read: an independent count of the files whose contents
    the in-process diff read (every read call, mapped back to its file) is at most the
    number of candidates, and the bytes read stay within the changed blocks (twice: both
    sides), far below the data in the tree."""
    from thinmgr.ops.filediff import diff_files

    env.cli("snapshot", base, "base", "few")
    link = env.cli("volume", "activate", base, "few").stdout.strip()
    point = env.mount(link, "few")
    files = regular(entries(point)[0])
    total = sum(p.stat().st_size for p in files)
    rng = random.Random(5)
    for path in rng.sample([p for p in files if p.stat().st_nlink == 1], 6):
        with open(path, "r+b") as f:
            f.write(b"changed!")
    env.umount(point)
    env.cli("volume", "deactivate", base, "few")

    read_from: set[str] = set()
    read_bytes = 0

    def record(fd: int, data: bytes) -> bytes:
        nonlocal read_bytes
        target = os.readlink(f"/proc/self/fd/{fd}")
        if "/filediff-" in target:  # a file in one of the trees (not a device, not a pipe)
            read_from.add(target)
            read_bytes += len(data)
        return data

    real_pread, real_read, real_open = os.pread, os.read, builtins.open
    monkeypatch.setattr(os, "pread", lambda fd, n, off: record(fd, real_pread(fd, n, off)))
    monkeypatch.setattr(os, "read", lambda fd, n: record(fd, real_read(fd, n)))

    def guarded_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        assert "mnt" not in str(file) and "filediff-" not in str(file), file
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    with open_manager(env.home) as mgr:
        result = diff_files(mgr, base, "base", "few")
    monkeypatch.undo()

    stats = result.files.stats
    assert sorted(c.kind.value for c in result.files.changes).count("modified") == 6
    # A file is read on both sides: count the paths below the two mount points once.
    files_read = len({re.sub(r"^.*/filediff-[^/]+/(older|newer)", "", p) for p in read_from})
    assert files_read == stats.files_read
    assert stats.files_read <= stats.candidates
    assert read_bytes == stats.bytes_read <= 2 * result.changed_bytes
    assert read_bytes < total / 20, (read_bytes, total)
    assert stats.entries > 300 and stats.files_read < stats.candidates // 4
