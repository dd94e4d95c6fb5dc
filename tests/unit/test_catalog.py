"""The catalog: schema brought up to date on first use, pragmas in effect, constraints that
reject what would make it lie, models and migrations in agreement, and clear errors for a
catalog thinmgr cannot use."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from thinmgr.catalog import db, migrate
from thinmgr.catalog.db import (
    SCHEMA_HEAD,
    Catalog,
    CatalogCorruptError,
    CatalogTooNewError,
    open_catalog,
)
from thinmgr.catalog.models import (
    Base,
    Device,
    DeviceKind,
    NoSpacePolicy,
    Pool,
    PoolEngine,
    PoolState,
    Step,
    StepState,
)
from thinmgr.errors import BusyError, ExitCode, IOFailure, PermissionDenied

REPO = Path(__file__).resolve().parents[2]
TABLES = {"pools", "devices", "layers", "images", "containers", "steps"}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def catalog(home: Path) -> Iterator[Catalog]:
    with open_catalog(home) as opened:
        yield opened


def a_pool(name: str = "p1", **overrides: Any) -> Pool:
    values: dict[str, Any] = {
        "name": name,
        "engine": PoolEngine.USER,
        "data_path": f"/var/lib/thinmgr/{name}.data",
        "metadata_path": f"/var/lib/thinmgr/{name}.meta",
        "data_block_sectors": 128,
    }
    values.update(overrides)
    return Pool(**values)


def a_device(pool: Pool, thin_id: int, name: str, **overrides: Any) -> Device:
    values: dict[str, Any] = {
        "pool": pool,
        "thin_id": thin_id,
        "name": name,
        "kind": DeviceKind.VOLUME,
        "virtual_size_bytes": 1 << 30,
    }
    values.update(overrides)
    return Device(**values)


def table_names(catalog: Catalog) -> set[str]:
    return set(sa.inspect(catalog.engine).get_table_names())


# --- opening ---------------------------------------------------------------------------------


def test_fresh_home_gets_the_schema_at_head(home: Path) -> None:
    with open_catalog(home) as catalog:
        assert catalog.revision() == SCHEMA_HEAD
        assert table_names(catalog) == TABLES | {"alembic_version"}
    assert catalog.path == home / "catalog.db"
    assert home.stat().st_mode & 0o777 == 0o700


def test_schema_head_constant_is_the_head_of_the_migrations() -> None:
    # open_catalog skips Alembic when the catalog is at SCHEMA_HEAD: a new revision must
    # move the constant too, or catalogs would never be upgraded to it.
    assert migrate.head_revision() == SCHEMA_HEAD


def test_opening_twice_is_idempotent_and_keeps_the_rows(home: Path) -> None:
    with open_catalog(home) as catalog, catalog.write() as session:
        session.add(a_pool())
    with open_catalog(home) as catalog, catalog.read() as session:
        assert catalog.revision() == SCHEMA_HEAD
        assert session.scalars(sa.select(Pool.name)).all() == ["p1"]


def test_an_up_to_date_catalog_opens_without_importing_alembic(home: Path) -> None:
    open_catalog(home).close()
    script = (
        "import sys; from pathlib import Path; from thinmgr.catalog.db import open_catalog;"
        f"open_catalog(Path({str(home)!r})).close();"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"


def test_two_processes_creating_one_catalog_at_once_both_succeed(home: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from thinmgr.catalog.db import open_catalog;"
        "c = open_catalog(Path(sys.argv[1])); print(c.revision()); c.close()"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(home)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(3)
    ]
    for run in runs:
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0, err
        assert out.strip() == SCHEMA_HEAD


# --- pragmas ---------------------------------------------------------------------------------


def pragma(session: sa.orm.Session, name: str) -> object:
    return session.execute(sa.text(f"PRAGMA {name}")).scalar()


def test_wal_busy_timeout_foreign_keys_and_synchronous_are_in_effect(catalog: Catalog) -> None:
    for context in (catalog.read, catalog.write):
        with context() as session:
            assert pragma(session, "journal_mode") == "wal"
            assert pragma(session, "busy_timeout") == 5000
            assert pragma(session, "foreign_keys") == 1
            assert pragma(session, "synchronous") == 1  # NORMAL


def test_a_second_writer_waits_then_gets_a_busy_error(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "BUSY_TIMEOUT_MS", 200)
    catalog.engine.dispose()  # new connections take the shorter timeout
    other = open_catalog(catalog.path.parent)
    try:
        with other.write() as holder:
            holder.add(a_pool("held"))
            holder.flush()
            started = time.monotonic()
            with pytest.raises(BusyError, match="locked") as caught, catalog.write() as session:
                session.add(a_pool("blocked"))
            assert 0.15 < time.monotonic() - started < 3
        assert caught.value.exit_code == ExitCode.BUSY
    finally:
        other.close()


# --- what the schema refuses -------------------------------------------------------------------


@contextmanager
def refused(catalog: Catalog, constraint: str) -> Iterator[sa.orm.Session]:
    with pytest.raises(IntegrityError, match=constraint), catalog.write() as session:
        yield session


def test_rows_round_trip_with_enums_and_aware_utc_times(catalog: Catalog) -> None:
    with catalog.write() as session:
        pool = a_pool()
        session.add(pool)
        session.add(a_device(pool, 0, "base"))
    with catalog.read() as session:
        stored = session.scalars(sa.select(Pool)).one()
        assert stored.engine is PoolEngine.USER
        assert stored.state is PoolState.CREATING
        assert stored.no_space_policy is NoSpacePolicy.ERROR
        assert stored.transaction_id == 0
        assert stored.next_device_id == 0
        assert stored.created_at.tzinfo is UTC
        assert abs((datetime.now(UTC) - stored.created_at).total_seconds()) < 60
        raw = session.execute(sa.text("SELECT engine, state FROM pools")).one()
        assert tuple(raw) == ("user", "creating")
        assert [d.name for d in stored.devices] == ["base"]


def test_duplicate_names_are_refused(catalog: Catalog) -> None:
    with catalog.write() as session:
        session.add(a_pool("p1"))
    with refused(catalog, "UNIQUE constraint failed: pools.name") as session:
        session.add(a_pool("p1"))


def test_thin_ids_and_device_names_are_unique_per_pool_only(catalog: Catalog) -> None:
    with catalog.write() as session:
        one, two = a_pool("one"), a_pool("two")
        session.add_all([a_device(one, 1, "vol"), a_device(two, 1, "vol")])
    with refused(catalog, "devices.pool_id, devices.thin_id") as session:
        pool = session.scalars(sa.select(Pool).where(Pool.name == "one")).one()
        session.add(a_device(pool, 1, "other"))
    with refused(catalog, "devices.pool_id, devices.name") as session:
        pool = session.scalars(sa.select(Pool).where(Pool.name == "one")).one()
        session.add(a_device(pool, 2, "vol"))


@pytest.mark.parametrize(
    ("column", "value", "constraint"),
    [
        ("engine", "lvm", "ck_pools_engine"),
        ("no_space_policy", "retry", "ck_pools_no_space_policy"),
        ("state", "zombie", "ck_pools_state"),
        ("data_block_sectors", 64, "ck_pools_data_block_sectors"),
        ("data_block_sectors", 200, "ck_pools_data_block_sectors"),
        ("next_device_id", 1 << 25, "ck_pools_next_device_id"),
        ("name", "", "ck_pools_name_not_empty"),
    ],
)
def test_bad_pool_values_are_refused_by_the_database(
    catalog: Catalog, column: str, value: object, constraint: str
) -> None:
    # Raw SQL: the models would refuse a bad enum value before it reached the database, but
    # the schema must hold on its own (hand edits, other tools, future bugs).
    row = {
        "name": "p",
        "engine": "user",
        "data_path": "/d",
        "metadata_path": "/m",
        "data_block_sectors": 128,
        "low_water_blocks": 0,
        "no_space_policy": "error",
        "state": "active",
        "transaction_id": 0,
        "next_device_id": 0,
        "created_at": "2024-01-01 00:00:00",
    }
    row[column] = value
    columns = ", ".join(row)
    params = ", ".join(f":{key}" for key in row)
    with refused(catalog, f"CHECK constraint failed: {constraint}") as session:
        session.execute(sa.text(f"INSERT INTO pools ({columns}) VALUES ({params})"), row)


def test_the_models_refuse_an_unknown_enum_value_too(catalog: Catalog) -> None:
    with (
        pytest.raises(sa.exc.StatementError, match="'zombie' is not a valid"),
        catalog.write() as session,
    ):
        session.add(a_pool(state="zombie"))


def test_the_pending_transaction_id_only_moves_forward(catalog: Catalog) -> None:
    with refused(catalog, "ck_pools_pending_transaction_id") as session:
        session.add(a_pool(transaction_id=5, pending_transaction_id=5))
    with catalog.write() as session:
        session.add(a_pool(transaction_id=5, pending_transaction_id=6))


def test_thin_device_ids_are_24_bits(catalog: Catalog) -> None:
    with catalog.write() as session:
        session.add(a_device(a_pool(), (1 << 24) - 1, "last"))
    with refused(catalog, "ck_devices_thin_id") as session:
        session.add(a_device(a_pool("p2"), 1 << 24, "too-far"))


def test_orphan_foreign_keys_are_refused(catalog: Catalog) -> None:
    with refused(catalog, "FOREIGN KEY constraint failed") as session:
        session.execute(
            sa.text(
                "INSERT INTO devices (pool_id, thin_id, name, kind, virtual_size_bytes,"
                " read_only, state, created_at)"
                " VALUES (999, 0, 'orphan', 'volume', 512, 0, 'inactive', '2024-01-01')"
            )
        )


def test_a_pool_with_devices_cannot_be_deleted(catalog: Catalog) -> None:
    with catalog.write() as session:
        session.add(a_device(a_pool(), 0, "vol"))
    with refused(catalog, "FOREIGN KEY constraint failed") as session:
        session.execute(sa.text("DELETE FROM pools"))


def test_deleting_an_origin_keeps_its_snapshots(catalog: Catalog) -> None:
    # dm-thin snapshots share blocks but do not depend on the origin device.
    with catalog.write() as session:
        pool = a_pool()
        origin = a_device(pool, 0, "origin")
        session.add(a_device(pool, 1, "snap", kind=DeviceKind.SNAPSHOT, origin=origin))
    with catalog.write() as session:
        session.execute(sa.delete(Device).where(Device.name == "origin"))
    with catalog.read() as session:
        snap = session.scalars(sa.select(Device)).one()
        assert (snap.name, snap.origin_id) == ("snap", None)


def test_steps_are_written_ahead_then_confirmed(catalog: Catalog) -> None:
    with catalog.write() as session:
        pool = a_pool()
        step = Step(pool=pool, kind="create_thin", payload={"thin_id": 0}, transaction_id=1)
        session.add(step)
        session.flush()
        step_id = step.id
        assert step.state is StepState.PENDING
    with refused(catalog, "ck_steps_finished_iff_not_pending") as session:
        session.get_one(Step, step_id).state = StepState.DONE  # done, but no finish time
    with catalog.write() as session:
        confirmed = session.get_one(Step, step_id)
        confirmed.state = StepState.DONE
        confirmed.finished_at = datetime.now(UTC)
    with catalog.read() as session:
        done = session.get_one(Step, step_id)
        assert (done.state, done.payload) == (StepState.DONE, {"thin_id": 0})


# --- models and migrations ----------------------------------------------------------------------


def schema_differences(engine: sa.Engine) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "render_as_batch": True}
        )
        return list(compare_metadata(context, Base.metadata))


def reflected_checks_and_foreign_keys(engine: sa.Engine) -> dict[str, Any]:
    """What Alembic's comparison leaves out: CHECK constraints and ON DELETE actions."""
    inspector = sa.inspect(engine)
    found: dict[str, Any] = {}
    for table in sorted(TABLES):
        checks = {
            c["name"]: " ".join(c["sqltext"].split())
            for c in inspector.get_check_constraints(table)
        }
        fks = {
            fk["name"]: (
                tuple(fk["constrained_columns"]),
                fk["referred_table"],
                fk["options"].get("ondelete"),
            )
            for fk in inspector.get_foreign_keys(table)
        }
        found[table] = (checks, fks)
    return found


