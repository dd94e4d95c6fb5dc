"""Kernel module metadata and load order, without kmod: the guest has no modprobe.

Each ``.ko`` carries an ELF section ``.modinfo`` of NUL-separated ``key=value`` strings; its
``depends=`` (hard dependencies, comma-separated) and ``softdep=pre: ...`` entries give the
order in which ``insmod`` must load them (kernel-lab.md §3.2).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# modprobe resolves these softdep names through module aliases; the guest has none, so map
# them here (kernel-lab.md §3.2: libcrc32c and jbd2 want crc32c, provided by crc32c_generic).
SOFTDEP_ALIASES = {"crc32c": "crc32c_generic", "crypto-crc32c": "crc32c_generic"}


def module_name(name: str) -> str:
    """The kernel's canonical module name: '-' and '_' are the same, '_' is canonical."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class ModInfo:
    name: str
    depends: tuple[str, ...] = ()
    softdep_pre: tuple[str, ...] = ()


def elf_section(image: bytes, wanted: str) -> bytes | None:
    """The contents of section ``wanted`` of a little-endian ELF64 file, or None."""
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    (shoff,) = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        (name_off,) = struct.unpack_from("<I", image, base)
        offset, size = struct.unpack_from("<QQ", image, base + 0x18)
        return name_off, offset, size

    _, str_off, str_size = header(shstrndx)
    names = image[str_off : str_off + str_size]
    for index in range(shnum):
        name_off, offset, size = header(index)
        end = names.find(b"\0", name_off)
        if names[name_off:end].decode(errors="replace") == wanted:
            return image[offset : offset + size]
    return None


def parse_modinfo(image: bytes, fallback_name: str) -> ModInfo:
    """Read a module's name, depends and pre-softdeps from its ``.modinfo`` section."""
    section = elf_section(image, ".modinfo") or b""
    fields: dict[str, list[str]] = {}
    for raw in section.split(b"\0"):
        key, sep, value = raw.decode(errors="replace").partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    depends = [d for v in fields.get("depends", []) for d in v.split(",") if d]
    soft: list[str] = []
    for value in fields.get("softdep", []):
        # "pre: a b post: c": only the names after "pre:" and before the next "post:".
        section_name = ""
        for word in value.split():
            if word.endswith(":"):
                section_name = word[:-1]
            elif section_name == "pre":
                soft.append(word)
    name = fields.get("name", [fallback_name])[0]
    return ModInfo(
        module_name(name),
        tuple(module_name(d) for d in depends),
        tuple(module_name(SOFTDEP_ALIASES.get(s, s)) for s in soft),
    )


class ModuleOrderError(ValueError):
    pass


def load_order(wanted: Iterable[str], lookup: Callable[[str], ModInfo | None]) -> list[str]:
    """Names in an order where every module follows its dependencies (depth-first).

    ``lookup`` gives a module's info by canonical name (None: not available), e.g. a
    dict's ``get``; it is called only for the modules needed.

    A missing hard dependency or a cycle is an error; a missing softdep is skipped, as
    modprobe does (it may be built into the kernel).
    """
    order: list[str] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(name: str, required_by: str | None) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise ModuleOrderError(f"module dependency cycle: {cycle}")
        info = lookup(name)
        if info is None:
            who = f" (needed by {required_by})" if required_by else ""
            raise ModuleOrderError(f"kernel module {name} not found{who}")
        visiting.append(name)
        for soft in info.softdep_pre:
            if lookup(soft) is not None:
                visit(soft, name)
        for dep in info.depends:
            visit(dep, name)
        visiting.pop()
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(module_name(name), None)
    return order
