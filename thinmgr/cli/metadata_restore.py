"""`thinmgr metadata restore` (being written)."""

from __future__ import annotations

from thinmgr.cli.metadata import app

__all__ = ["app"]