def expected_checks_and_foreign_keys() -> dict[str, Any]:
    expected: dict[str, Any] = {}
    for table in sorted(TABLES):
        model = Base.metadata.tables[table]
        checks = {
            str(c.name): " ".join(str(c.sqltext).split())
            for c in model.constraints
            if isinstance(c, sa.CheckConstraint)
        }
        fks = {
            str(fk.name): (tuple(fk.column_keys), fk.referred_table.name, fk.ondelete)
            for fk in model.foreign_key_constraints
        }
        expected[table] = (checks, fks)
    return expected


def test_models_and_migrations_agree(catalog: Catalog) -> None:
    assert schema_differences(catalog.engine) == []
    assert reflected_checks_and_foreign_keys(catalog.engine) == expected_checks_and_foreign_keys()


def test_downgrade_to_base_and_upgrade_again(catalog: Catalog) -> None:
    with catalog.write() as session:
        session.add(a_pool())
    migrate.downgrade(catalog.engine, "base")
    assert table_names(catalog) == {"alembic_version"}
    assert catalog.revision() is None
    migrate.upgrade(catalog.engine, "head")
    assert catalog.revision() == SCHEMA_HEAD
    assert schema_differences(catalog.engine) == []
    with catalog.read() as session:
        assert pragma(session, "foreign_keys") == 1  # switched back on after the migration


