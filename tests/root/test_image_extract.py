"""The confined layer applier on real file trees (root tier): OCI whiteout semantics, file
attribute fidelity on an ext4 loop mount, and the same tree from every kind of source."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import images
from tests.support.images import (
    BUSYBOX_CONFIG,
    blockdev,
    busybox_image,
    chardev,
    directory,
    fifo,
    file,
    hardlink,
    layer_tar,
    opaque,
    rootfs_tarball,
    symlink,
    whiteout,
    write_oci_layout,
)
from thinmgr.layers.apply import ApplyStats, apply_layer
from thinmgr.layers.image_source import open_image_source

pytestmark = pytest.mark.root

Snapshot = dict[str, tuple[Any, ...]]


def apply_all(source_path: Path, root: Path, **kw: Any) -> list[ApplyStats]:
    root.mkdir(exist_ok=True)
    with open_image_source(source_path, **kw) as src:
        return [apply_layer(src, i, root) for i in range(len(src.description.layers))]


def snapshot(root: Path, *, dir_mtimes: bool = True) -> Snapshot:
    """Every path under ``root`` (not following symlinks) with its type, owner, mode, size,
    mtime, link target, content hash and xattrs."""
    found: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            is_dir = stat.S_ISDIR(st.st_mode)
            extra: Any = None
            if stat.S_ISREG(st.st_mode):
                extra = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = (os.major(st.st_rdev), os.minor(st.st_rdev))
            xattrs = (
                {}
                if stat.S_ISLNK(st.st_mode)
                else {
                    n: os.getxattr(path, n, follow_symlinks=False)
                    for n in os.listxattr(path, follow_symlinks=False)
                }
            )
            mtime = None if (is_dir and not dir_mtimes) else st.st_mtime_ns
            found[os.path.relpath(path, root)] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_size if not is_dir else 0,
                mtime,
                extra,
                sorted(xattrs.items()),
            )
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    """The busybox image applied from an OCI layout: what every other source must give."""
    base = tmp_path_factory.mktemp("reference")
    apply_all(busybox_image(base / "oci", "oci-layout"), base / "root")
    return snapshot(base / "root")


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A fresh 64 MiB ext4 file system on a loop device, like a layer's thin device."""
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-d", str(mnt)], check=True)


# ------------------------------------------------------------------------------ busybox


def test_busybox_image_applies_with_whiteouts_and_runs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    source = busybox_image(tmp_path / "oci", "oci-layout")
    started = time.perf_counter()
    stats = apply_all(source, root)
    elapsed = time.perf_counter() - started
    print(
        f"busybox layers applied: {[round(s.seconds * 1000, 1) for s in stats]} ms "
        f"({elapsed * 1000:.0f} ms with opening)"
    )
    assert stats[0].entries > 250 and stats[0].whiteouts == 0
    assert stats[0].content_bytes > 1_000_000  # the busybox binary
    assert (stats[1].entries, stats[1].whiteouts) == (6, 2)
    assert not (root / "etc/motd").exists()  # explicit whiteout
    assert sorted(os.listdir(root / "var/cache/x")) == ["c"]  # opaque: a, b gone
    assert (root / "etc/hello").read_text() == "hello\n"
    assert os.readlink(root / "bin/sh") == "busybox"
    assert not any(name.startswith(".wh.") for _, _, names in os.walk(root) for name in names)
    # The tree is a working root: busybox runs in it.
    out = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "cat /etc/hello; ls /var/cache/x"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "hello\nc\n"


@pytest.mark.parametrize("opaque_first", [True, False])
def test_opaque_marker_position_does_not_matter(
    tmp_path: Path, reference: Snapshot, opaque_first: bool
) -> None:
    source = busybox_image(tmp_path / "oci", "oci-layout", opaque_first=opaque_first)
    apply_all(source, tmp_path / "root")
    assert snapshot(tmp_path / "root") == reference


@pytest.mark.parametrize("order", ["marker-first", "marker-last"])
def test_opaque_and_whiteouts_hide_lower_layers_only(tmp_path: Path, order: str) -> None:
    lower = layer_tar(
        [
            directory("x"),
            directory("x/y"),
            file("x/y/old", b"old"),
            file("x/gone", b"g"),
            directory("d"),
            file("d/f", b"lower"),
            file("d/keep", b"k"),
        ]
    )
    body = [directory("x/y"), file("x/y/new", b"new"), file("d/f", b"upper")]
    hide = [opaque("x"), whiteout("d", "f")]
    upper = layer_tar(hide + body if order == "marker-first" else body + hide)
    source = write_oci_layout(tmp_path / "oci", [lower, upper], {}, compress="")
    root = tmp_path / "root"
    apply_all(source, root)
    # Lower content under x goes even inside x/y that this layer merged into; what this
    # layer wrote stays; its own d/f is not hidden by its own whiteout.
    assert sorted(os.listdir(root / "x")) == ["y"]
    assert sorted(os.listdir(root / "x/y")) == ["new"]
    assert (root / "d/f").read_bytes() == b"upper"
    assert (root / "d/keep").read_bytes() == b"k"


