"""What a metadata check finds: problems with a severity, and summary figures.

Severities follow thin_check (format section 11): a FATAL problem means the kernel or the
tools would misread the metadata; a NON_FATAL one wastes space or breaks a rule the kernel
tolerates (a leaked block, an under-full node), and ``--ignore-non-fatal-errors`` accepts it.
WARNING is ours: facts worth telling that no thin_check version fails on (summary hints such
as the one-block discrepancy thin_restore 0.9.0 leaves behind, section 13.4 item 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from thinmgr.errors import CorruptMetadataError
from thinmgr.format.btree import Reporter

# Hostile metadata can produce a problem per block; beyond this many the rest are counted.
MAX_LISTED_PROBLEMS = 2000


class Severity(StrEnum):
    FATAL = "fatal"
    NON_FATAL = "non-fatal"
    WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    severity: Severity
    structure: str
    message: str
    block: int | None = None

    def __str__(self) -> str:
        where = self.structure if self.block is None else f"{self.structure}, block {self.block}"
        return f"{self.severity.value}: {where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity.value,
            "structure": self.structure,
            "block": self.block,
            "message": self.message,
        }


class Problems:
    """Collects problems, keeping memory bounded whatever the metadata looks like."""

    def __init__(self) -> None:
        self.listed: list[Problem] = []
        self.counts = dict.fromkeys(Severity, 0)

    def add(
        self, severity: Severity, structure: str, message: str, block: int | None = None
    ) -> None:
        self.counts[severity] += 1
        if len(self.listed) < MAX_LISTED_PROBLEMS:
            self.listed.append(Problem(severity, structure, message, block))

    def fatal(self, structure: str, message: str, block: int | None = None) -> None:
        self.add(Severity.FATAL, structure, message, block)

    def non_fatal(self, structure: str, message: str, block: int | None = None) -> None:
        self.add(Severity.NON_FATAL, structure, message, block)

    def warning(self, structure: str, message: str, block: int | None = None) -> None:
        self.add(Severity.WARNING, structure, message, block)

    def from_error(self, error: CorruptMetadataError) -> None:
        # An under-full node is readable; thin_check 1.x stops reporting it under
        # --ignore-non-fatal-errors, so it is non-fatal here (section 3.5 item 4).
        severity = (
            Severity.NON_FATAL if error.reason.startswith("too few entries") else Severity.FATAL
        )
        self.add(severity, error.structure or "metadata", error.reason, error.block)

    @property
    def reporter(self) -> Reporter:
        return self.from_error


@dataclass(frozen=True)
class CheckOptions:
    """The options of thin_check (section 11.1)."""

    super_block_only: bool = False
    skip_mappings: bool = False  # walk the top level of the mapping tree only
    metadata_snap: bool | int = False  # check only the held snapshot (True, or its block)
    ignore_non_fatal: bool = False


DEFAULT_OPTIONS = CheckOptions()


@dataclass
class CheckSummary:
    transaction_id: int | None = None
    time: int | None = None
    needs_check: bool | None = None
    metadata_snap: int | None = None
    metadata_blocks: int | None = None
    metadata_blocks_free: int | None = None
    data_blocks: int | None = None
    data_blocks_free: int | None = None
    devices: int | None = None
    mappings: int | None = None


@dataclass
class CheckReport:
    options: CheckOptions
    problems: list[Problem] = field(default_factory=list)
    counts: dict[Severity, int] = field(default_factory=lambda: dict.fromkeys(Severity, 0))
    summary: CheckSummary = field(default_factory=CheckSummary)
    stages: list[str] = field(default_factory=list)
    # Set by the caller that opened the source: block 0 failed and the file starts like XML.
    looks_like_xml: bool = False

    @property
    def fatal(self) -> int:
        return self.counts[Severity.FATAL]

    @property
    def non_fatal(self) -> int:
        return self.counts[Severity.NON_FATAL]

    @property
    def warnings(self) -> int:
        return self.counts[Severity.WARNING]

    @property
    def unlisted(self) -> int:
        return sum(self.counts.values()) - len(self.problems)

    @property
    def clean(self) -> bool:
        """thin_check's verdict: no errors, or only non-fatal ones and they are ignored."""
        if self.fatal:
            return False
        return self.non_fatal == 0 or self.options.ignore_non_fatal

    def as_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "problems": [p.as_dict() for p in self.problems],
            "problem_counts": {s.value: n for s, n in self.counts.items()},
            "summary": asdict(self.summary),
        }


def looks_like_xml(head: bytes) -> bool:
    """Whether the start of a file looks like thin_dump XML rather than binary metadata."""
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    return text.startswith((b"<?xml", b"<superblock", b"<!--"))
