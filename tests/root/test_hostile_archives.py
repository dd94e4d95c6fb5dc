"""Hostile layers against the scanner and the confined applier (root tier).

Every case checks that a sentinel tree OUTSIDE the target root is untouched and that nothing
appears outside the root, then that the outcome is the expected one: a clean refusal
(CorruptImageError from ``scan_layer``, before anything is written, and from ``apply_layer``
too), or a contained result (whatever happens lands inside the root). ``apply_layer`` is
also run on its own, without the scan, since it must be safe by itself (chroot confinement).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import stat
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import (
    Entry,
    chardev,
    digest,
    directory,
    file,
    hardlink,
    image_config,
    layer_tar,
    opaque,
    symlink,
    whiteout,
    write_oci_layout,
)
from thinmgr.errors import CorruptImageError
from thinmgr.layers.apply import apply_layer
from thinmgr.layers.image_source import ImportLimits, open_image_source

pytestmark = pytest.mark.root

SMALL = ImportLimits(
    max_layer_bytes=1 << 20,
    max_entries=1000,
    max_name_bytes=4096,
    max_header_bytes=64 << 10,
    max_json_bytes=1 << 20,
    max_archive_bytes=8 << 20,
)


@dataclass
class Arena:
    base: Path
    root: Path  # the target tree
    outside: Path  # the sentinel directory next to it
    secret: Path  # a sentinel file in it
    src: Path  # where the test's image files go

    def state(self) -> dict[str, tuple[Any, ...]]:
        """Everything outside root/ and src/: the sentinel, with inode numbers and link counts."""
        found: dict[str, tuple[Any, ...]] = {}
        for dirpath, dirnames, filenames in os.walk(self.base):
            if dirpath == str(self.base):
                dirnames[:] = [d for d in dirnames if d not in ("root", "src")]
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                content = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else None
                found[path] = (
                    st.st_mode,
                    st.st_uid,
                    st.st_ino,
                    st.st_nlink,
                    st.st_mtime_ns,
                    content,
                )
        return found


@pytest.fixture
def arena(tmp_path: Path) -> Arena:
    base = tmp_path / "arena"
    outside = base / "outside"
    (outside / "dir").mkdir(parents=True)
    secret = outside / "secret"
    secret.write_bytes(b"top secret")
    os.chmod(secret, 0o600)
    (outside / "dir" / "keep").write_bytes(b"keep")
    (base / "root").mkdir()
    (base / "src").mkdir()
    return Arena(base, base / "root", outside, secret, base / "src")


def blob_layout(arena: Arena, layer: bytes, *, compress: str = "", **kw: Any) -> Path:
    return write_oci_layout(
        arena.src / f"oci-{uuid.uuid4().hex[:8]}", [layer], {}, compress=compress, **kw
    )


def check(
    arena: Arena,
    layer: bytes | Path,
    expect: str,
    *,
    match: str | None = None,
    limits: ImportLimits = SMALL,
    base: bytes | None = None,
) -> None:
    """Scan, then apply; and apply without the scan onto a second root. ``expect``:
    "refused" (both refuse; the scan before any write) or "contained"."""
    source = layer if isinstance(layer, Path) else blob_layout(arena, layer)
    before = arena.state()
    host_root = set(os.listdir("/"))
    with open_image_source(source, limits=limits) as src:
        if base is not None:
            with open_image_source(blob_layout(arena, base)) as lower:
                apply_layer(lower, 0, arena.root)
        root_before = sorted(os.listdir(arena.root))
        if expect == "refused":
            with pytest.raises(CorruptImageError, match=match):
                src.scan_layer(0)
            assert sorted(os.listdir(arena.root)) == root_before  # nothing written
            with pytest.raises(CorruptImageError, match=match):
                apply_layer(src, 0, arena.root)
        else:
            src.scan_layer(0)
            # Contained: an entry may fail to apply inside the root; that is a refusal too.
            with contextlib.suppress(CorruptImageError):
                apply_layer(src, 0, arena.root)
        # The applier is safe on its own too (second root, no scan first).
        alone = arena.base / "root-alone"
        alone.mkdir(exist_ok=True)
        with contextlib.suppress(CorruptImageError):
            apply_layer(src, 0, alone)
    after = arena.state()
    after.pop(str(alone), None)
    after = {k: v for k, v in after.items() if not k.startswith(str(alone) + "/")}
    assert after == before, "something outside the root changed"
    assert set(os.listdir("/")) == host_root


def raw_tar(*blocks: bytes) -> bytes:
    return b"".join(blocks) + bytes(1024)


def header(name: str, size: int, kind: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


# ------------------------------------------------------------------------------ paths


def test_dotdot_path(arena: Arena) -> None:
    check(arena, layer_tar([file("../../x", b"pwn")]), "refused", match="'..' component")
    assert not (arena.base / "x").exists() and not (arena.base.parent / "x").exists()


def test_deep_dotdot_path(arena: Arena) -> None:
    check(arena, layer_tar([directory("a"), file("a/../../x", b"pwn")]), "refused", match="'..'")


def test_absolute_path_is_taken_inside_the_root(arena: Arena) -> None:
    name = f"/thinmgr-hostile-{uuid.uuid4().hex}/abs"
    inner = f"{arena.outside}/abs"
    check(arena, layer_tar([file(name, b"a"), file(inner, b"b")]), "contained")
    assert (arena.root / name.lstrip("/")).read_bytes() == b"a"  # stripped, as Docker does
    assert (arena.root / inner.lstrip("/")).read_bytes() == b"b"
    assert not Path(name).exists() and not (arena.outside / "abs").exists()


def test_symlink_to_host_directory_then_file_through_it(arena: Arena) -> None:
    layer = layer_tar([symlink("lnk", str(arena.outside)), file("lnk/file", b"pwn")])
    check(arena, layer, "contained")
    assert not (arena.outside / "file").exists()


def test_relative_symlink_escape_then_file_through_it(arena: Arena) -> None:
    layer = layer_tar(
        [directory("outside"), symlink("up", "../../outside"), file("up/pwn", b"pwn", mode=0o4755)]
    )
    check(arena, layer, "contained")
    assert not (arena.outside / "pwn").exists()
    # In the chroot "../.." is the root itself: the file landed there, setuid bit and all.
    assert (arena.root / "outside/pwn").read_bytes() == b"pwn"
    assert stat.S_IMODE(os.lstat(arena.root / "outside/pwn").st_mode) == 0o4755


def test_symlink_chain_through_earlier_entries(arena: Arena) -> None:
    layer = layer_tar(
        [
            symlink("a", "b"),
            symlink("b", "c"),
            symlink("c", "../../../" + str(arena.outside)),
            file("a/pwn", b"pwn"),
            file("a/secret", b"overwritten"),
        ]
    )
    check(arena, layer, "contained")
    assert arena.secret.read_bytes() == b"top secret"


def test_nul_in_name(arena: Arena) -> None:
    evil = file("innocent", b"x", pax={"path": "a\x00/../../x"})
    check(arena, layer_tar([evil]), "refused", match="NUL")


@pytest.mark.parametrize("name", ["n" * 5000, "d/" + "c" * 300])
def test_over_long_names(arena: Arena, name: str) -> None:
    check(arena, layer_tar([file(name, b"x")]), "refused", match="bytes")


def test_duplicate_paths(arena: Arena) -> None:
    layer = layer_tar([file("etc/passwd", b"1"), file("./etc//passwd", b"2")])
    check(arena, layer, "refused", match="duplicate path")


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (file("etc/.wh."), "names nothing"),
        (file("etc/.wh.."), "names nothing"),
        (directory("etc/.wh..wh..opq"), "must not be a directory"),
        (file("etc/.wh.x/y"), "inside a whiteout"),
        (file("etc/.wh..wh.plnk"), "meta-entry"),
    ],
)
def test_malformed_whiteouts(arena: Arena, entry: Entry, match: str) -> None:
    check(arena, layer_tar([directory("etc"), entry]), "refused", match=match)


# ------------------------------------------------------------------------------ links


def test_absolute_hardlink_to_host_file(arena: Arena) -> None:
    # tarfile's filter="tar" let exactly this through on 3.11.7 (runtime-and-images.md 5).
    check(arena, layer_tar([hardlink("h", str(arena.secret))]), "contained")
    assert os.lstat(arena.secret).st_nlink == 1
    assert not (arena.root / "h").exists()  # its target does not exist inside the root


def test_hardlink_with_dotdot(arena: Arena) -> None:
    check(arena, layer_tar([hardlink("h", "../outside/secret")]), "refused", match="'..'")
    assert os.lstat(arena.secret).st_nlink == 1


def test_hardlink_to_symlink_pointing_outside(arena: Arena) -> None:
    layer = layer_tar([symlink("s", str(arena.secret)), hardlink("h", "s", mode=0o4777)])
    check(arena, layer, "contained")
    assert os.lstat(arena.secret).st_nlink == 1
    assert stat.S_IMODE(os.lstat(arena.secret).st_mode) == 0o600
    assert os.readlink(arena.root / "h") == str(arena.secret)  # a link to the link itself


def test_setuid_file_written_through_links(arena: Arena) -> None:
    layer = layer_tar(
        [
            symlink("d", str(arena.outside / "dir")),
            file("d/suid", b"x", mode=0o4755),
            symlink("s", str(arena.secret)),
            hardlink("bin/su", "s"),
        ]
    )
    check(arena, layer, "contained")
    assert not (arena.outside / "dir/suid").exists()
    assert stat.S_IMODE(os.lstat(arena.secret).st_mode) == 0o600


# ------------------------------------------------------------------------------ whiteouts


def test_whiteout_aimed_outside(arena: Arena) -> None:
    check(arena, layer_tar([whiteout("..", "outside")]), "refused", match="'..'")


def test_whiteout_through_symlinked_parent(arena: Arena) -> None:
    layer = layer_tar([symlink("esc", str(arena.outside)), whiteout("esc", "secret")])
    check(arena, layer, "contained")
    assert arena.secret.exists()


def test_opaque_marker_through_symlink(arena: Arena) -> None:
    lower = layer_tar([directory("real"), file("real/lower", b"l")])
    upper = layer_tar(
        [
            symlink("esc", str(arena.outside)),
            opaque("esc"),
            symlink("rel", "../../outside"),
            opaque("rel"),
        ]
    )
    check(arena, upper, "contained", base=lower)
    assert (arena.outside / "dir/keep").exists() and arena.secret.exists()
    assert (arena.root / "real/lower").exists()  # "../.." is the root: still not emptied


# ------------------------------------------------------------------------------ devices


def test_device_node_is_allowed_but_stays_inside(arena: Arena) -> None:
    layer = layer_tar(
        [chardev("dev/mem", 1, 1, mode=0o666), chardev(str(arena.outside / "n"), 1, 3)]
    )
    source = blob_layout(arena, layer)
    with open_image_source(source, limits=SMALL) as src:
        assert src.scan_layer(0).devices == 2
    check(arena, source, "contained")
    assert stat.S_ISCHR(os.lstat(arena.root / "dev/mem").st_mode)
    assert not (arena.outside / "n").exists()


# ------------------------------------------------------------------------------ headers


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.XGLTYPE])
def test_huge_extended_header_is_refused_without_reading_it(arena: Arena, kind: bytes) -> None:
    # Claims 2 GiB; 8 MiB really follow, so tarfile would have had something to read.
    data = raw_tar(header("././@PaxHeader", 2 << 30, kind), bytes(8 << 20))
    started = time.perf_counter()
    check(
        arena,
        blob_layout(arena, data, compress="gzip"),
        "refused",
        match="claims 2147483648",
        limits=ImportLimits(max_header_bytes=64 << 10),
    )
    assert time.perf_counter() - started < 5


def test_oversized_real_pax_header(arena: Arena) -> None:
    evil = file("x", b"x", xattrs={"user.big": b"v" * (100 << 10)})
    check(arena, layer_tar([evil]), "refused", match="extended tar header")


def test_entry_count_bomb(arena: Arena) -> None:
    layer = layer_tar([file(f"f{i}") for i in range(150)])
    limits = ImportLimits(max_entries=100)
    check(arena, layer, "refused", match="more than 100 entries", limits=limits)


def test_decompression_bomb(arena: Arena) -> None:
    layer = layer_tar([file("zeros", bytes(64 << 20))])  # 64 MiB of zeros: ~64 KiB gzipped
    source = blob_layout(arena, layer, compress="gzip")
    assert sum(p.stat().st_size for p in source.rglob("*") if p.is_file()) < 1 << 20
    check(arena, source, "refused", match="decompresses to more than|exceed")


def test_unknown_member_type(arena: Arena) -> None:
    check(arena, raw_tar(header("vol", 0, b"V")), "refused", match="type")


# ------------------------------------------------------------------------------ integrity


@pytest.mark.parametrize("cut", ["mid-member", "no-end-marker", "mid-header"])
def test_truncated_archive(arena: Arena, cut: str) -> None:
    layer = layer_tar([file("a", b"A" * 3000), file("b", b"B" * 100)])
    ends = {"mid-member": 1500, "no-end-marker": 512 * 9, "mid-header": 512 * 7 + 100}
    truncated = layer[: ends[cut]]
    # The config's diff_id is that of the truncated bytes: the tar itself must show the damage.
    check(arena, blob_layout(arena, truncated), "refused", match=r"truncated|end")
    # As a rootfs tarball, the damage is found when the source is opened.
    path = arena.src / "rootfs.tar"
    path.write_bytes(truncated)
    with pytest.raises(CorruptImageError, match=r"truncated|end"), open_image_source(path):
        pass


def test_wrong_blob_digest(arena: Arena) -> None:
    layer = layer_tar([file("a", b"A" * 100)])
    source = blob_layout(arena, layer)
    blob = source / f"blobs/sha256/{digest(layer).split(':')[1]}"
    data = bytearray(blob.read_bytes())
    data[600] ^= 1  # inside a's data: the tar still parses
    blob.write_bytes(bytes(data))
    check(arena, source, "refused", match="digest")


def test_wrong_diff_id(arena: Arena) -> None:
    layer = layer_tar([file("a", b"A")])
    config = image_config([layer_tar([file("a", b"B")])], {})
    source = blob_layout(arena, layer, compress="gzip", full_config=config)
    check(arena, source, "refused", match="diff_id")


def test_blob_longer_than_manifest_says(arena: Arena) -> None:
    layer = layer_tar([file("a", b"A")])
    source = blob_layout(arena, layer)
    blob = source / f"blobs/sha256/{digest(layer).split(':')[1]}"
    blob.write_bytes(layer + bytes(512))
    check(arena, source, "refused", match="larger than the manifest")


def test_garbage_is_not_an_image(arena: Arena) -> None:
    path = arena.src / "junk.tar.gz"
    path.write_bytes(gzip.compress(os.urandom(4096)))
    with pytest.raises(CorruptImageError), open_image_source(path):
        pass
