"""The listings' fast path: ``catalog.fastread`` (stdlib sqlite3), ``engine.user.quickstatus``
(the superblock) and ``ops.listings``, against the normal path (SQLAlchemy and the engine)."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support import fake_engine
from thinmgr.catalog import db, fastread, models
from thinmgr.catalog.fastread import DeviceRow, PoolRow, column_names, open_reader, read_or_none
from thinmgr.cli.app import run
from thinmgr.engine.user.quickstatus import idle_pool_status
from thinmgr.format.constants import BLOCK_SIZE, NEEDS_CHECK_FLAG
from thinmgr.format.superblock import parse_superblock
from thinmgr.ops import listings
from thinmgr.ops import pools as orm_pools
from thinmgr.ops import volumes as orm_volumes
from thinmgr.ops.manager import open_manager

REPO = Path(__file__).resolve().parents[2]


def cli(home: Path, *args: str) -> None:
    assert run(["--home", str(home), *args]) == 0


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two pools on the fake engine with volumes, snapshots and an origin forgotten."""
    monkeypatch.setenv("THINMGR_ENGINE_FACTORY", fake_engine.FACTORY)
    fake_engine.CRASH.arm(None)
    home = tmp_path / "home"
    cli(home, "pool", "create", "p", "--size", "1G")
    cli(home, "pool", "create", "q", "--size", "1G", "--block-size", "128K")
    cli(home, "pool", "create", "empty", "--size", "1G")
    for name in ("v", "a", "z"):
        cli(home, "volume", "create", "p", name, "--size", "10M")
    cli(home, "volume", "create", "q", "v", "--size", "3G")
    cli(home, "snapshot", "p", "v", "s", "--read-only")
    cli(home, "snapshot", "p", "a", "gone-origin")
    cli(home, "volume", "remove", "p", "a")  # the snapshot forgets its origin
    cli(home, "volume", "activate", "p", "z")
    return home


