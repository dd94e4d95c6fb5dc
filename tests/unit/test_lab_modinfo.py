"""Module load order from .modinfo, on synthetic ELF files and module sets."""

from __future__ import annotations

import struct

import pytest

from thinmgr.lab.modinfo import ModInfo, ModuleOrderError, load_order, parse_modinfo


def elf_with_modinfo(modinfo: bytes) -> bytes:
    """A minimal little-endian ELF64 file: null section, .modinfo, .shstrtab."""
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    modinfo_off, shstr_off = body_off, body_off + len(modinfo)
    shoff = shstr_off + len(shstrtab)
    header = b"\x7fELF\x02\x01\x01" + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)

    def section(name: int, offset: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, offset, size, 0, 0, 1, 0)

    sections = section(0, 0, 0) + section(1, modinfo_off, len(modinfo))
    sections += section(10, shstr_off, len(shstrtab))
    return header + modinfo + shstrtab + sections


def test_parse_depends_and_softdeps() -> None:
    image = elf_with_modinfo(
        b"license=GPL\0softdep=pre: crc32c post: foo\0depends=dm-bufio,libcrc32c\0"
        b"name=dm_persistent_data\0vermagic=6.1.0\0"
    )
    info = parse_modinfo(image, "fallback")
    assert info == ModInfo("dm_persistent_data", ("dm_bufio", "libcrc32c"), ("crc32c_generic",))


def test_parse_without_depends_uses_the_file_name() -> None:
    assert parse_modinfo(elf_with_modinfo(b"license=GPL\0"), "dm-mod") == ModInfo("dm_mod")


def test_parse_rejects_non_elf() -> None:
    with pytest.raises(ValueError, match="ELF"):
        parse_modinfo(b"not an elf file at all" * 4, "x")


# The dm-thin part of kernel-lab.md §3.2's table.
MODULES = {
    m.name: m
    for m in [
        ModInfo("dm_bio_prison"),
        ModInfo("dm_mod"),
        ModInfo("dm_bufio", ("dm_mod",)),
        ModInfo("crc32c_generic"),
        ModInfo("libcrc32c", (), ("crc32c_generic",)),
        ModInfo("dm_persistent_data", ("dm_bufio", "libcrc32c")),
        ModInfo("dm_thin_pool", ("dm_bio_prison", "dm_persistent_data", "dm_mod")),
        ModInfo("jbd2", (), ("crc32c_generic", "not_built_as_module")),
    ]
}


def test_every_module_follows_its_dependencies() -> None:
    order = load_order(["dm-thin-pool", "jbd2"], MODULES.get)
    assert sorted(order) == sorted(MODULES)
    for name in order:
        info = MODULES[name]
        for dep in (*info.depends, *info.softdep_pre):
            if dep in MODULES:
                assert order.index(dep) < order.index(name), (dep, name)
    assert order[-1] == "jbd2"


def test_missing_dependency_names_who_needs_it() -> None:
    with pytest.raises(ModuleOrderError, match="dm_mod not found \\(needed by dm_bufio\\)"):
        load_order(["dm_bufio"], {"dm_bufio": MODULES["dm_bufio"]}.get)


def test_cycle_is_an_error() -> None:
    cyclic = {"a": ModInfo("a", ("b",)), "b": ModInfo("b", ("a",))}
    with pytest.raises(ModuleOrderError, match="cycle: a -> b -> a"):
        load_order(["a"], cyclic.get)
