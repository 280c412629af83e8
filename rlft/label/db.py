"""Database schema and engine setup for preference collection.

One SQLAlchemy schema serves both back-ends: an embedded SQLite file (the default, zero setup) and PostgreSQL
(``--db postgresql://user:pass@host/db``). The schema is versioned: :data:`MIGRATIONS` maps each version to the
function that brings a database from the previous version to it, and :func:`open_database` applies the missing ones
and refuses a database written by a newer rlft.

Tables:
    * ``examples`` — prompt (chat messages as JSON), response A/B, the models that wrote them, category, and
      ``overlap`` (how many labelers should see the item).
    * ``labelers`` — name, SHA-256 of the access token (the token itself is never stored), admin flag.
    * ``assignments`` — the claim table: ``overlap`` rows ("slots") per example. A slot is free, leased to one
      labeler until ``lease_expires_at``, or completed. Claiming a slot is a compare-and-swap ``UPDATE``, so parallel
      requests can never give one item to more than ``overlap`` labelers; ``UNIQUE(example_id, labeler_id)`` stops
      a labeler from holding two slots of the same item. ``swapped`` records the randomised left/right order the
      labeler saw, so position bias can be measured.
    * ``preferences`` — one vote: choice in terms of the stored A/B (``a``/``b``/``tie``), the displayed side that
      was clicked (``left``/``right``/``tie``), confidence 1–5, reasoning, time spent, timestamps.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 4
READ_ONLY_OPTION = "rlft_read_only"

MAX_ID = 2**63 - 1
"""The largest row id: ids are 64-bit end to end (columns, sequences, the API's bound), so no id the API accepts
overflows a column (a 500) instead of being found or not (a 404)."""
# BIGINT on PostgreSQL (INTEGER is 32-bit there); SQLite's INTEGER is 64-bit already, and an "INTEGER PRIMARY KEY"
# must stay spelled so to remain the rowid alias that assigns ids (a "BIGINT PRIMARY KEY" would never get one)
Id = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    """Naive UTC timestamp (SQLite has no time zones; storing naive UTC keeps both back-ends identical)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SchemaInfo(Base):
    __tablename__ = "schema_info"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Example(Base):
    __tablename__ = "examples"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    # sha256 of the canonical JSON of (prompt, response_a, response_b): re-importing the same file is a no-op.
    content_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    prompt_json: Mapped[str] = mapped_column(Text, nullable=False)
    response_a: Mapped[str] = mapped_column(Text, nullable=False)
    response_b: Mapped[str] = mapped_column(Text, nullable=False)
    model_a: Mapped[str | None] = mapped_column(String(200))
    model_b: Mapped[str | None] = mapped_column(String(200))
    category: Mapped[str | None] = mapped_column(String(200), index=True)
    source: Mapped[str | None] = mapped_column(String(500))
    overlap: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    __table_args__ = (Index("ix_examples_models", "model_a", "model_b"),)


class Labeler(Base):
    __tablename__ = "labelers"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)


class Assignment(Base):
    __tablename__ = "assignments"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    example_id: Mapped[int] = mapped_column(Id, ForeignKey("examples.id", ondelete="CASCADE"), nullable=False)
    slot: Mapped[int] = mapped_column(Integer, nullable=False)
    labeler_id: Mapped[int | None] = mapped_column(Id, ForeignKey("labelers.id"))
    swapped: Mapped[bool] = mapped_column(Boolean, default=False, nullable=False)
    leased_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    __table_args__ = (
        UniqueConstraint("example_id", "slot", name="uq_assignment_slot"),
        # NULL labeler_ids are distinct in both SQLite and PostgreSQL, so free slots do not collide.
        UniqueConstraint("example_id", "labeler_id", name="uq_assignment_labeler"),
        Index("ix_assignments_labeler_done", "labeler_id", "completed_at"),
        # a labeler's examples in id order: "has this labeler touched the example" (the claim) is one lookup and
        # their open examples (progress) a range of their own rows; UNIQUE(example_id, labeler_id) leads with the
        # example, so answering these from it walked the whole index
        Index("ix_assignments_labeler_example", "labeler_id", "example_id"),
        # leased, unfinished slots only (a few per labeler): expired leases are found without reading the others
        Index(
            "ix_assignments_leased",
            "example_id",
            "slot",
            sqlite_where=text("completed_at IS NULL AND labeler_id IS NOT NULL"),
            postgresql_where=text("completed_at IS NULL AND labeler_id IS NOT NULL"),
        ),
        Index("ix_assignments_claimable", "completed_at", "lease_expires_at"),
        Index(
            "ix_assignments_free",
            "example_id",
            "slot",
            sqlite_where=text("labeler_id IS NULL"),
            postgresql_where=text("labeler_id IS NULL"),
        ),
    )


