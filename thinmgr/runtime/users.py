"""The container user, looked up in the container's own /etc/passwd and /etc/group.

Parsed by hand, never through ``pwd``/``grp``: those go through the host's NSS modules, which
would be loaded from inside the container's root after pivot_root. The rules are Docker's
(moby/sys/user ``GetExecUser``): ``name``, ``uid``, ``name:group``, ``uid:gid``; a numeric uid
missing from passwd is allowed (gid 0, HOME /), a missing name is an error; the supplementary
groups are those of /etc/group listing the user.
"""

from __future__ import annotations

from dataclasses import dataclass

from thinmgr.errors import UsageError

MAX_ID = 2**32 - 2  # (uid_t)-1 is "no change" to setresuid


@dataclass(frozen=True)
class Credentials:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    name: str | None


def _read_table(path: str) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    return [line.split(":") for line in lines if line and not line.startswith("#")]


def _numeric(text: str) -> int | None:
    if not text.isdigit():
        return None
    value = int(text)
    if value > MAX_ID:
        raise UsageError(f"user or group id {text} is out of range")
    return value


def resolve(
    spec: str | None, *, passwd: str = "/etc/passwd", group: str = "/etc/group"
) -> Credentials:
    """Credentials for ``--user`` (None: root) from the tables of the current root."""
    user_part, _, group_part = (spec or "0").partition(":")
    if not user_part:
        raise UsageError(f"bad --user {spec!r}", hint="Use NAME, UID, NAME:GROUP or UID:GID.")
    users = [fields for fields in _read_table(passwd) if len(fields) >= 7]
    uid = _numeric(user_part)
    entry = next(
        (f for f in users if (f[2] == user_part if uid is not None else f[0] == user_part)), None
    )
    if entry is None and uid is None:
        raise UsageError(
            f"unable to find user {user_part}: no matching entries in passwd file",
            hint="Give a numeric --user UID[:GID], or add the user to the image's /etc/passwd.",
        )
    if entry is not None:
        uid = int(entry[2])
        gid = _numeric(entry[3]) or 0
        home, name = entry[5] or "/", entry[0]
    else:
        assert uid is not None
        gid, home, name = 0, "/", None
    groups_table = [fields for fields in _read_table(group) if len(fields) >= 3]
    if group_part:
        wanted = _numeric(group_part)
        if wanted is None:
            match = next((g for g in groups_table if g[0] == group_part), None)
            if match is None or _numeric(match[2]) is None:
                raise UsageError(
                    f"unable to find group {group_part}: no matching entries in group file"
                )
            wanted = int(match[2])
        gid = wanted
    supplementary = [gid]
    if name is not None and not group_part:
        for fields in groups_table:
            members = fields[3].split(",") if len(fields) > 3 else []
            number = _numeric(fields[2])
            if name in members and number is not None and number not in supplementary:
                supplementary.append(number)
    return Credentials(uid=uid, gid=gid, groups=tuple(supplementary), home=home, name=name)
