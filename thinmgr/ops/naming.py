"""Names of pools and volumes: safe as file names, device-mapper names and in messages.

A pool's name becomes a directory (``HOME/pools/NAME``, ``HOME/run/NAME``) and both names
become parts of device-mapper device names (``thinmgr-POOL-VOLUME``), which the kernel caps at
127 bytes (DM_NAME_LEN 128 with the NUL). So: no path separators, no leading dot (hidden
files, ``..``) or dash (read as an option by every tool), a portable charset, and a length
that keeps the composed name under the kernel's limit.
"""

from __future__ import annotations

import re

from thinmgr.errors import UsageError

# 8 ("thinmgr-") + 56 + 1 + 56 = 121 < 127 (DM_NAME_LEN - 1).
MAX_NAME_LENGTH = 56
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_RULE = (
    "Names start with a letter or digit, then letters, digits, '.', '_', '+' or '-', "
    f"at most {MAX_NAME_LENGTH} characters."
)


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid pool or volume name, else a UsageError that says why."""
    if not name:
        raise UsageError(f"the {kind} name is empty", hint=_RULE)
    if "/" in name or "\\" in name or "\0" in name:
        raise UsageError(f"{kind} name {name!r} contains a path separator", hint=_RULE)
    if name[0] in ".-":
        raise UsageError(f"{kind} name {name!r} starts with {name[0]!r}", hint=_RULE)
    if len(name) > MAX_NAME_LENGTH:
        raise UsageError(
            f"{kind} name {name[:20]!r}... is {len(name)} characters long "
            f"(at most {MAX_NAME_LENGTH})",
            hint=_RULE,
        )
    if _NAME.fullmatch(name) is None:
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "_.+-"))})
        raise UsageError(
            f"{kind} name {name!r} contains {''.join(bad)!r}, which names may not hold",
            hint=_RULE,
        )
    return name
