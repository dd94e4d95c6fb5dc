"""The ``PoolSpec`` an engine gets for a catalog pool: one rule for every caller.

Both the catalog models (``Pool``) and the fast sqlite3 reader's rows (``PoolRow``) carry the
same column names, so both go through ``spec_of``; this module stays free of SQLAlchemy, for
the read-only commands that avoid importing it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from thinmgr.engine.base import NoSpacePolicy, PoolSpec


class PoolColumns(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def metadata_path(self) -> str: ...
    @property
    def data_path(self) -> str: ...
    @property
    def data_block_sectors(self) -> int: ...
    @property
    def low_water_blocks(self) -> int: ...
    @property
    def no_space_policy(self) -> str: ...


def run_dir_of(home: Path, pool: str) -> Path:
    """Where the pool's run-time state lives (locks, the user engine's server, volumes)."""
    return home / "run" / pool


def spec_of(home: Path, pool: PoolColumns) -> PoolSpec:
    return PoolSpec(
        name=pool.name,
        metadata=Path(pool.metadata_path),
        data=Path(pool.data_path),
        run_dir=run_dir_of(home, pool.name),
        data_block_sectors=pool.data_block_sectors,
        low_water_mark=pool.low_water_blocks,
        # The catalog's enumeration and the engine's share their values.
        no_space=NoSpacePolicy(str(pool.no_space_policy)),
    )
