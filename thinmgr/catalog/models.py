"""The catalog's tables as SQLAlchemy 2 typed models.

The catalog is thinmgr's memory of what it asked the engines to do: pools, the thin devices in
them, the image layers those devices hold, containers, and a write-ahead journal of engine
steps. It is never the source of truth about the metadata itself (the pool is); it records
intent and outcome so that a crash between the two can be found and repaired
(ARCHITECTURE.md, "Catalog"; prior-art.md section 3, items 3 and 4).

Constraints live in the schema, not only in the code above it, so that a bug or a hand edit
cannot make the catalog lie quietly: enumerations are CHECK constraints, names are unique
where users address things by name, and every reference is a foreign key (SQLite enforces
them because every connection sets ``PRAGMA foreign_keys=ON``, see ``db.py``).

Any change here needs a new Alembic revision in ``migrations/versions``; the test
``test_models_and_migrations_agree`` fails until there is one.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from thinmgr.format.constants import MAX_DATA_BLOCK_SECTORS, MAX_DEV_ID, MIN_DATA_BLOCK_SECTORS

# Deterministic constraint names: Alembic's batch mode on SQLite recreates tables and needs
# names to find constraints again, and the migration must name them exactly as the models do.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NAME_LENGTH = 128
PATH_LENGTH = 4096  # PATH_MAX on Linux
DIGEST_LENGTH = 135  # "sha512:" + 128 hex digits, the longest digest OCI allows today


class PoolEngine(enum.StrEnum):
    USER = "user"
    KERNEL = "kernel"


class NoSpacePolicy(enum.StrEnum):
    """What the pool does when data space runs out (dm-thin's ``error_if_no_space`` or not).

    ``error`` is thinmgr's default: queueing IO on a full pool hung processes for good in
    Docker and Qubes (prior-art.md section 3, item 1).
    """

    ERROR = "error"
    QUEUE = "queue"


class PoolState(enum.StrEnum):
    CREATING = "creating"
    INACTIVE = "inactive"
    ACTIVE = "active"
    DELETING = "deleting"
    FAILED = "failed"


class DeviceKind(enum.StrEnum):
    VOLUME = "volume"
    SNAPSHOT = "snapshot"
    LAYER = "layer"
    CONTAINER = "container"


class DeviceState(enum.StrEnum):
    CREATING = "creating"
    INACTIVE = "inactive"
    ACTIVE = "active"
    DELETING = "deleting"
    FAILED = "failed"


class ContainerState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"


class StepState(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


def _one_of(column: str, values: type[enum.StrEnum]) -> str:
    """SQL for a CHECK that ``column`` holds one of an enumeration's values."""
    listed = ", ".join(f"'{member.value}'" for member in values)
    return f"{column} IN ({listed})"


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and read back as an aware UTC ``datetime``.

    SQLite has no time zones; storing local times would make two hosts (or a DST change)
    disagree about the order of journal steps.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("catalog timestamps must be timezone-aware")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


E = TypeVar("E", bound=enum.StrEnum)


class EnumText(TypeDecorator[E]):
    """An enumeration stored as its text value (kept honest by a CHECK on the table).

    Text rather than SQLAlchemy's ``Enum`` type: a new value then needs only a new CHECK,
    and anyone reading the database with ``sqlite3`` sees plain words.
    """

    impl = String(16)
    cache_ok = True

    def __init__(self, values: type[E]) -> None:
        super().__init__()
        self.values = values

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.values(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.values(value)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {  # noqa: RUF012 (SQLAlchemy reads it as a class attr)
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[str]: JSON(),
    }


class Pool(Base):
    """A thin pool: a data area, a metadata area, and the counters thinmgr owns for it."""

    __tablename__ = "pools"
    __table_args__ = (
        CheckConstraint(_one_of("engine", PoolEngine), name="engine"),
        CheckConstraint(_one_of("no_space_policy", NoSpacePolicy), name="no_space_policy"),
        CheckConstraint(_one_of("state", PoolState), name="state"),
        CheckConstraint("name <> ''", name="name_not_empty"),
        # dm-thin accepts 64 KiB .. 1 GiB in multiples of 64 KiB (dm-thin-format.md, section 2).
        CheckConstraint(
            f"data_block_sectors BETWEEN {MIN_DATA_BLOCK_SECTORS} AND {MAX_DATA_BLOCK_SECTORS}"
            f" AND data_block_sectors % {MIN_DATA_BLOCK_SECTORS} = 0",
            name="data_block_sectors",
        ),
        CheckConstraint("low_water_blocks >= 0", name="low_water_blocks"),
        CheckConstraint("transaction_id >= 0", name="transaction_id"),
        # Two-phase transaction id: the pending value is recorded before the engine is told,
        # and it can only move forward (prior-art.md section 6, item 1).
        CheckConstraint(
            "pending_transaction_id IS NULL OR pending_transaction_id > transaction_id",
            name="pending_transaction_id",
        ),
        # Thin device ids are 24 bits (dm-thin-format.md, section 4.2); the counter may sit
        # one past the last id, which means the pool is out of ids.
        CheckConstraint(f"next_device_id BETWEEN 0 AND {MAX_DEV_ID + 1}", name="next_device_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    engine: Mapped[PoolEngine] = mapped_column(EnumText(PoolEngine))
    # A file path (file-backed pool) or a block device path.
    data_path: Mapped[str] = mapped_column(String(PATH_LENGTH))
    metadata_path: Mapped[str] = mapped_column(String(PATH_LENGTH))
    data_block_sectors: Mapped[int] = mapped_column(Integer)
    # In data blocks, as the kernel's thin-pool table line takes it.
    low_water_blocks: Mapped[int] = mapped_column(BigInteger, default=0)
    no_space_policy: Mapped[NoSpacePolicy] = mapped_column(
        EnumText(NoSpacePolicy), default=NoSpacePolicy.ERROR
    )
    state: Mapped[PoolState] = mapped_column(EnumText(PoolState), default=PoolState.CREATING)
    # The transaction id the pool's superblock holds when the last step was confirmed.
    transaction_id: Mapped[int] = mapped_column(BigInteger, default=0)
    pending_transaction_id: Mapped[int | None] = mapped_column(BigInteger)
    # Ids are handed out by thinmgr and never reused, even when a create failed half way:
    # a half-created device may still exist in the metadata (prior-art.md section 3, item 3).
    next_device_id: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)

    devices: Mapped[list[Device]] = relationship(back_populates="pool")
    steps: Mapped[list[Step]] = relationship(back_populates="pool", passive_deletes=True)


class Device(Base):
    """A thin device in a pool: a volume, a snapshot, an image layer or a container's disk."""

    __tablename__ = "devices"
    __table_args__ = (
        UniqueConstraint("pool_id", "thin_id"),
        UniqueConstraint("pool_id", "name"),
        CheckConstraint(_one_of("kind", DeviceKind), name="kind"),
        CheckConstraint(_one_of("state", DeviceState), name="state"),
        CheckConstraint("name <> ''", name="name_not_empty"),
        CheckConstraint(f"thin_id BETWEEN 0 AND {MAX_DEV_ID}", name="thin_id"),
        CheckConstraint(
            "virtual_size_bytes > 0 AND virtual_size_bytes % 512 = 0", name="virtual_size_bytes"
        ),
        CheckConstraint("origin_id IS NULL OR origin_id <> id", name="origin_not_self"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="RESTRICT"), index=True)
    thin_id: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    kind: Mapped[DeviceKind] = mapped_column(EnumText(DeviceKind))
    # dm-thin snapshots do not depend on their origin once taken, so deleting the origin
    # only forgets where a snapshot came from.
    origin_id: Mapped[int | None] = mapped_column(
        ForeignKey("devices.id", ondelete="SET NULL"), index=True
    )
    virtual_size_bytes: Mapped[int] = mapped_column(BigInteger)
    read_only: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[DeviceState] = mapped_column(EnumText(DeviceState), default=DeviceState.CREATING)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)

    pool: Mapped[Pool] = relationship(back_populates="devices")
    origin: Mapped[Device | None] = relationship(remote_side=[id])


class Layer(Base):
    """An image layer held by a thin device; ``chain_id`` names the whole stack below it."""

    __tablename__ = "layers"
    __table_args__ = (
        UniqueConstraint("pool_id", "chain_id"),
        CheckConstraint("digest LIKE '%_:_%'", name="digest"),
        CheckConstraint("diff_id LIKE '%_:_%'", name="diff_id"),
        CheckConstraint("chain_id LIKE '%_:_%'", name="chain_id"),
        CheckConstraint("size_bytes >= 0", name="size_bytes"),
        CheckConstraint("parent_id IS NULL OR parent_id <> id", name="parent_not_self"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="RESTRICT"), index=True)
    digest: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    diff_id: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    chain_id: Mapped[str] = mapped_column(String(DIGEST_LENGTH))
    # A layer cannot go while layers are stacked on it.
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("layers.id", ondelete="RESTRICT"), index=True
    )
    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="RESTRICT"), unique=True
    )
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)

    parent: Mapped[Layer | None] = relationship(remote_side=[id])
    device: Mapped[Device] = relationship()