class Preference(Base):
    __tablename__ = "preferences"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(Id, ForeignKey("assignments.id"), unique=True, nullable=False)
    example_id: Mapped[int] = mapped_column(
        Id, ForeignKey("examples.id", ondelete="CASCADE"), nullable=False, index=True
    )
    labeler_id: Mapped[int] = mapped_column(Id, ForeignKey("labelers.id"), nullable=False, index=True)
    choice: Mapped[str] = mapped_column(String(3), nullable=False)  # "a" | "b" | "tie" w.r.t. stored responses
    shown_choice: Mapped[str] = mapped_column(String(5), nullable=False)  # "left" | "right" | "tie" as displayed
    swapped: Mapped[bool] = mapped_column(Boolean, nullable=False)
    confidence: Mapped[int] = mapped_column(Integer, nullable=False)
    reasoning: Mapped[str | None] = mapped_column(Text)
    time_spent_s: Mapped[float | None] = mapped_column(Float)
    shown_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, nullable=False)
    __table_args__ = (UniqueConstraint("example_id", "labeler_id", name="uq_preference_labeler"),)


# the Core tables of the ORM classes, under the short names the queries use
A = Assignment.__table__
E = Example.__table__
L = Labeler.__table__
P = Preference.__table__


def _migrate_to_1(conn: Connection) -> None:
    Base.metadata.create_all(conn)


def _migrate_to_2(conn: Connection) -> None:
    # free slots only: "next free slot in example order" becomes an index range scan instead of a table scan
    for index in Assignment.__table__.indexes:
        if index.name == "ix_assignments_free":
            index.create(conn, checkfirst=True)


# every id column, ranking tables included (they are created on first use, so they may be absent)
ID_COLUMNS: dict[str, tuple[str, ...]] = {
    "examples": ("id",),
    "labelers": ("id",),
    "assignments": ("id", "example_id", "labeler_id"),
    "preferences": ("id", "assignment_id", "example_id", "labeler_id"),
    "ranking_tasks": ("id",),
    "rankings": ("id", "task_id", "labeler_id"),
}


def _migrate_to_3(conn: Connection) -> None:
    # 64-bit ids: PostgreSQL's INTEGER/SERIAL stop at 2**31 - 1 (a larger id from the API was a 500); SQLite's
    # integers are 64-bit already, so there is nothing to change there
    if conn.dialect.name != "postgresql":
        return
    present = set(inspect(conn).get_table_names())
    for table, columns in ID_COLUMNS.items():
        if table not in present:
            continue
        changes = ", ".join(f"ALTER COLUMN {column} TYPE BIGINT" for column in columns)
        conn.execute(text(f"ALTER TABLE {table} {changes}"))
        # a SERIAL's sequence is "AS integer" too; AS bigint also lifts its MAXVALUE to the bigint maximum
        sequence = conn.execute(text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": table}).scalar_one_or_none()
        if sequence:
            conn.execute(text(f"ALTER SEQUENCE {sequence} AS BIGINT"))


PERFORMANCE_INDEXES = ("ix_assignments_labeler_example", "ix_assignments_leased")
"""Added by schema version 4: a labeler's own examples in order, and the leased slots (see :class:`Assignment`)."""


def _migrate_to_4(conn: Connection) -> None:
    # without these, at 100k examples the progress counts and the expired-lease search read a large part of the
    # slots on every request; CREATE INDEX if not there yet (checkfirst), on both back-ends
    for index in Assignment.__table__.indexes:
        if index.name in PERFORMANCE_INDEXES:
            index.create(conn, checkfirst=True)
    conn.exec_driver_sql("ANALYZE assignments")


# version -> migration from version-1; append new entries (never edit old ones) when the schema changes.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    1: _migrate_to_1,
    2: _migrate_to_2,
    3: _migrate_to_3,
    4: _migrate_to_4,
}


