"""`thinmgr metadata check` (being written)."""

from __future__ import annotations

from thinmgr.cli.metadata import app

__all__ = ["app"]
