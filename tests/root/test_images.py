"""Images on the real user engine (root tier): import from every source kind, layer sharing by
chain id, `image tree`/`image rm`, cleanup of a failed import, and `commit`.

Everything goes through the CLI in subprocesses (``Env`` of test_manager_user.py, which also
fails a test that leaves a mount, loop device, FUSE server or link behind).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.root.test_layers import volume_sha
from tests.root.test_manager_user import Env, run
from tests.root.test_manager_user import env as env  # noqa: PLC0414 (the fixture)
from tests.support.busybox import populate_rootfs
from tests.support.images import (
    BUSYBOX_CONFIG,
    busybox_image,
    busybox_layers,
    directory,
    file,
    layer_tar,
    rootfs_tarball,
    write_oci_layout,
)
from thinmgr.format.ls import device_usage
from thinmgr.ops.images import list_images
from thinmgr.ops.listings import list_volumes
from thinmgr.ops.manager import open_manager
from thinmgr.ops.metadata import open_metadata

pytestmark = pytest.mark.root

KINDS = ("oci-layout", "oci-archive", "docker-archive", "docker-archive-25")
SIZE = "256M"  # a small base layer keeps mkfs and the pool files small


def thin_ids(env: Env, pool: str) -> set[int]:
    """Thin ids in the pool's committed metadata (what `thinmgr metadata ls` lists); read
    in-process, with no volume active (the user engine's server is gone then)."""
    with open_manager(env.home) as mgr:
        metadata = mgr.find(pool).spec.metadata
    with open_metadata(str(metadata)) as md:
        return {usage.dev for usage in device_usage(md, sharing=False)}


def layer_devices(env: Env, pool: str) -> dict[str, dict[str, Any]]:
    """The pool's layer devices (as `volume list` reads them, in-process: fewer CLI runs)."""
    return {v.name: v.as_dict() for v in list_volumes(env.home, pool) if v.kind == "layer"}


def image_refs(env: Env) -> set[str]:
    with open_manager(env.home) as mgr:
        return {image.ref for image in list_images(mgr)}


def import_image(env: Env, pool: str, ref: str, source: Path) -> Any:
    return env.json("image", "import", pool, ref, source, "--size", SIZE)


class Mounted:
    """A layer device activated (read-only, as layers are) and mounted read-only."""

    def __init__(self, env: Env, pool: str, device: str) -> None:
        self.env, self.pool, self.device = env, pool, device

    def __enter__(self) -> Path:
        link = self.env.cli("volume", "activate", self.pool, self.device).stdout.strip()
        self.point = self.env.root / "mnt" / self.device
        self.point.mkdir(parents=True, exist_ok=True)
        run("mount", "-o", "ro", link, self.point)
        self.env.mounts.append(self.point)
        return self.point

    def __exit__(self, *exc: object) -> None:
        self.env.umount(self.point)
        self.env.cli("volume", "deactivate", self.pool, self.device)


def change_sha(env: Env, pool: str, device: str) -> str:
    """The commit diff id of a parentless layer, recomputed from the oracle's view: every
    mapping of the device in `pool dump`'s thin_dump XML, runs merged when contiguous in both
    virtual and data blocks, their data read from the pool's data file."""
    import struct
    import xml.etree.ElementTree as ET

    info = env.json("volume", "show", pool, device)
    root = ET.fromstring(env.cli("pool", "dump", pool).stdout)
    block_size = int(root.attrib["data_block_size"]) * 512
    device_xml = next(d for d in root.iter("device") if int(d.attrib["dev_id"]) == info["dev_id"])
    runs: list[list[int]] = []
    for m in device_xml:
        if m.tag == "single_mapping":
            begin, data, length = int(m.attrib["origin_block"]), int(m.attrib["data_block"]), 1
        else:
            begin, data = int(m.attrib["origin_begin"]), int(m.attrib["data_begin"])
            length = int(m.attrib["length"])
        last = runs[-1] if runs else None
        if last and last[0] + last[1] == begin and last[2] + last[1] == data:
            last[1] += length
        else:
            runs.append([begin, length, data])
    digest = hashlib.sha256(b"thinmgr-change-v1\0")
    digest.update(struct.pack("<QQ", block_size, info["size"]))
    data_path = env.home / "pools" / pool / "data"
    with open(data_path, "rb") as data_file:
        for begin, length, data in runs:
            digest.update(b"W" + struct.pack("<QQ", begin, length))
            data_file.seek(data * block_size)
            digest.update(data_file.read(length * block_size))
    return digest.hexdigest()


def test_import_every_source_kind_and_check_the_tree(env: Env, tmp_path: Path) -> None:
    pool = env.pool_name("k")
    env.cli("pool", "create", pool, "--size", "1G", "--engine", "user")
    sources = {kind: busybox_image(tmp_path / f"bb-{kind}", kind) for kind in KINDS}
    first = import_image(env, pool, "bb:oci-layout", sources.pop("oci-layout"))
    assert (first["layers_imported"], first["layers_shared"]) == (2, 0)
    image = first["image"]
    assert image["config"]["Cmd"] == ["/bin/sh"] and image["source"].startswith("oci-layout:")
    assert [la["diff_id"] for la in image["layers"]] == [
        "sha256:" + hashlib.sha256(layer).hexdigest() for layer in busybox_layers(True)
    ]
    for kind, source in sources.items():
        again = import_image(env, pool, f"bb:{kind}", source)
        # The same layers, whatever the container format: shared by chain id.
        assert (again["layers_imported"], again["layers_shared"]) == (0, 2), kind
        assert again["image"]["layers"] == image["layers"]
    flat = import_image(env, pool, "flat", rootfs_tarball(tmp_path / "flat.tar.zst", "zstd"))
    assert flat["image"]["source"].startswith("rootfs-tar:")
    assert len(layer_devices(env, pool)) == 3  # two busybox layers and the flat one

    top = image["layers"][1]["device"]
    assert layer_devices(env, pool)[top]["read_only"] is True
    with Mounted(env, pool, top) as root:
        assert not (root / "etc" / "motd").exists()  # whiteout
        assert sorted(os.listdir(root / "var" / "cache" / "x")) == ["c"]  # opaque
        assert (root / "etc" / "hello").read_text() == "hello\n"
        assert os.access(root / "bin" / "busybox", os.X_OK)
        assert not (root / "lost+found").exists()
    with Mounted(env, pool, image["layers"][0]["device"]) as root:
        assert (root / "etc" / "motd").read_text() == "welcome\n"
        assert sorted(os.listdir(root / "var" / "cache" / "x")) == ["a", "b"]

    assert env.cli("image", "import", pool, "bb:oci-layout", tmp_path / "flat.tar.zst",
                   check=False).returncode == 4  # fmt: skip
    listed = {i["ref"] for i in env.json("image", "list")}
    assert listed == {f"bb:{kind}" for kind in KINDS} | {"flat:latest"}
    shown = env.json("image", "show", "bb:docker-archive")
    assert [la["chain_id"] for la in shown["layers"]] == [la["chain_id"] for la in image["layers"]]
    (tree,) = env.json("image", "tree", pool)
    assert len(tree["layers"]) == 2  # two roots: busybox bottom, flat
    assert "Traceback" not in env.cli("image", "tree").stdout


def test_shared_bottom_layer_tree_and_rm(env: Env, tmp_path: Path) -> None:
    pool = env.pool_name("s")
    env.cli("pool", "create", pool, "--size", "1G", "--engine", "user")
    bottom, _ = busybox_layers(True)
    tools = layer_tar(
        [
            directory("usr/local"),
            directory("usr/local/bin"),
            file("usr/local/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755),
            file("data.bin", os.urandom(1 << 20)),
        ]
    )
    a = import_image(env, pool, "app:a", busybox_image(tmp_path / "a", "oci-layout"))
    b_src = write_oci_layout(tmp_path / "b", [bottom, tools], BUSYBOX_CONFIG, compress="")
    b = import_image(env, pool, "app:b", b_src)
    assert (b["layers_imported"], b["layers_shared"]) == (1, 1)
    base_a, base_b = a["image"]["layers"][0], b["image"]["layers"][0]
    assert base_a == base_b  # the same device, imported once
    with Mounted(env, pool, b["image"]["layers"][1]["device"]) as root:
        mode = (root / "usr/local/bin/tool").stat().st_mode
        assert mode & stat.S_ISUID and stat.S_IMODE(mode) == 0o4755
        assert not (root / "etc" / "hello").exists() and (root / "etc" / "motd").exists()

    (tree,) = env.json("image", "tree", pool)
    (root_node,) = tree["layers"]
    assert root_node["chain_id"] == base_a["chain_id"] and root_node["images"] == []
    assert sorted(c["images"][0] for c in root_node["children"]) == ["app:a", "app:b"]
    assert root_node["shared_bytes"] > 0 and root_node["mapped_bytes"] > 0
    big = next(c for c in root_node["children"] if c["images"] == ["app:b"])
    assert big["exclusive_bytes"] >= 1 << 20  # its own megabyte of random data
    assert "app:a" in env.cli("image", "tree").stdout

    ids = {la["device"]: la["thin_id"] for la in [*a["image"]["layers"], *b["image"]["layers"]]}
    assert set(ids.values()) <= thin_ids(env, pool)
    gone = env.json("image", "rm", "app:a")
    assert gone["removed_layers"] == [a["image"]["layers"][1]["chain_id"]]
    assert gone["kept_layers"] == {base_a["chain_id"]: "used by image app:b"}
    assert ids[a["image"]["layers"][1]["device"]] not in thin_ids(env, pool)
    assert set(layer_devices(env, pool)) == {base_a["device"], b["image"]["layers"][1]["device"]}

    gone = env.json("image", "rm", "app:b")
    assert len(gone["removed_layers"]) == 2 and gone["kept_layers"] == {}
    assert layer_devices(env, pool) == {} and thin_ids(env, pool) == set()
    assert image_refs(env) == set() and env.json("image", "tree", pool)[0]["layers"] == []
    assert env.cli("image", "rm", "app:b", check=False).returncode == 3


def test_a_failed_import_leaves_nothing(env: Env, tmp_path: Path) -> None:
    pool = env.pool_name("f")
    env.cli("pool", "create", pool, "--size", "1G", "--engine", "user")
    bottom, _ = busybox_layers(True)
    keep_src = write_oci_layout(tmp_path / "k", [bottom], {})
    keep = env.json("image", "import", pool, "keep", keep_src, "--size", "48M")
    base = keep["image"]["layers"][0]["device"]
    before, base_sha = thin_ids(env, pool), volume_sha(env, pool, base)

    # Second layers that pass every check but do not fit the file system: they fail while
    # being applied, after the import made devices: a new base (removed again), or a shared
    # one (left as it was).
    huge = layer_tar([file("huge.bin", os.urandom(48 << 20))])
    top = layer_tar([file("top", b"x")])
    own = write_oci_layout(tmp_path / "own", [layer_tar([file("own", b"1")]), huge, top], {})
    on_shared = write_oci_layout(tmp_path / "shared", [bottom, huge, top], {})
    for source, size in ((own, ["--size", "32M"]), (on_shared, [])):
        failed = env.cli("image", "import", pool, "bad", source, *size, check=False)
        assert failed.returncode == 6, failed.stderr  # NoSpaceError
        assert "Traceback" not in failed.stderr
        assert thin_ids(env, pool) == before
    assert volume_sha(env, pool, base) == base_sha

    # A damaged second layer blob is found before anything is created.
    damaged = write_oci_layout(tmp_path / "dmg", [bottom, top], {}, compress="")
    blob = damaged / "blobs" / "sha256" / hashlib.sha256(top).hexdigest()
    data = bytearray(blob.read_bytes())
    data[600] ^= 0xFF
    blob.write_bytes(bytes(data))
    refused = env.cli("image", "import", pool, "dmg", damaged, check=False)
    assert refused.returncode == 7 and "Traceback" not in refused.stderr, refused.stderr

    assert thin_ids(env, pool) == before
    assert set(layer_devices(env, pool)) == {base}
    assert image_refs(env) == {"keep:latest"}
    assert not list((env.home / "run" / pool).glob("layer-*"))  # no mount point left


def test_commit_a_volume_and_move_the_layer(env: Env, tmp_path: Path) -> None:
    a, b = env.pool_name("a"), env.pool_name("b")
    for pool in (a, b):
        env.cli("pool", "create", pool, "--size", "512M", "--engine", "user")
    env.cli("volume", "create", a, "work", "--size", "64M")
    link = env.cli("volume", "activate", a, "work").stdout.strip()
    # A busybox tree in it, so that a container can run on the volume rebuilt from its layers.
    run("mkfs.ext4", "-q", "-d", populate_rootfs(tmp_path / "tree"), link)
    point = env.mount(link, "work")
    (point / "note").write_text("committed\n")
    # Committed while mounted: the file system is frozen around the snapshot.
    first = env.json("commit", f"{a}/work", "work:1")
    (point / "later").write_text("not in work:1\n")
    env.umount(point)
    env.cli("volume", "deactivate", a, "work")
    assert first["parent_chain_id"] is None and not first["shared"]
    layer = first["image"]["layers"][0]
    assert layer["diff_id"] == first["chain_id"] == layer["digest"]
    # The diff id is the sha256 of the change (block size, volume size, runs and their data),
    # recomputed here from the committed layer's own device: a 64 MiB volume of 64 KiB blocks.
    assert layer["digest"] == "sha256:" + change_sha(env, a, layer["device"])
    with Mounted(env, a, layer["device"]) as root:
        assert (root / "note").read_text() == "committed\n"
        assert not (root / "later").exists()

    # A container-like child of the layer, changed and committed: a 2-layer image.
    env.cli("snapshot", a, layer["device"], "child")
    link = env.cli("volume", "activate", a, "child").stdout.strip()
    point = env.mount(link, "child")
    (point / "note").write_text("changed\n")
    env.umount(point)
    env.cli("volume", "deactivate", a, "child")
    second = env.json("commit", f"{a}/child", "work:2")
    assert second["parent_chain_id"] == first["chain_id"]
    assert second["image"]["layers"][0]["chain_id"] == first["chain_id"]
    top = second["image"]["layers"][1]
    assert top["diff_id"] != top["chain_id"]
    assert env.cli("commit", f"{a}/child", "work:2", check=False).returncode == 4
    assert env.cli("commit", f"{a}/nope", "work:3", check=False).returncode == 3

    # Export the committed layers and rebuild them on another pool: byte-identical.
    out = tmp_path / "out"
    out.mkdir()
    base_file = env.json("layer", "export", a, layer["device"], "-o", out / "base.thindiff")
    top_file = env.json(
        "layer", "export", a, top["device"], "--parent", layer["device"], "-o", out / "top"
    )
    env.json("layer", "import", b, base_file["file"], "base")
    env.json("layer", "import", b, top_file["file"], "top", "--parent", "base")
    assert volume_sha(env, a, layer["device"]) == volume_sha(env, b, "base")
    assert volume_sha(env, a, top["device"]) == volume_sha(env, b, "top")
    # A container on the rebuilt volume sees the committed files.
    seen = env.cli("run", "--rm", f"{b}/top", "--", "/bin/busybox", "cat", "/note").stdout
    assert seen == "changed\n"

    # rm keeps the layer the `child` snapshot was made from.
    gone = env.json("image", "rm", "work:2")
    assert gone["removed_layers"] == [top["chain_id"]] and gone["kept_layers"] == {
        first["chain_id"]: "used by image work:1"
    }
    env.cli("volume", "remove", a, "child")
    gone = env.json("image", "rm", "work:1")
    assert gone["removed_layers"] == [first["chain_id"]]
    assert {v.name for v in list_volumes(env.home, a)} == {"work"}


def test_commit_of_a_live_file_system_leaves_deleted_data_out(env: Env) -> None:
    """A mounted source is trimmed (FITRIM) before its snapshot: blocks of deleted files are
    unmapped, so the layer carries live data only (without the trim: 72 MiB more here)."""
    pool = env.pool_name("trim")
    env.cli("pool", "create", pool, "--size", "512M", "--engine", "user")
    env.cli("volume", "create", pool, "work", "--size", "128M")
    link = env.cli("volume", "activate", pool, "work").stdout.strip()
    run("mkfs.ext4", "-q", "-E", "nodiscard", link)
    point = env.mount(link, "work")
    chunk = os.urandom(4 << 20)
    for number in range(20):  # 80 MiB written, 4 MiB of it kept
        path = point / f"f{number}"
        with open(path, "wb") as f:
            f.write(chunk)
            os.fsync(f.fileno())
    for number in range(19):
        (point / f"f{number}").unlink()
    os.sync()
    try:
        before = usage(env, pool, "work")
        assert before >= 80 << 20  # ext4 freed the blocks; the thin device still maps them
        committed = env.json("commit", f"{pool}/work", "trimmed:1")
        assert committed["trimmed_bytes"] >= 76 << 20
        assert committed["data_bytes"] < 16 << 20  # f19 + journal + metadata
        layer = committed["image"]["layers"][0]["device"]
        with Mounted(env, pool, layer) as root:
            assert (root / "f19").read_bytes() == chunk
            assert not (root / "f0").exists()
    finally:
        env.umount(point)
        env.cli("volume", "deactivate", pool, "work")


def usage(env: Env, pool: str, volume: str) -> int:
    """Bytes the volume maps, from the pool's committed metadata (`volume show`)."""
    return int(env.json("volume", "show", pool, volume)["mapped_bytes"])


def test_commit_of_a_stopped_container_leaves_its_deleted_files_out(
    env: Env, tmp_path: Path
) -> None:
    """Install-then-clean-up committed after the exit: the disk is mounted on the host just
    to be trimmed, so the layer holds what was kept, not the 32 MiB that was deleted."""
    pool = env.pool_name("stop")
    env.cli("pool", "create", pool, "--size", "1G", "--engine", "user")
    import_image(env, pool, "bb", rootfs_tarball(tmp_path / "bb.tar"))
    work = (
        "for i in 1 2 3 4 5 6 7 8; do dd if=/dev/urandom of=/cache$i bs=1M count=4 2>/dev/null;"
        " done; sync; rm /cache*; echo kept >/kept"
    )
    env.cli("run", "--name", "build", "bb", "--", "sh", "-c", work)
    try:
        device = "ctr-build"
        assert usage(env, pool, device) >= 32 << 20  # the deleted files are still mapped
        committed = env.json("commit", "build", "bb:built")
        assert committed["trimmed_bytes"] >= 32 << 20
        assert committed["data_bytes"] < 4 << 20
        seen = env.cli("run", "--rm", "bb:built", "--", "cat", "/kept").stdout
        assert seen == "kept\n"
        # Left as it was found: inactive, and not mounted anywhere.
        volume = env.json("volume", "show", pool, device)
        assert volume["state"] == "inactive", volume
        assert not list((env.home / "run" / pool).glob("layer-*"))  # no mount point left
    finally:
        env.cli("rm", "build")
