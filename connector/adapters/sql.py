"""The state database: one SQLAlchemy Core schema and its engine.

SQLite (an embedded file) by default; PostgreSQL for a fleet of connectors
(`[fleet] database_url`), with the same schema and the same code. Every table
of the connector's state is declared here; the modules that own them (`state`,
`runs`, `ledger`, `jobstore`, `fleet`, `sqlqueue`) read and write through a
`Database`. Each write is its own short transaction, unless a caller hands its
connection to another owner to make two writes one transaction.

The schema is kept by Alembic migrations (`connector.adapters.migrations`):
opening a database creates it at the newest revision or upgrades it in place;
a state file made before migrations existed is first brought to the baseline
(revision 0001). A change of the schema is a table or column declared here
plus one new migration file.

A write that reads before it writes runs in `write_tx(key)`: on SQLite an
IMMEDIATE transaction (the database's write lock is taken at its start, so a
second writer waits instead of failing on the upgrade from a read lock), on
PostgreSQL a transaction holding an advisory lock on `key`, so writers of one
key (a run, a VM) take their turns across every connector of a fleet.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection, Engine

from connector.adapters.migrations import SCRIPT_LOCATION
from connector.adapters.migrations.baseline import baseline_metadata

metadata = sa.MetaData()

CHUNK = 500  # values per IN (...) list

servers = sa.Table(
    "servers",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),  # opaque, used in object keys
    sa.Column("vm_uuid", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("ref", sa.String(64), nullable=False),
    sa.Column("datacenter", sa.Text, nullable=False),
    sa.Column("power_state", sa.String(32), nullable=False),
    sa.Column("cbt_enabled", sa.Boolean, nullable=False),
    sa.Column("disks", sa.Text, nullable=False),  # JSON
    sa.Column("snapshots", sa.Text, nullable=False),  # JSON
    sa.Column("seen_at", sa.String(32), nullable=False),
    sa.Column("removed_at", sa.String(32)),
)

disk_state = sa.Table(
    "disk_state",
    metadata,
    sa.Column("server_id", sa.String(40), primary_key=True),
    sa.Column("disk_key", sa.Integer, primary_key=True),
    sa.Column("disk_uuid", sa.String(64)),
    sa.Column("capacity", sa.BigInteger, nullable=False),
    sa.Column("change_id", sa.String(128)),
    sa.Column("last_run_id", sa.String(64), nullable=False),
    sa.Column("chain_length", sa.Integer, nullable=False, default=0),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("server_id", sa.String(40), nullable=False, index=True),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("started_at", sa.String(32), nullable=False),
    sa.Column("finished_at", sa.String(32)),
    sa.Column("error", sa.Text),
    sa.Column("snapshot_name", sa.String(128)),
    sa.Column("snapshot_ref", sa.String(64)),
    sa.Column("stats", sa.Text, nullable=False, default="{}"),
    # job id and scheduled time of an AUTOMATIC run: a slot that fires twice makes one run
    sa.Column("schedule_key", sa.String(128)),
    sa.Index("ix_runs_schedule_key", "schedule_key", unique=True),
)

run_disks = sa.Table(
    "run_disks",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("disk_key", sa.Integer, primary_key=True),
    sa.Column("mode", sa.String(16), nullable=False),  # incremental | full | allocated | compare
    sa.Column("reason", sa.Text),
    sa.Column("capacity", sa.BigInteger, nullable=False),
    sa.Column("change_id_from", sa.String(128)),
    sa.Column("change_id_to", sa.String(128)),
    sa.Column("bytes_changed", sa.BigInteger, nullable=False, default=0),
    sa.Column("bytes_read", sa.BigInteger, nullable=False, default=0),
    sa.Column("bytes_uploaded", sa.BigInteger, nullable=False, default=0),
    sa.Column("blocks_new", sa.Integer, nullable=False, default=0),
    sa.Column("blocks_dedup", sa.Integer, nullable=False, default=0),
    sa.Column("blocks_zero", sa.Integer, nullable=False, default=0),
    sa.Column("manifest_key", sa.Text),
    sa.Column("disk_uuid", sa.String(64)),
    sa.Column("pack_bytes", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("packs", sa.Integer, nullable=False, server_default="0"),
    sa.Column("chain", sa.Integer, nullable=False, server_default="0"),
    sa.Column("merkle_root", sa.String(64)),
)

blocks = sa.Table(
    "blocks",
    metadata,
    sa.Column("block_id", sa.LargeBinary(32), primary_key=True),
    sa.Column("pack_id", sa.String(64), nullable=False),
    sa.Column("offset", sa.BigInteger, nullable=False),
    sa.Column("length", sa.Integer, nullable=False),
)

packs = sa.Table(
    "packs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("run_id", sa.String(64)),
    sa.Column("created_at", sa.String(32), nullable=False),
)

retention = sa.Table(
    "retention",
    metadata,
    sa.Column("server_id", sa.String(40), primary_key=True),
    sa.Column("keep", sa.Integer, nullable=False),  # most recent runs to keep; 0 keeps all
    sa.Column("updated_at", sa.String(32), nullable=False),
)

# The run ledger (connector.adapters.ledger).
run_control = sa.Table(
    "run_control",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(40), index=True),
    sa.Column("seq", sa.Integer, nullable=False, default=0),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("host", sa.Text),
    sa.Column("failed_stage", sa.String(32)),
    sa.Column("failure", sa.Text),
    sa.Column("progress_done", sa.BigInteger, nullable=False, default=0),
    sa.Column("progress_total", sa.BigInteger, nullable=False, default=0),
    sa.Column("detail", sa.Text, nullable=False, default=""),
    sa.Column("updated_at", sa.String(32), nullable=False),
    # The member executing the run's current stage (NULL between stages): the claim
    # that keeps two connectors off one run, and so off one VM (connector.adapters.fleet).
    sa.Column("owner", sa.String(128)),
    sa.Column("owner_since", sa.Float),  # the database's clock, seconds since the epoch
    sa.Column("due_at", sa.Float),  # when the run's next queue task is due (same clock)
)

run_steps = sa.Table(
    "run_steps",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("stage", sa.String(32), primary_key=True),
    sa.Column("disk_key", sa.Integer, primary_key=True),  # -1: the step is not per disk
    sa.Column("result", sa.Text, nullable=False),  # JSON
    sa.Column("done_at", sa.String(32), nullable=False),
)

side_effects = sa.Table(
    "side_effects",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), index=True),
    sa.Column("kind", sa.String(16), nullable=False),  # snapshot | multipart
    sa.Column("target", sa.Text, nullable=False),  # VM instance UUID | object key
    sa.Column("name", sa.Text),  # snapshot name
    sa.Column("ref", sa.Text),  # snapshot ref | multipart upload id
    sa.Column("detail", sa.Text, nullable=False, default="{}"),  # JSON (snapshot disks)
    sa.Column("state", sa.String(16), nullable=False),  # pending | undone | done
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("updated_at", sa.String(32), nullable=False),
    sa.Column("owner", sa.String(128)),  # the member whose upload it is (multipart)
)

# Replication jobs (connector.adapters.jobstore).
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("server_id", sa.String(40), nullable=False, index=True),
    sa.Column("state", sa.String(24), nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, default=False),
    sa.Column("seed_time", sa.String(40), nullable=False),  # ISO 8601, UTC
    sa.Column("frequency_hours", sa.Integer),  # NULL: run once
    sa.Column("retention", sa.Integer, nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("consecutive_failures", sa.Integer, nullable=False, default=0),
    sa.Column("message", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("updated_at", sa.String(32), nullable=False),
    # Retention owed after a completed run, until it is applied (NULL: none owed).
    sa.Column("retention_due", sa.String(40)),  # since when (microseconds: also a token)
    sa.Column("retention_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("retention_next_at", sa.String(40)),  # the next try, ISO 8601 UTC
    sa.Column("retention_error", sa.Text),  # why the last try failed
)

# Fleet mode (connector.adapters.fleet): times are the database's clock, in seconds
# since the epoch, so that members on different machines compare one clock.
members = sa.Table(
    "members",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("version", sa.String(32), nullable=False),
    sa.Column("capabilities", sa.Text, nullable=False),  # JSON list
    sa.Column("started_at", sa.String(32), nullable=False),
    sa.Column("heartbeat", sa.Float, nullable=False),
    sa.Column("stopped", sa.Boolean, nullable=False, server_default=sa.false()),
)

leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),  # scheduler | purge
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("expires", sa.Float, nullable=False),
    sa.Column("since", sa.Float, nullable=False),
)

stage_log = sa.Table(
    "stage_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), nullable=False, index=True),
    sa.Column("server_id", sa.String(40), nullable=False),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("member", sa.String(128), nullable=False),
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("ended", sa.Float),
    sa.Column("outcome", sa.String(16)),  # done | retry | failed | interrupted | lost
)

# The job queue of a fleet (connector.adapters.sqlqueue: huey's storage on this database).
_queue_id = sa.BigInteger().with_variant(sa.Integer, "sqlite")
queue_tasks = sa.Table(
    "queue_tasks",
    metadata,
    sa.Column("id", _queue_id, primary_key=True),
    sa.Column("queue", sa.String(64), nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("priority", sa.Float, nullable=False, server_default="0"),
    sa.Index("ix_queue_tasks_queue", "queue", "priority", "id"),
)

queue_schedule = sa.Table(
    "queue_schedule",
    metadata,
    sa.Column("id", _queue_id, primary_key=True),
    sa.Column("queue", sa.String(64), nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Index("ix_queue_schedule_queue", "queue", "ts"),
)

queue_kv = sa.Table(
    "queue_kv",
    metadata,
    sa.Column("queue", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)


BASELINE_REVISION = "0001"


# -- Landing in AWS (connector.adapters.landings) --------------------------------------
# New in the landing release: one landing per run, one snapshot per landed disk. Every
# AWS resource id is written here before anything depends on it.
landings = sa.Table(
    "landings",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("server_id", sa.String(40), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False),  # ACTIVE | LANDED | FAILED | DELETED
    sa.Column("image_name", sa.String(128), nullable=False),
    sa.Column("image_id", sa.String(64)),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("started_at", sa.String(32), nullable=False),
    sa.Column("finished_at", sa.String(32)),
    sa.Column("error", sa.Text),
)

landed_disks = sa.Table(
    "landed_disks",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("disk_key", sa.Integer, primary_key=True),
    sa.Column("snapshot_id", sa.String(64)),
    sa.Column("state", sa.String(16), nullable=False),  # started | sent | completed | ...
    sa.Column("client_token", sa.String(64), nullable=False),
    sa.Column("parent_snapshot_id", sa.String(64)),
    sa.Column("capacity", sa.BigInteger, nullable=False),
    sa.Column("blocks_sent", sa.BigInteger, nullable=False, server_default="0"),
)
# A job's landing settings (JSON of connector.domain.landing.LandingSpec; NULL: the
# [landing] defaults).
jobs.append_column(sa.Column("landing", sa.Text))
# -- end of the landing tables ------------------------------------------------------------


class Database:
    """The engine of the state database, with its schema in place (migrated)."""

    def __init__(self, url: str, connect_args: Mapping[str, Any] | None = None) -> None:
        """`url` carries no password: a PostgreSQL password comes in `connect_args`."""
        self.url = url
        self.dialect = url.split(":", 1)[0].split("+", 1)[0]
        if self.dialect == "postgresql":
            self.engine: Engine = sa.create_engine(
                _psycopg_url(url),
                connect_args=dict(connect_args or {}),
                pool_pre_ping=True,  # a restarted server: a dead connection is replaced
                pool_size=10,
                max_overflow=20,
            )
        else:
            self.engine = sa.create_engine(url, connect_args=dict(connect_args or {}))
            sa.event.listen(self.engine, "connect", _sqlite_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        migrate(self.engine)

    @property
    def is_postgresql(self) -> bool:
        return self.dialect == "postgresql"

    @classmethod
    def at_path(cls, path: Path) -> Database:
        """An SQLite file, created readable by its owner only."""
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        db = cls(f"sqlite:///{path}")
        if not existed:
            os.chmod(path, 0o600)
        return db

    @contextmanager
    def tx(self, conn: Connection | None = None) -> Iterator[Connection]:
        """A transaction; or, given the connection of one under way, that one."""
        if conn is not None:
            yield conn
            return
        with self.engine.begin() as c:
            yield c

    @contextmanager
    def write_tx(self, key: str, conn: Connection | None = None) -> Iterator[Connection]:
        """A transaction in which a read and the write that depends on it are atomic:
        writers of the same `key` take turns (across processes and machines)."""
        if conn is not None:
            self.lock_key(conn, key)
            yield conn
            return
        with self.engine.connect() as c:
            c.execution_options(connector_immediate=True)
            with c.begin():
                self.lock_key(c, key)
                yield c

    def lock_key(self, conn: Connection, key: str) -> None:
        """Hold `key` until the transaction of `conn` ends (PostgreSQL; SQLite's
        IMMEDIATE transaction holds the whole database already)."""
        if self.is_postgresql:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key(key)})

    @contextmanager
    def session_lock(self, key: str) -> Iterator[bool]:
        """Try to hold `key` for the block (True) or find it held elsewhere (False).

        On PostgreSQL a session advisory lock on a connection of its own: it goes
        with its holder, should that process die. On SQLite, always True (one process
        uses the file; its callers lock a file beside it)."""
        if not self.is_postgresql:
            yield True
            return
        with self.engine.connect() as c:
            got = bool(
                c.execute(
                    sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": advisory_key(key)}
                ).scalar()
            )
            c.commit()
            try:
                yield got
            finally:
                if got:
                    c.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": advisory_key(key)})
                    c.commit()

    def now(self, conn: Connection | None = None) -> float:
        """The database's clock, in seconds since the epoch: the one clock of a fleet."""
        with self.tx(conn) as c:
            return float(c.execute(sa.select(self.now_expr())).scalar_one())

    def now_expr(self) -> Any:
        """The database's clock as an SQL expression (seconds since the epoch)."""
        if self.is_postgresql:
            return sa.func.extract("epoch", sa.func.clock_timestamp())
        return (sa.func.julianday("now") - 2440587.5) * 86400.0

    def insert_ignoring_duplicates(self, table: sa.Table) -> Any:
        """An INSERT that skips rows whose primary key exists already."""
        if self.is_postgresql:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()

    def close(self) -> None:
        self.engine.dispose()