def test_existing_paths_are_replaced_not_followed(tmp_path: Path) -> None:
    lower = layer_tar(
        [
            directory("a"),
            file("a/f", b"1"),
            file("b", b"2"),
            symlink("c", "a"),
            directory("keep", mode=0o700),
            file("keep/x", b"x"),
        ]
    )
    upper = layer_tar(
        [
            file("a", b"file now"),
            directory("b"),
            file("c", b"not through"),
            directory("keep", mode=0o750, uid=7, gid=8),
        ]
    )
    source = write_oci_layout(tmp_path / "oci", [lower, upper], {}, compress="zstd")
    root = tmp_path / "root"
    apply_all(source, root)
    assert (root / "a").read_bytes() == b"file now"  # a directory replaced by a file
    assert (root / "b").is_dir()  # a file replaced by a directory
    assert not (root / "c").is_symlink() and (root / "c").read_bytes() == b"not through"
    st = os.stat(root / "keep")  # dir over dir: contents kept, attributes updated
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 7, 8)
    assert (root / "keep/x").read_bytes() == b"x"


def test_a_hardlink_header_sets_the_shared_inode_as_docker_does(tmp_path: Path) -> None:
    """Docker's createTarFile re-applies a link entry's owner, mode and times to the inode
    it shares (the last header wins); a link to a symlink keeps the symlink's mode."""
    layer = layer_tar(
        [
            file("data", b"d", mode=0o600, uid=1, gid=2, mtime=1_000_000),
            hardlink("again", "data", mode=0o640, uid=3, gid=4, mtime=2_000_000),
            symlink("sl", "data", uid=5, gid=6, mtime=3_000_000),
            hardlink("sl2", "sl", mode=0o600, uid=7, gid=8, mtime=4_000_000),
        ]
    )
    root = tmp_path / "root"
    apply_all(write_oci_layout(tmp_path / "oci", [layer], {}), root)
    data, again = os.lstat(root / "data"), os.lstat(root / "again")
    assert data.st_ino == again.st_ino and data.st_nlink == 2
    assert (stat.S_IMODE(data.st_mode), data.st_uid, data.st_gid) == (0o640, 3, 4)
    assert data.st_mtime == 2_000_000
    link = os.lstat(root / "sl2")
    assert stat.S_ISLNK(link.st_mode) and link.st_ino == os.lstat(root / "sl").st_ino
    assert (link.st_uid, link.st_gid) == (7, 8)  # lchown; no chmod through a symlink
    assert stat.S_IMODE(os.stat(root / "data").st_mode) == 0o640


# ------------------------------------------------------------------------------ fidelity


CAP_NET_RAW = 13
# struct vfs_cap_data, revision 2, effective bit set (linux/capability.h)
FILE_CAPS = struct.pack("<IIIII", 0x02000000 | 1, 1 << CAP_NET_RAW, 0, 0, 0)


