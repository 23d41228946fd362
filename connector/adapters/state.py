"""The state store: server catalog, per-disk CBT state, runs and the block index.

SQLAlchemy Core on an embedded SQLite file by default (a PostgreSQL URL works
as well). Every write is its own short transaction.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from connector.domain.manifest import BlockRef
from connector.domain.model import VmInfo
from connector.errors import NotFoundError

metadata = sa.MetaData()

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
    sa.Column("mode", sa.String(16), nullable=False),  # incremental | full | allocated
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

_CHUNK = 500  # values per IN (...) list


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ServerRow:
    id: str
    vm_uuid: str
    name: str
    ref: str
    datacenter: str
    power_state: str
    cbt_enabled: bool
    disks: list[dict[str, Any]]
    snapshots: list[dict[str, Any]]
    seen_at: str
    removed_at: str | None


@dataclass
class DiskStateRow:
    server_id: str
    disk_key: int
    disk_uuid: str | None
    capacity: int
    change_id: str | None
    last_run_id: str
    chain_length: int


@dataclass
class RunDiskRow:
    run_id: str
    disk_key: int
    mode: str
    reason: str | None
    capacity: int
    change_id_from: str | None
    change_id_to: str | None
    bytes_changed: int = 0
    bytes_read: int = 0
    bytes_uploaded: int = 0
    blocks_new: int = 0
    blocks_dedup: int = 0
    blocks_zero: int = 0
    manifest_key: str | None = None


@dataclass
class RunRow:
    id: str
    server_id: str
    type: str
    state: str
    stage: str
    started_at: str
    finished_at: str | None
    error: str | None
    snapshot_name: str | None
    snapshot_ref: str | None
    stats: dict[str, Any] = field(default_factory=dict)
    disks: list[RunDiskRow] = field(default_factory=list)


class StateStore:
    def __init__(self, url: str) -> None:
        self.engine: Engine = sa.create_engine(url, future=True)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        metadata.create_all(self.engine)

    @classmethod
    def at_path(cls, path: Path) -> StateStore:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        store = cls(f"sqlite:///{path}")
        if not existed:
            os.chmod(path, 0o600)
        return store

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def close(self) -> None:
        self.engine.dispose()

    # -- catalog -----------------------------------------------------------------

    def upsert_server(self, vm: VmInfo) -> ServerRow:
        disks_json = json.dumps(
            [
                {
                    "key": d.key,
                    "label": d.label,
                    "capacity": d.capacity,
                    "backing": d.backing,
                    "cbt": d.change_id is not None,
                }
                for d in vm.disks
            ]
        )
        snaps_json = json.dumps([{"name": s.name, "ref": s.ref} for s in vm.snapshots])
        values = {
            "name": vm.name,
            "ref": vm.ref,
            "datacenter": vm.datacenter,
            "power_state": vm.power_state,
            "cbt_enabled": vm.cbt_enabled,
            "disks": disks_json,
            "snapshots": snaps_json,
            "seen_at": _now(),
            "removed_at": None,
        }
        with self._tx() as c:
            row = c.execute(sa.select(servers.c.id).where(servers.c.vm_uuid == vm.uuid)).first()
            if row is None:
                server_id = "s-" + os.urandom(8).hex()
                c.execute(servers.insert().values(id=server_id, vm_uuid=vm.uuid, **values))
            else:
                server_id = row.id
                c.execute(servers.update().where(servers.c.id == server_id).values(**values))
        return self.server(server_id)

    def mark_removed(self, present_uuids: set[str]) -> None:
        with self._tx() as c:
            c.execute(
                servers.update()
                .where(servers.c.vm_uuid.not_in(present_uuids), servers.c.removed_at.is_(None))
                .values(removed_at=_now())
            )

    def servers(self) -> list[ServerRow]:
        with self._tx() as c:
            rows = c.execute(sa.select(servers).order_by(servers.c.name)).all()
        return [_server(r) for r in rows]

    def server(self, server_id: str) -> ServerRow:
        with self._tx() as c:
            row = c.execute(sa.select(servers).where(servers.c.id == server_id)).first()
        if row is None:
            raise NotFoundError(f"no server {server_id} in the catalog")
        return _server(row)

    def find_servers(self, name_or_uuid: str) -> list[ServerRow]:
        with self._tx() as c:
            rows = c.execute(
                sa.select(servers).where(
                    sa.or_(
                        servers.c.vm_uuid == name_or_uuid,
                        servers.c.name == name_or_uuid,
                        servers.c.id == name_or_uuid,
                    )
                )
            ).all()
        return [_server(r) for r in rows]

    # -- per-disk CBT state ------------------------------------------------------

    def disk_state(self, server_id: str, disk_key: int) -> DiskStateRow | None:
        with self._tx() as c:
            row = c.execute(
                sa.select(disk_state).where(
                    disk_state.c.server_id == server_id, disk_state.c.disk_key == disk_key
                )
            ).first()
        return None if row is None else DiskStateRow(**row._mapping)

    def disk_states(self, server_id: str) -> list[DiskStateRow]:
        with self._tx() as c:
            rows = c.execute(
                sa.select(disk_state)
                .where(disk_state.c.server_id == server_id)
                .order_by(disk_state.c.disk_key)
            ).all()
        return [DiskStateRow(**r._mapping) for r in rows]

    # -- runs --------------------------------------------------------------------

    def create_run(self, run_id: str, server_id: str, run_type: str) -> None:
        with self._tx() as c:
            c.execute(
                runs.insert().values(
                    id=run_id,
                    server_id=server_id,
                    type=run_type,
                    state="ACTIVE",
                    stage="validate",
                    started_at=_now(),
                    stats="{}",
                )
            )

    def set_stage(self, run_id: str, stage: str, **fields: Any) -> None:
        with self._tx() as c:
            c.execute(runs.update().where(runs.c.id == run_id).values(stage=stage, **fields))

    def record_run_disk(self, row: RunDiskRow) -> None:
        values = dict(row.__dict__)
        with self._tx() as c:
            c.execute(
                run_disks.delete().where(
                    run_disks.c.run_id == row.run_id, run_disks.c.disk_key == row.disk_key
                )
            )
            c.execute(run_disks.insert().values(**values))

    def complete_run(
        self, run_id: str, server_id: str, disks: list[DiskStateRow], stats: dict[str, Any]
    ) -> None:
        """Mark the run COMPLETED and store the disks' next changeIds, in one transaction."""
        with self._tx() as c:
            for d in disks:
                c.execute(
                    disk_state.delete().where(
                        disk_state.c.server_id == d.server_id, disk_state.c.disk_key == d.disk_key
                    )
                )
                c.execute(disk_state.insert().values(**d.__dict__))
            c.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(state="COMPLETED", finished_at=_now(), stats=json.dumps(stats))
            )

    def record_commit(
        self, run_id: str, server_id: str, disks: list[DiskStateRow], stats: dict[str, Any]
    ) -> None:
        """Store the disks' next changeIds and the run's stats once its commit object is
        durable; the run stays ACTIVE until its snapshot is removed (`finish_run`)."""
        with self._tx() as c:
            for d in disks:
                c.execute(
                    disk_state.delete().where(
                        disk_state.c.server_id == d.server_id, disk_state.c.disk_key == d.disk_key
                    )
                )
                c.execute(disk_state.insert().values(**d.__dict__))
            c.execute(runs.update().where(runs.c.id == run_id).values(stats=json.dumps(stats)))

    def finish_run(self, run_id: str, note: str | None = None) -> None:
        """Mark a committed run COMPLETED (with an optional note, e.g. a cleanup warning)."""
        with self._tx() as c:
            c.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(state="COMPLETED", stage="done", finished_at=_now(), error=note)
            )

    def fail_run(self, run_id: str, error: str) -> None:
        with self._tx() as c:
            c.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(state="FAILED", finished_at=_now(), error=error)
            )

    def run(self, run_id: str) -> RunRow:
        with self._tx() as c:
            row = c.execute(sa.select(runs).where(runs.c.id == run_id)).first()
            if row is None:
                raise NotFoundError(f"no run {run_id}; list runs with `connector runs`")
            drows = c.execute(
                sa.select(run_disks)
                .where(run_disks.c.run_id == run_id)
                .order_by(run_disks.c.disk_key)
            ).all()
        return _run(row, drows)

    def runs(self, server_id: str | None = None) -> list[RunRow]:
        with self._tx() as c:
            q = sa.select(runs).order_by(runs.c.started_at, runs.c.id)
            if server_id is not None:
                q = q.where(runs.c.server_id == server_id)
            rows = c.execute(q).all()
            drows = c.execute(sa.select(run_disks).order_by(run_disks.c.disk_key)).all()
        by_run: dict[str, list[Any]] = {}
        for d in drows:
            by_run.setdefault(d.run_id, []).append(d)
        return [_run(r, by_run.get(r.id, [])) for r in rows]

    # -- block index (implements store.repository.BlockIndex) --------------------

    def lookup(self, block_id: bytes) -> BlockRef | None:
        with self._tx() as c:
            row = c.execute(sa.select(blocks).where(blocks.c.block_id == block_id)).first()
        return None if row is None else BlockRef(row.block_id, row.pack_id, row.offset, row.length)

    def add(self, refs: list[BlockRef]) -> None:
        if not refs:
            return
        rows = [
            {"block_id": r.block_id, "pack_id": r.pack_id, "offset": r.offset, "length": r.length}
            for r in refs
        ]
        # The first ref of a block wins; concurrent writers (disks packed in parallel)
        # may store the same block twice, and neither insert may fail for it.
        with self._tx() as c:
            c.execute(_insert_ignoring_duplicates(self.engine, blocks), rows)

    def record_pack(self, pack_id: str, size: int, run_id: str | None) -> None:
        with self._tx() as c:
            c.execute(
                packs.insert().values(id=pack_id, size=size, run_id=run_id, created_at=_now())
            )

    # -- retention and purge -----------------------------------------------------

    def set_retention(self, server_id: str, keep: int | None) -> None:
        """Keep the `keep` most recent runs of a server (0 keeps all; None: the default)."""
        with self._tx() as c:
            c.execute(retention.delete().where(retention.c.server_id == server_id))
            if keep is not None:
                c.execute(
                    retention.insert().values(server_id=server_id, keep=keep, updated_at=_now())
                )

    def retention_settings(self) -> dict[str, int]:
        """Per-server retention settings: server id -> runs to keep."""
        with self._tx() as c:
            rows = c.execute(sa.select(retention.c.server_id, retention.c.keep)).all()
        return {r.server_id: r.keep for r in rows}

    def forget_blocks_in_packs(self, pack_ids: set[str]) -> None:
        """Drop index entries that point into these packs, so no new run dedups against them."""
        ids = sorted(pack_ids)
        with self._tx() as c:
            for i in range(0, len(ids), _CHUNK):
                c.execute(blocks.delete().where(blocks.c.pack_id.in_(ids[i : i + _CHUNK])))

    def forget_packs(self, pack_ids: set[str]) -> None:
        """Deleted packs: no index entry and no pack record refers to them any more."""
        self.forget_blocks_in_packs(pack_ids)
        ids = sorted(pack_ids)
        with self._tx() as c:
            for i in range(0, len(ids), _CHUNK):
                c.execute(packs.delete().where(packs.c.id.in_(ids[i : i + _CHUNK])))

    def packs_of_runs(self, run_ids: set[str]) -> set[str]:
        ids = sorted(run_ids)
        out: set[str] = set()
        with self._tx() as c:
            for i in range(0, len(ids), _CHUNK):
                rows = c.execute(
                    sa.select(packs.c.id).where(packs.c.run_id.in_(ids[i : i + _CHUNK]))
                ).all()
                out.update(r.id for r in rows)
        return out

    def mark_runs_deleted(self, run_ids: set[str]) -> None:
        """Runs whose commit was deleted from the store by retention or purge."""
        ids = sorted(run_ids)
        with self._tx() as c:
            for i in range(0, len(ids), _CHUNK):
                c.execute(
                    runs.update().where(runs.c.id.in_(ids[i : i + _CHUNK])).values(state="DELETED")
                )

    def forget_disks(self, server_id: str) -> None:
        """Drop the CBT state of a server's disks: its next run reads them without a base run."""
        with self._tx() as c:
            c.execute(disk_state.delete().where(disk_state.c.server_id == server_id))


def _insert_ignoring_duplicates(engine: Engine, table: sa.Table) -> Any:
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _server(r: Any) -> ServerRow:
    m = dict(r._mapping)
    m["disks"] = json.loads(m["disks"])
    m["snapshots"] = json.loads(m["snapshots"])
    return ServerRow(**m)


def _run(r: Any, drows: Any) -> RunRow:
    m = dict(r._mapping)
    m["stats"] = json.loads(m["stats"] or "{}")
    return RunRow(**m, disks=[RunDiskRow(**d._mapping) for d in drows])
