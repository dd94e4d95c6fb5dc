"""The guest's serial console: lines, markers and what they tell (kernel-lab.md §3.6).

Kernel messages share the console with the command's output, so markers are matched with
anchored regular expressions on whole lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

PHASE = re.compile(r"^LAB_T (\S+) (\d+(?:\.\d+)?)$")
EXIT = re.compile(r"^LAB_EXIT=(\d+)$")


@dataclass
class ConsoleLine:
    host_time: float  # seconds since qemu started
    text: str


@dataclass
class ConsoleState:
    """What the markers seen so far say."""

    phases: dict[str, float] = field(default_factory=dict)  # phase -> host seconds
    guest_uptime: dict[str, float] = field(default_factory=dict)  # phase -> guest uptime
    exit_code: int | None = None

    def feed(self, line: ConsoleLine) -> bool:
        """Record a marker; True if the line was one (and is not command output)."""
        if match := PHASE.match(line.text):
            self.phases[match.group(1)] = line.host_time
            self.guest_uptime[match.group(1)] = float(match.group(2))
            return True
        if match := EXIT.match(line.text):
            self.exit_code = int(match.group(1))
            return True
        return False


class LineSplitter:
    """Bytes from the serial port to text lines: split at \\n, drop \\r (the tty's onlcr)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[str]:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        return [self._decode(line) for line in lines]

    def flush(self) -> list[str]:
        rest, self._pending = self._pending, b""
        return [self._decode(rest)] if rest else []

    @staticmethod
    def _decode(line: bytes) -> str:
        return line.replace(b"\r", b"").decode(errors="replace")