class SchemaVersionError(RuntimeError):
    """The database was written by a newer rlft than this one."""


def normalise_url(url: str) -> str:
    """Turn what a user types for ``--db`` into an SQLAlchemy URL.

    A bare path (``labels.db``) means an SQLite file; ``postgresql://`` selects the psycopg 3 driver, which is the
    one rlft's ``ui`` extra installs.
    """
    if "://" not in url:
        return f"sqlite:///{url}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy's "begin" hook issue BEGIN itself (pysqlite would otherwise defer it past our reads).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
        cur.execute("PRAGMA busy_timeout=30000")  # wait for the write lock instead of failing at once
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # IMMEDIATE takes the write lock up front: a read-then-write transaction can then never fail with
        # SQLITE_BUSY half-way (the lock upgrade deadlock of DEFERRED transactions), it just waits its turn.
        # Read-only work (see read_only) uses a plain BEGIN: WAL readers never wait for the writer.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY_OPTION) else "BEGIN IMMEDIATE")


def read_only(engine: Engine, *, one_statement: bool = False) -> Connection:
    """A connection for queries that write nothing (on SQLite it does not queue behind writers).

    ``one_statement``: the work is a single statement, which is atomic by itself, so on a database server it runs
    without BEGIN/ROLLBACK (two round trips fewer per call).
    """
    conn = engine.connect().execution_options(**{READ_ONLY_OPTION: True})
    if one_statement and engine.dialect.name != "sqlite":
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
    return conn


def make_engine(url: str) -> Engine:
    """Create an engine for ``url`` (a path or an SQLAlchemy URL) with settings that are safe under concurrency."""
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8)
        _configure_sqlite(engine)
        return engine
    # No JIT: it pays off for long analytic queries, not for these millisecond ones, and PostgreSQL's cost estimates
    # of the per-row index probes (see rlft.label.queries.progress) start it, ~25 ms of compiling per request.
    return create_engine(url, pool_size=16, max_overflow=16, pool_pre_ping=True, connect_args={"options": "-c jit=off"})


def schema_version(conn: Connection) -> int:
    """The schema version stored in the database (0 for an empty database)."""
    if not inspect(conn).has_table(SchemaInfo.__tablename__):
        return 0
    version = conn.execute(select(SchemaInfo.version).where(SchemaInfo.id == 1)).scalar_one_or_none()
    return int(version or 0)


def upgrade(engine: Engine) -> int:
    """Apply every migration the database lacks; return the resulting version."""
    with engine.begin() as conn:
        current = schema_version(conn)
        if current > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"database schema version {current} is newer than this rlft supports ({SCHEMA_VERSION}); "
                "upgrade rlft or use another --db"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version](conn)
        if current < SCHEMA_VERSION:
            table = SchemaInfo.__table__
            if current == 0:
                conn.execute(table.insert().values(id=1, version=SCHEMA_VERSION, updated_at=utcnow()))
            else:
                conn.execute(table.update().where(table.c.id == 1).values(version=SCHEMA_VERSION, updated_at=utcnow()))
    return SCHEMA_VERSION


def open_database(url: str) -> Engine:
    """Engine for ``url`` with the schema created or migrated to :data:`SCHEMA_VERSION`."""
    from sqlalchemy import exc
    from sqlalchemy.engine import make_url

    try:
        engine = make_engine(url)
        upgrade(engine)
    except (exc.ArgumentError, exc.NoSuchModuleError) as error:
        raise ValueError(f"--db {url}: not a SQLite file path or a database URL SQLAlchemy knows ({error})") from None
    except exc.DBAPIError as error:  # not a database file, a folder, an unreachable or refusing server
        try:
            shown = make_url(normalise_url(url)).render_as_string(hide_password=True)
        except exc.ArgumentError:
            shown = url
        reason = " ".join(str(error.orig).split())
        raise ConnectionError(f"--db {shown}: cannot open the labeling database ({reason})") from None
    return engine
