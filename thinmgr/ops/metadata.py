"""Use cases over a metadata file or device: open it for the format code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from thinmgr.format.btree import Reporter, _raise
from thinmgr.format.metadata import ThinMetadata
from thinmgr.ops.sources import MetadataFile


@contextlib.contextmanager
def open_metadata(
    path: str, *, snap: bool | int = False, report: Reporter = _raise
) -> Iterator[ThinMetadata]:
    """The metadata at ``path`` (live view, or the held snapshot with ``snap``)."""
    with MetadataFile(path) as source:
        yield ThinMetadata(source, snap=snap, report=report)