def test_attributes_survive_on_ext4(tmp_path: Path, ext4: Path) -> None:
    layer = layer_tar(
        [
            directory("bin", mtime=1_000_000),
            file("bin/su", b"#!suid", mode=0o4755, uid=0, gid=0, mtime=1_111_111),
            file("bin/ping", b"ping", mode=0o755, xattrs={"security.capability": FILE_CAPS}),
            file(
                "home/u/data",
                b"mine",
                mode=0o640,
                uid=1000,
                gid=1001,
                mtime=1_222_222,
                xattrs={"user.note": b"hello", "user.bin": b"\x00\xff\xfe"},
            ),
            directory("shared", mode=0o2775, uid=0, gid=50, mtime=1_333_333),
            # As tar and docker write a link: the header repeats the inode's attributes.
            hardlink("bin/su2", "bin/su", mode=0o4755, mtime=1_111_111),
            symlink("bin/sh", "su", uid=5, gid=6, mtime=1_444_444),
            chardev("dev/null", 1, 3),
            blockdev("dev/loop9", 7, 9),
            fifo("run/fifo", mode=0o620),
        ]
    )
    source = write_oci_layout(tmp_path / "oci", [layer], BUSYBOX_CONFIG)
    (stats,) = apply_all(source, ext4)
    assert (stats.entries, stats.content_bytes) == (10, len(b"#!suid") + 4 + 4)
    # Parents the layer does not list are made like Docker makes them: 0755 root.
    assert stat.S_IMODE(os.lstat(ext4 / "home/u").st_mode) == 0o755
    su = os.lstat(ext4 / "bin/su")
    assert stat.S_IMODE(su.st_mode) == 0o4755 and su.st_mtime == 1_111_111
    assert os.lstat(ext4 / "bin/su2").st_ino == su.st_ino and su.st_nlink == 2
    data = os.lstat(ext4 / "home/u/data")
    assert (data.st_uid, data.st_gid, stat.S_IMODE(data.st_mode)) == (1000, 1001, 0o640)
    assert data.st_mtime == 1_222_222
    assert os.getxattr(ext4 / "home/u/data", "user.note") == b"hello"
    assert os.getxattr(ext4 / "home/u/data", "user.bin") == b"\x00\xff\xfe"
    try:
        caps = os.getxattr(ext4 / "bin/ping", "security.capability")
    except OSError as error:
        assert error.errno in (errno.ENODATA, errno.ENOTSUP)
        pytest.skip("security.capability not settable here")
    assert caps == FILE_CAPS
    shared = os.lstat(ext4 / "shared")
    assert (stat.S_IMODE(shared.st_mode), shared.st_gid) == (0o2775, 50)
    assert shared.st_mtime == 1_333_333
    assert os.lstat(ext4 / "bin").st_mtime == 1_000_000  # set after its children were made
    sh = os.lstat(ext4 / "bin/sh")
    assert stat.S_ISLNK(sh.st_mode) and os.readlink(ext4 / "bin/sh") == "su"
    assert (sh.st_uid, sh.st_gid, sh.st_mtime) == (5, 6, 1_444_444)
    null = os.lstat(ext4 / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = os.lstat(ext4 / "dev/loop9")
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 9)
    fifo_st = os.lstat(ext4 / "run/fifo")
    assert stat.S_ISFIFO(fifo_st.st_mode) and stat.S_IMODE(fifo_st.st_mode) == 0o620


# ------------------------------------------------------------------------------ sources


IMAGE_SOURCES = [
    ("oci-layout", {}),
    ("oci-layout", {"compress": "zstd", "nested": True}),
    ("oci-layout", {"compress": "", "manifest_media_type": False}),
    ("oci-archive", {}),
    ("oci-archive", {"outer": "gz"}),
    ("docker-archive", {}),
    ("docker-archive", {"outer": "zstd"}),
    ("docker-archive-25", {}),
    ("docker-archive-25", {"outer": "xz"}),
]


@pytest.mark.parametrize(
    ("kind", "options"),
    IMAGE_SOURCES,
    ids=[f"{k}-{'-'.join(map(str, o.values())) or 'plain'}" for k, o in IMAGE_SOURCES],
)
def test_every_image_source_gives_the_same_tree(
    tmp_path: Path, reference: Snapshot, kind: str, options: dict[str, Any]
) -> None:
    name = "image" if kind == "oci-layout" else "image.tar"
    source = busybox_image(tmp_path / name, kind, **options)
    with open_image_source(source, tag="busybox:latest") as src:
        assert src.description.kind == kind.removesuffix("-25")
        assert src.description.config == BUSYBOX_CONFIG
    apply_all(source, tmp_path / "root")
    assert snapshot(tmp_path / "root") == reference


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz", "zstd"])
def test_rootfs_tarballs_give_the_same_tree(
    tmp_path: Path, reference: Snapshot, compression: str
) -> None:
    tarball = rootfs_tarball(tmp_path / "rootfs.tar", compression)
    with open_image_source(tarball) as src:
        assert src.description.kind == "rootfs-tar"
        assert len(src.description.layers) == 1
        scan = src.scan_layer(0)
    assert scan.diff_id == images.digest(images.busybox_flat_tar())
    apply_all(tarball, tmp_path / "root")
    # A flattened tree has no layer-2 directory entries: directory mtimes may differ.
    strip = {k: v[:5] + v[6:] if v[0] == stat.S_IFDIR else v for k, v in reference.items()}
    got = snapshot(tmp_path / "root")
    assert {k: v[:5] + v[6:] if v[0] == stat.S_IFDIR else v for k, v in got.items()} == strip
