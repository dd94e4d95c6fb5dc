"""The ext4 layout parser against e2fsprogs, on real mkfs.ext4 images (no root needed).

For each image: the superblock fields equal ``dumpe2fs -h``'s, every group's inode table
starts where ``dumpe2fs`` says, and the byte offset of sampled inodes equals ``debugfs -R
"imap <N>"`` (block and offset). Images cover 1 KiB and 4 KiB blocks, 64bit descriptors,
flex_bg on and off, meta_bg, 128-byte inodes and sparse_super2.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from thinmgr.errors import CorruptMetadataError, UnsupportedError
from thinmgr.layers.ext4_layout import (
    SUPERBLOCK_OFFSET,
    Ext4Layout,
    parse_superblock,
    read_layout,
)

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")

IMAGES = {
    "default-4k": ("256M", ["-g", "8192"]),
    "1k-blocks": ("64M", ["-b", "1024"]),
    "64bit-no-flex": ("256M", ["-O", "64bit,^flex_bg", "-g", "8192"]),
    "meta-bg": ("128M", ["-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode"]),
    "small-inodes": ("64M", ["-I", "128", "-b", "2048"]),
    "sparse-super2": (
        "64M",
        ["-b", "1024", "-g", "512", "-O", "sparse_super2,meta_bg,^resize_inode"],
    ),
}


def run(*args: str | Path) -> str:
    return subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True).stdout


def make_image(tmp_path: Path, name: str) -> Path:
    size, options = IMAGES[name]
    image = tmp_path / f"{name}.img"
    run("truncate", "-s", size, image)
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1", *options, image)
    return image


def layout_of(image: Path) -> Ext4Layout:
    with open(image, "rb") as f:

        def read(offset: int, length: int) -> bytes:
            f.seek(offset)
            return f.read(length)

        return read_layout(read)


def dumpe2fs_header(image: Path) -> dict[str, str]:
    fields = {}
    for line in run("dumpe2fs", "-h", image).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_layout_matches_e2fsprogs(tmp_path: Path, name: str) -> None:
    image = make_image(tmp_path, name)
    layout = layout_of(image)
    sb, header = layout.sb, dumpe2fs_header(image)
    assert sb.block_size == int(header["Block size"])
    assert sb.blocks_count == int(header["Block count"])
    assert sb.inodes_count == int(header["Inode count"])
    assert sb.inodes_per_group == int(header["Inodes per group"])
    assert sb.inode_size == int(header["Inode size"])
    assert sb.first_data_block == int(header["First block"])
    assert sb.blocks_per_group == int(header["Blocks per group"])
    assert sb.group_count > 1  # several groups, so group arithmetic is exercised
    if "meta" in name:  # several meta groups: descriptors spread over the device
        assert sb.group_count > 2 * sb.descs_per_block

    tables = [
        int(m.group(1)) for m in re.finditer(r"Inode table at (\d+)-\d+", run("dumpe2fs", image))
    ]
    assert [t.start // sb.block_size for t in layout.tables] == tables

    ipg = sb.inodes_per_group
    samples = {1, 2, 11, 12, ipg, ipg + 1, ipg * (sb.group_count // 2) + 7, sb.inodes_count}
    for ino in sorted(samples):
        text = run("debugfs", "-R", f"imap <{ino}>", image)
        m = re.search(r"located at block (\d+), offset 0x([0-9a-f]+)", text)
        assert m, text
        expected = int(m.group(1)) * sb.block_size + int(m.group(2), 16)
        assert layout.inode_offset(ino) == expected, ino


def test_inode_ranges(tmp_path: Path) -> None:
    layout = layout_of(make_image(tmp_path, "default-4k"))
    sb, second = layout.sb, layout.tables[1]
    # Exactly the inodes a byte range touches: one partial inode at each end counts.
    start = second.start + 3 * sb.inode_size + 1
    assert layout.inode_ranges(start, start + sb.inode_size) == [
        (second.first_ino + 3, second.first_ino + 5)
    ]
    whole = layout.inode_ranges(0, sb.blocks_count * sb.block_size)
    assert sum(b - a for a, b in whole) == sb.inodes_count
    assert layout.inode_ranges(0, layout.tables[0].start) == []
    with pytest.raises(ValueError):
        layout.inode_offset(0)


def test_bad_superblocks(tmp_path: Path) -> None:
    image = make_image(tmp_path, "1k-blocks")
    raw = bytearray(image.read_bytes()[SUPERBLOCK_OFFSET : SUPERBLOCK_OFFSET + 1024])
    parse_superblock(bytes(raw))
    with pytest.raises(UnsupportedError, match="not an ext2/3/4"):
        parse_superblock(bytes(1024))
    damaged = bytearray(raw)
    damaged[0x28:0x2C] = bytes(4)  # s_inodes_per_group = 0
    with pytest.raises(CorruptMetadataError, match="per group"):
        parse_superblock(bytes(damaged))
    damaged = bytearray(raw)
    damaged[0x18:0x1C] = (9).to_bytes(4, "little")  # a 512 KiB block size
    with pytest.raises(CorruptMetadataError, match="s_log_block_size"):
        parse_superblock(bytes(damaged))
