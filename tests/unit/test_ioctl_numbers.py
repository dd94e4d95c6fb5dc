"""ioctl request numbers written as constants agree with the kernel's _IOWR encoding.

asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr, dir 3 = read|write. The
constants are spelled out in the modules (as strace prints them); this recomputes them.
"""

from __future__ import annotations

from thinmgr.kernel import freeze, trim


def iowr(kind: str, number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord(kind) << 8) | number


def test_freeze_and_thaw_are_iowr_x_119_and_120_of_an_int() -> None:
    assert iowr("X", 119, 4) == freeze.FIFREEZE
    assert iowr("X", 120, 4) == freeze.FITHAW


def test_fitrim_is_iowr_x_121_of_struct_fstrim_range() -> None:
    assert trim.FSTRIM_RANGE.size == 24  # three __u64: start, len, minlen
    assert iowr("X", 121, trim.FSTRIM_RANGE.size) == trim.FITRIM
