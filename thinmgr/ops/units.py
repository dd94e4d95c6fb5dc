"""Sizes as people type them: ``4M``, ``1G``, ``512K``, ``1.5GiB``, ``4096``, ``2048s``."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from thinmgr.errors import UsageError

# Binary multiples, as LVM and the thin tools read them; "s" is a 512-byte sector.
_UNITS = {
    "": 1,
    "b": 1,
    "s": 512,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional K/M/G/T/P/E suffix (powers of 1024,
    optionally followed by ``B`` or ``iB``), ``s`` for 512-byte sectors, or plain bytes."""
    match = _SIZE.match(text)
    hint = "Write a size such as 4096, 512K, 4M, 1.5G or 2048s (sectors); units are 1024-based."
    if match is None or (match.group(2).lower() not in _UNITS):
        raise UsageError(f"{text!r} is not a size", hint=hint)
    try:
        number = Decimal(match.group(1))
    except InvalidOperation:
        raise UsageError(f"{text!r} is not a size", hint=hint) from None
    value = number * _UNITS[match.group(2).lower()]
    if value != value.to_integral_value():
        raise UsageError(f"{text!r} is not a whole number of bytes", hint=hint)
    return int(value)


def format_size(nbytes: int) -> str:
    """The largest binary unit that keeps the number whole-ish: ``4 MiB``, ``1.5 GiB``."""
    for suffix, factor in (
        ("EiB", 1 << 60),
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ):
        if nbytes >= factor:
            return f"{nbytes / factor:.4g} {suffix}"
    return f"{nbytes} B"