def test_the_alembic_command_line_works_from_any_directory(home: Path, tmp_path: Path) -> None:
    open_catalog(home).close()
    ini = REPO / "migrations" / "alembic.ini"
    for args in (["current"], ["check"]):
        result = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ini), "-x", f"home={home}", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        output = result.stdout + result.stderr
        assert f"{SCHEMA_HEAD} (head)" in output or "No new upgrade operations" in output


# --- catalogs thinmgr cannot use ------------------------------------------------------------------


def test_a_catalog_from_a_newer_thinmgr_is_refused(home: Path) -> None:
    with open_catalog(home) as catalog, catalog.write() as session:
        session.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(CatalogTooNewError, match=r"'9999_future'.*newer thinmgr") as caught:
        open_catalog(home)
    assert caught.value.exit_code == ExitCode.UNSUPPORTED
    assert "Upgrade thinmgr" in caught.value.hint
    with open_catalog(home, upgrade=False) as catalog:
        assert catalog.revision() == "9999_future"  # left as it was


def test_a_corrupted_catalog_file_is_reported(home: Path) -> None:
    home.mkdir(mode=0o700)
    (home / "catalog.db").write_bytes(os.urandom(8192))
    with pytest.raises(
        CatalogCorruptError, match=r"catalog .* is (corrupted|unreadable)"
    ) as caught:
        open_catalog(home)
    assert caught.value.exit_code == ExitCode.IO_ERROR
    assert "backup" in caught.value.hint


def test_a_foreign_sqlite_database_is_not_taken_for_a_catalog(home: Path) -> None:
    home.mkdir(mode=0o700)
    engine = sa.create_engine(f"sqlite:///{home / 'catalog.db'}")
    with engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE notes (body TEXT)")
    engine.dispose()
    with pytest.raises(CatalogCorruptError, match="not a thinmgr catalog"):
        open_catalog(home)


@contextmanager
def unprivileged() -> Iterator[None]:
    """Drop the effective uid to nobody (as root, permissions would not apply)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unwritable_home_is_a_permission_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)
    locked.chmod(0o555)
    with pytest.raises(PermissionDenied, match="not writable") as caught, unprivileged():
        open_catalog(locked / "home")
    assert caught.value.exit_code == ExitCode.PERMISSION
    assert int(caught.value.exit_code) == 77
    assert "--home" in caught.value.hint


def test_a_home_that_is_a_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(IOFailure, match="not a directory"):
        open_catalog(tmp_path / "file")