def advisory_key(key: str) -> int:
    """A PostgreSQL advisory lock number for a text key (signed 64 bits)."""
    return zlib.crc32(b"connector:" + key.encode()) - (1 << 31)


def alembic_config(conn: Connection) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.attributes["connection"] = conn
    return cfg


def migrate(engine: Engine) -> None:
    """Create the schema, or upgrade it to the newest revision, in one transaction.

    Connectors of a fleet starting together take turns (an advisory lock), so one
    upgrades and the others find it done.
    """
    with engine.connect() as conn:
        conn.execution_options(connector_immediate=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key("schema")}
                )
            current = MigrationContext.configure(conn).get_current_revision()
            cfg = alembic_config(conn)
            if current is None and sa.inspect(conn).has_table("runs"):
                # Made before migrations: bring it to the baseline, then say it is there.
                _to_baseline(conn)
                command.stamp(cfg, BASELINE_REVISION)
            command.upgrade(cfg, "head")


def schema_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _to_baseline(conn: Connection) -> None:
    """Tables and columns of the baseline that a file from before migrations lacks
    (what 0.1.0 itself added when it opened an older file)."""
    base = baseline_metadata()
    base.create_all(conn)
    inspector = sa.inspect(conn)
    for table in base.sorted_tables:
        have = {col["name"] for col in inspector.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            ddl = col.type.compile(dialect=conn.dialect)
            default = ""
            if col.server_default is not None:
                default = f" NOT NULL DEFAULT {col.server_default.arg}"  # type: ignore[attr-defined]
            conn.execute(
                sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {ddl}{default}')
            )


def _psycopg_url(url: str) -> str:
    """SQLAlchemy's name of the psycopg 3 driver for a postgresql:// URL."""
    scheme, rest = url.split(":", 1)
    return "postgresql+psycopg:" + rest if scheme in ("postgresql", "postgres") else url


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # The transactions are SQLAlchemy's (see _sqlite_begin), not the driver's.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    immediate = conn.get_execution_options().get("connector_immediate", False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
