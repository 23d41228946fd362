"""The state database: one SQLAlchemy Core schema and its engine.

SQLite (an embedded file) by default; the same schema runs on PostgreSQL.
Every table of the connector's state is declared here; the modules that own
them (`state`, `runs`, `ledger`, `jobstore`) read and write through a
`Database`. Each write is its own short transaction, unless a caller hands
its connection to another owner to make two writes one transaction.

Columns added by a newer version are added to an existing database when it
is opened (nullable, or with a default), so an upgrade keeps its state.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

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
    """The engine of the state database, with its schema in place."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = sa.create_engine(url, future=True)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)
        _add_missing_columns(self.engine)

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

    def insert_ignoring_duplicates(self, table: sa.Table) -> Any:
        """An INSERT that skips rows whose primary key exists already."""
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table).on_conflict_do_nothing()
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()

    def close(self) -> None:
        self.engine.dispose()


def _add_missing_columns(engine: Engine) -> None:
    """Columns this version declares that an existing database lacks."""
    inspector = sa.inspect(engine)
    with engine.begin() as c:
        for table in metadata.sorted_tables:
            have = {col["name"] for col in inspector.get_columns(table.name)}
            for col in table.columns:
                if col.name in have:
                    continue
                ddl = col.type.compile(dialect=engine.dialect)
                default = ""
                if col.server_default is not None:
                    default = f" NOT NULL DEFAULT {col.server_default.arg}"  # type: ignore[attr-defined]
                c.execute(
                    sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {ddl}{default}')
                )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
