"""Block checksums: crc32c over bytes 4..4095, XORed with a per-type salt (format section 1.1).

The kernel computes ``crc32c(~0, p, len)`` without the final inversion; the ``crc32c``
package applies it, so one more XOR with 0xFFFFFFFF gives the kernel's value.
"""

from __future__ import annotations

import struct

from crc32c import crc32c

_CSUM = struct.Struct("<I")


def block_checksum(block: bytes | bytearray | memoryview, salt: int) -> int:
    """The checksum the kernel stores at offset 0 of a block of this type."""
    return crc32c(block[4:]) ^ 0xFFFFFFFF ^ salt


def stored_checksum(block: bytes | bytearray | memoryview) -> int:
    return int(_CSUM.unpack_from(block, 0)[0])


def checksum_ok(block: bytes | bytearray | memoryview, salt: int) -> bool:
    return stored_checksum(block) == block_checksum(block, salt)


def seal(block: bytearray, salt: int) -> None:
    """Write the checksum of ``block`` into its first four bytes."""
    _CSUM.pack_into(block, 0, block_checksum(block, salt))