class Image(Base):
    """A named, tagged image: its layers are its top layer and that layer's parents."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("name", "tag"),
        CheckConstraint("name <> ''", name="name_not_empty"),
        CheckConstraint("tag <> ''", name="tag_not_empty"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    tag: Mapped[str] = mapped_column(String(NAME_LENGTH), default="latest")
    # NULL for an image with no layers at all (``scratch``).
    top_layer_id: Mapped[int | None] = mapped_column(
        ForeignKey("layers.id", ondelete="RESTRICT"), index=True
    )
    # The pool holding the image's layers (NULL only for a layerless image).
    pool_id: Mapped[int | None] = mapped_column(
        ForeignKey("pools.id", ondelete="RESTRICT"), index=True
    )
    # The image id: the digest of its OCI/Docker config (or of thinmgr's own for commits).
    digest: Mapped[str | None] = mapped_column(String(DIGEST_LENGTH))
    # What `run` starts by default: the OCI config's Env, Cmd, Entrypoint, WorkingDir, User.
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Where it came from (archive path, "commit of CONTAINER"), for `image show`.
    source: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)

    top_layer: Mapped[Layer | None] = relationship()


class Container(Base):
    """A container: a writable snapshot (its device) and the process run on it."""

    __tablename__ = "containers"
    __table_args__ = (
        CheckConstraint(_one_of("state", ContainerState), name="state"),
        CheckConstraint("name <> ''", name="name_not_empty"),
        CheckConstraint("pid IS NULL OR pid > 0", name="pid"),
        CheckConstraint("state <> 'running' OR pid IS NOT NULL", name="running_has_pid"),
        CheckConstraint(
            "finished_at IS NULL OR state IN ('exited', 'failed')", name="finished_state"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    # The image may be removed while a container made from it lives on its own snapshot.
    image_id: Mapped[int | None] = mapped_column(
        ForeignKey("images.id", ondelete="SET NULL"), index=True
    )
    device_id: Mapped[int] = mapped_column(
        ForeignKey("devices.id", ondelete="RESTRICT"), unique=True
    )
    state: Mapped[ContainerState] = mapped_column(
        EnumText(ContainerState), default=ContainerState.CREATED
    )
    pid: Mapped[int | None] = mapped_column(Integer)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    command: Mapped[list[str]] = mapped_column()
    # What the user asked for (env, workdir, user, hostname, limits, tty, detach, ...).
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What was set up for it (mount point, cgroup paths, log file): what teardown undoes.
    runtime: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()

    image: Mapped[Image | None] = relationship()
    device: Mapped[Device] = relationship()


class Step(Base):
    """One engine step, written ahead as ``pending`` and confirmed as ``done`` or ``failed``.

    A ``pending`` step found by a later command means thinmgr stopped between asking the
    engine and recording the answer; the engine's own state (the pool metadata, its
    transaction id) says whether the step happened (ARCHITECTURE.md, "Catalog").
    """

    __tablename__ = "steps"
    __table_args__ = (
        CheckConstraint(_one_of("state", StepState), name="state"),
        CheckConstraint("kind <> ''", name="kind_not_empty"),
        CheckConstraint(
            "(state = 'pending') = (finished_at IS NULL)", name="finished_iff_not_pending"
        ),
        CheckConstraint("transaction_id IS NULL OR transaction_id >= 0", name="transaction_id"),
        Index("ix_steps_pool_id_state", "pool_id", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)  # also the order of the journal
    pool_id: Mapped[int] = mapped_column(ForeignKey("pools.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[StepState] = mapped_column(EnumText(StepState), default=StepState.PENDING)
    # The pool transaction id this step moves the pool to, for steps that commit metadata.
    transaction_id: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    finished_at: Mapped[datetime | None] = mapped_column()

    pool: Mapped[Pool] = relationship(back_populates="steps")
