"""Image references as users type them: ``NAME[:TAG]``, checked as Docker checks them.

The grammar is distribution's ``reference`` package (the one Docker and containerd use):
``name := [domain "/"] component ("/" component)*`` with lowercase components separated by
``.``, ``_``, ``__`` or runs of ``-``; a domain may carry a ``:port``; a tag is
``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``. A ``:`` after the last ``/`` starts the tag, so
``localhost:5000/app`` is a name without a tag. Digest references (``@sha256:...``) name
content, not a catalog entry, and are refused. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from thinmgr.errors import UsageError

DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255  # distribution's NameTotalLengthMax; also the catalog column's length

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]+)?"
_NAME = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

_RULE = (
    "An image reference is NAME[:TAG]: NAME is lowercase letters and digits separated by "
    "'.', '_', '__', '-' or '/' (an optional registry host[:port]/ in front), TAG is up to "
    "128 letters, digits, '_', '.' or '-' (default: latest)."
)


@dataclass(frozen=True, order=True)
class ImageRef:
    name: str
    tag: str

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_ref(text: str) -> ImageRef:
    """``NAME[:TAG]`` -> ImageRef; UsageError saying what is wrong otherwise."""
    if not text:
        raise UsageError("the image reference is empty", hint=_RULE)
    if "@" in text:
        raise UsageError(
            f"image reference {text!r} names a digest; thinmgr's images are named NAME:TAG",
            hint=_RULE,
        )
    name, tag = text, DEFAULT_TAG
    colon = text.rfind(":")
    if colon > text.rfind("/"):
        name, tag = text[:colon], text[colon + 1 :]
        if not tag:
            raise UsageError(f"image reference {text!r} ends with ':' (an empty tag)", hint=_RULE)
        if _TAG.fullmatch(tag) is None:
            raise UsageError(f"tag {tag!r} of {text!r} is not a valid tag", hint=_RULE)
    if len(name) > MAX_NAME_LENGTH:
        raise UsageError(
            f"image name {name[:30]!r}... is {len(name)} characters (at most {MAX_NAME_LENGTH})",
            hint=_RULE,
        )
    if _NAME.fullmatch(name) is None:
        why = "has uppercase letters" if name.lower() != name else "is not a valid image name"
        raise UsageError(f"image name {name!r} {why}", hint=_RULE)
    return ImageRef(name, tag)