@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A pool on the real user engine (idle: nothing active, no root needed)."""
    monkeypatch.delenv("THINMGR_ENGINE_FACTORY", raising=False)
    home = tmp_path / "home"
    cli(home, "pool", "create", "u", "--size", "256M", "--engine", "user")
    for index in range(5):
        cli(home, "volume", "create", "u", f"v{index}", "--size", "10M")
    cli(home, "snapshot", "u", "v0", "snap")
    cli(home, "volume", "remove", "u", "v3")
    yield home


def as_dicts(items: list[Any]) -> list[dict[str, Any]]:
    return [item.as_dict() for item in items]


# --- one source of truth for the columns -------------------------------------------------


@pytest.mark.parametrize(
    ("row_type", "model"), [(PoolRow, models.Pool), (DeviceRow, models.Device)]
)
def test_row_fields_are_columns_of_the_models(row_type: Any, model: Any) -> None:
    columns = model.__table__.columns
    for f in dataclasses.fields(row_type):
        assert f.name in columns, f"{row_type.__name__}.{f.name} is not a column of {model}"
        column = columns[f.name]
        python_type = getattr(column.type, "impl", column.type).python_type
        if issubclass(python_type, str) or hasattr(column.type, "values"):
            expected = "str"
        elif python_type is bool:
            expected = "bool"
        elif python_type is datetime:
            expected = "datetime"
        else:
            expected = "int"
        wanted = expected if not column.nullable else f"{expected} | None"
        assert f.type == wanted, f"{row_type.__name__}.{f.name}: {f.type} != {wanted}"
    assert column_names(row_type) == tuple(f.name for f in dataclasses.fields(row_type))


def test_schema_head_is_shared_with_the_orm_path() -> None:
    assert db.SCHEMA_HEAD is fastread.SCHEMA_HEAD
    assert db.CATALOG_FILE == fastread.CATALOG_FILE


# --- the same results ---------------------------------------------------------------------


def test_listings_equal_the_orm_path(fake_home: Path) -> None:
    with open_manager(fake_home) as mgr:
        orm_all = as_dicts(orm_volumes.list_volumes(mgr))
        orm_p = as_dicts(orm_volumes.list_volumes(mgr, "p"))
        orm_pools_list = as_dicts(orm_pools.list_pools(mgr))
        orm_status = orm_pools.pool_status(mgr, "p").as_dict()
    assert read_or_none(fake_home, lambda reader: True) is True  # the fast path answers
    assert as_dicts(listings.list_volumes(fake_home)) == orm_all
    assert as_dicts(listings.list_volumes(fake_home, "p")) == orm_p
    assert as_dicts(listings.list_pools(fake_home)) == orm_pools_list
    assert listings.pool_status(fake_home, "p").as_dict() == orm_status
    # the fixture made what the comparison should cover
    by_name = {v["name"]: v for v in orm_p}
    assert by_name["s"]["origin"] == "v" and by_name["s"]["read_only"] is True
    assert by_name["gone-origin"]["origin"] is None and by_name["z"]["state"] == "active"
    assert [p["volumes"] for p in orm_pools_list] == [0, 4, 1]


def test_unknown_pool_is_the_same_error(fake_home: Path) -> None:
    from thinmgr.errors import NotFoundError

    with pytest.raises(NotFoundError) as fast:
        listings.list_volumes(fake_home, "nope")
    with open_manager(fake_home) as mgr, pytest.raises(NotFoundError) as orm:
        orm_volumes.list_volumes(mgr, "nope")
    assert str(fast.value) == str(orm.value) and fast.value.hint == orm.value.hint
    with pytest.raises(NotFoundError):
        listings.pool_status(fake_home, "nope")


def test_user_pool_status_from_the_superblock_equals_the_engine(user_home: Path) -> None:
    fast = listings.pool_status(user_home, "u").as_dict()
    with open_manager(user_home) as mgr:
        engine = orm_pools.pool_status(mgr, "u").as_dict()
        spec = mgr.find("u").spec
    assert fast == engine
    assert fast["used_metadata_blocks"] > 0 and fast["transaction_id"] == fast["volumes"] + 2
    assert idle_pool_status(spec.metadata, spec.data) is not None  # it came from the superblock
    assert as_dicts(listings.list_volumes(user_home)) == as_dicts(_orm_volumes(user_home))


def _orm_volumes(home: Path) -> list[Any]:
    with open_manager(home) as mgr:
        return orm_volumes.list_volumes(mgr)


def test_the_cli_listings_import_neither_sqlalchemy_nor_numpy(user_home: Path) -> None:
    script = (
        "import json, sys\n"
        "from thinmgr.cli.app import run\n"
        "codes = [run(['--home', sys.argv[1], '--json', *c.split()]) for c in\n"
        "         ('volume list', 'volume list u', 'pool list', 'pool status u')]\n"
        "heavy = sorted(m for m in ('sqlalchemy', 'numpy') if m in sys.modules)\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}), file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THINMGR_ENGINE_FACTORY"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(user_home)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=True,
    )
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result == {"codes": [0, 0, 0, 0], "heavy": []}


# --- falling back to the normal path ------------------------------------------------------


def test_no_catalog_falls_back_and_creates_it(tmp_path: Path) -> None:
    home = tmp_path / "new"
    with open_reader(home) as reader:
        assert reader is None
    assert listings.list_pools(home) == [] and listings.list_volumes(home) == []
    assert (home / db.CATALOG_FILE).is_file()  # made (and migrated) by the normal path
    with open_reader(home) as reader:
        assert reader is not None and reader.pools() == []


@pytest.mark.parametrize("revision", ["0000", None, "two"])
def test_a_schema_not_at_head_falls_back(fake_home: Path, revision: str | None) -> None:
    path = fake_home / db.CATALOG_FILE
    with sqlite3.connect(path) as connection:
        if revision is None:
            connection.execute("DELETE FROM alembic_version")
        elif revision == "two":
            connection.execute("INSERT INTO alembic_version VALUES ('ffff')")
        else:
            connection.execute("UPDATE alembic_version SET version_num = ?", (revision,))
    assert read_or_none(fake_home, lambda reader: reader.pools()) is None


def test_an_unreadable_catalog_falls_back(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / db.CATALOG_FILE).write_bytes(b"not a database" * 1000)
    assert read_or_none(home, lambda reader: reader.pools()) is None
    from thinmgr.catalog.db import CatalogCorruptError

    with pytest.raises(CatalogCorruptError):  # the normal path names the problem
        listings.list_pools(home)


def test_readers_do_not_wait_for_a_writer(fake_home: Path) -> None:
    path = fake_home / db.CATALOG_FILE
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE pools SET transaction_id = transaction_id + 100")
        writer.execute("DELETE FROM devices WHERE name = 'gone-origin'")
        started = time.monotonic()
        names = read_or_none(fake_home, lambda reader: [d.name for d in reader.devices()])
        pools = listings.list_pools(fake_home)
        elapsed = time.monotonic() - started
        assert elapsed < 1.0  # the busy timeout is 5 s: nothing waited
        assert names is not None and "gone-origin" in names  # the last committed state
        assert [p.transaction_id for p in pools] == [0, 6, 1]  # empty, p, q
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_the_reader_cannot_write(fake_home: Path) -> None:
    with open_reader(fake_home) as reader, pytest.raises(sqlite3.OperationalError):
        assert reader is not None
        reader._connection.execute("DELETE FROM devices")
    assert len(listings.list_volumes(fake_home)) == 5


# --- the superblock path declines what the engine must report -----------------------------


def _rewrite_superblock(metadata: Path, **changes: Any) -> None:
    with open(metadata, "r+b") as f:
        sb = parse_superblock(f.read(BLOCK_SIZE), 0)
        f.seek(0)
        f.write(replace(sb, **changes).pack())


def test_quick_status_declines_unusual_pools(user_home: Path) -> None:
    pool_dir = user_home / "pools" / "u"
    metadata, data = pool_dir / "metadata", pool_dir / "data"
    assert idle_pool_status(metadata, data) is not None
    _rewrite_superblock(metadata, flags=NEEDS_CHECK_FLAG)
    assert idle_pool_status(metadata, data) is None
    report = listings.pool_status(user_home, "u")  # the engine's answer: a warning
    assert report.status is None and "NEEDS_CHECK" in report.warnings[0]
    _rewrite_superblock(metadata, flags=0)
    size = data.stat().st_size
    os.truncate(data, size // 2)  # smaller than the data space map
    assert idle_pool_status(metadata, data) is None
    os.truncate(data, size)
    with open(metadata, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)  # checksum no longer verifies
    assert idle_pool_status(metadata, data) is None
    assert idle_pool_status(metadata, pool_dir / "missing") is None
