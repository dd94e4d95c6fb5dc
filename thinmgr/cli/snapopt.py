"""The ``--metadata-snap[=BLOCK]`` option of thin-provisioning-tools, for typer.

click cannot express an option whose value is optional, so the flag takes a string:
``--metadata-snap`` alone (the held snapshot) is spelled ``-m`` / ``--metadata-snap`` and
``--metadata-snap=BLOCK`` names the block; see ``split_snap_args``.
"""

from __future__ import annotations

from thinmgr.errors import UsageError

HELD = "held"


def parse_snap(value: str | None) -> bool | int:
    """False: the live metadata; True: the held snapshot; int: the snapshot at that block."""
    if value is None:
        return False
    if value == HELD:
        return True
    try:
        block = int(value, 0)
    except ValueError:
        raise UsageError(f"--metadata-snap: {value!r} is not a block number") from None
    if block <= 0:
        raise UsageError("--metadata-snap: the block number must be positive")
    return block


def split_snap_args(args: list[str]) -> list[str]:
    """Rewrite a bare ``-m``/``--metadata-snap`` into ``--metadata-snap=held``."""
    out = []
    for arg in args:
        out.append("--metadata-snap=held" if arg in ("-m", "--metadata-snap") else arg)
    return out
