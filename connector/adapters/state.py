"""The state database's catalog, per-disk CBT state, block index, pack records and
retention settings, and `StateStore`, the one object that opens them all.

Each class implements one narrow port of `connector.ports` over a shared
`Database`; runs live in `connector.adapters.runs`, the run ledger in
`connector.adapters.ledger`, jobs in `connector.adapters.jobstore`.
`StateStore` combines the first five with the runs for the composition root,
the CLI and tests; the pipeline sees only the ports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from connector.adapters.runs import SqlRuns
from connector.adapters.sql import CHUNK, Database, blocks, disk_state, packs, retention, servers
from connector.domain.manifest import BlockRef
from connector.domain.model import VmInfo
from connector.domain.records import (
    DiskResult,
    DiskStateRow,
    RunRow,
    ServerRow,
    server_conflict,
)
from connector.domain.times import stamp
from connector.errors import NotFoundError

__all__ = [
    "DiskResult",
    "DiskStateRow",
    "RunRow",
    "ServerRow",
    "SqlBlocks",
    "SqlCatalog",
    "SqlDiskStates",
    "SqlRetention",
    "StateStore",
]


class _Tables:
    db: Database


class SqlCatalog(_Tables):
    """The `Catalog` port."""

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
            "seen_at": stamp(),
            "removed_at": None,
        }
        with self.db.write_tx(f"vm:{vm.uuid}") as c:
            row = c.execute(sa.select(servers.c.id).where(servers.c.vm_uuid == vm.uuid)).first()
            if row is None:
                server_id = "s-" + os.urandom(8).hex()
                c.execute(servers.insert().values(id=server_id, vm_uuid=vm.uuid, **values))
            else:
                server_id = row.id
                c.execute(servers.update().where(servers.c.id == server_id).values(**values))
        return self.server(server_id)

    def mark_removed(self, present_uuids: set[str]) -> None:
        with self.db.tx() as c:
            c.execute(
                servers.update()
                .where(servers.c.vm_uuid.not_in(present_uuids), servers.c.removed_at.is_(None))
                .values(removed_at=stamp())
            )

    def servers(self) -> list[ServerRow]:
        with self.db.tx() as c:
            rows = c.execute(sa.select(servers).order_by(servers.c.name)).all()
        return [_server(r) for r in rows]

    def server(self, server_id: str) -> ServerRow:
        with self.db.tx() as c:
            row = c.execute(sa.select(servers).where(servers.c.id == server_id)).first()
        if row is None:
            raise NotFoundError(f"no server {server_id} in the catalog")
        return _server(row)

    def find_servers(self, name_or_uuid: str) -> list[ServerRow]:
        with self.db.tx() as c:
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

    def add_server(self, server_id: str, vm_uuid: str, name: str) -> ServerRow:
        with self.db.write_tx(f"vm:{vm_uuid}") as c:
            row = c.execute(
                sa.select(servers.c.id, servers.c.vm_uuid).where(
                    sa.or_(servers.c.id == server_id, servers.c.vm_uuid == vm_uuid)
                )
            ).first()
            if row is None:
                c.execute(
                    servers.insert().values(
                        id=server_id,
                        vm_uuid=vm_uuid,
                        name=name,
                        ref="",
                        datacenter="",
                        power_state="unknown",
                        cbt_enabled=False,
                        disks="[]",
                        snapshots="[]",
                        seen_at=stamp(),
                        removed_at=None,
                    )
                )
            elif (row.id, row.vm_uuid) != (server_id, vm_uuid):
                raise ValueError(server_conflict(server_id, vm_uuid, row.id, row.vm_uuid))
        return self.server(server_id)


class SqlDiskStates(_Tables):
    """The `DiskStates` port (the commit's write of next changeIds is in `SqlRuns`)."""

    def disk_state(self, server_id: str, disk_key: int) -> DiskStateRow | None:
        with self.db.tx() as c:
            row = c.execute(
                sa.select(disk_state).where(
                    disk_state.c.server_id == server_id, disk_state.c.disk_key == disk_key
                )
            ).first()
        return None if row is None else DiskStateRow(**row._mapping)

    def disk_states(self, server_id: str) -> list[DiskStateRow]:
        with self.db.tx() as c:
            rows = c.execute(
                sa.select(disk_state)
                .where(disk_state.c.server_id == server_id)
                .order_by(disk_state.c.disk_key)
            ).all()
        return [DiskStateRow(**r._mapping) for r in rows]

    def forget_disks(self, server_id: str) -> None:
        with self.db.tx() as c:
            c.execute(disk_state.delete().where(disk_state.c.server_id == server_id))

    def put_disk_state(self, row: DiskStateRow) -> None:
        with self.db.write_tx(f"disks:{row.server_id}") as c:
            c.execute(
                disk_state.delete().where(
                    disk_state.c.server_id == row.server_id, disk_state.c.disk_key == row.disk_key
                )
            )
            c.execute(disk_state.insert().values(**row.__dict__))


class SqlBlocks(_Tables):
    """The `BlockStore` port: block index and pack records."""

    def lookup(self, block_id: bytes) -> BlockRef | None:
        with self.db.tx() as c:
            row = c.execute(sa.select(blocks).where(blocks.c.block_id == block_id)).first()
        return None if row is None else BlockRef(row.block_id, row.pack_id, row.offset, row.length)

    def lookup_many(self, block_ids: Sequence[bytes]) -> dict[bytes, BlockRef]:
        ids = sorted({bytes(b) for b in block_ids})
        out: dict[bytes, BlockRef] = {}
        if not ids:
            return out
        with self.db.tx() as c:
            for i in range(0, len(ids), CHUNK):
                rows = c.execute(
                    sa.select(blocks).where(blocks.c.block_id.in_(ids[i : i + CHUNK]))
                ).all()
                for row in rows:
                    key = bytes(row.block_id)
                    out[key] = BlockRef(key, row.pack_id, row.offset, row.length)
        return out

    def add(self, refs: list[BlockRef]) -> None:
        if not refs:
            return
        rows = [
            {"block_id": r.block_id, "pack_id": r.pack_id, "offset": r.offset, "length": r.length}
            for r in refs
        ]
        # The first ref of a block wins; concurrent writers (disks packed in parallel)
        # may store the same block twice, and neither insert may fail for it.
        with self.db.tx() as c:
            c.execute(self.db.insert_ignoring_duplicates(blocks), rows)

    def record_pack(self, pack_id: str, size: int, run_id: str | None) -> None:
        with self.db.tx() as c:
            c.execute(
                packs.insert().values(id=pack_id, size=size, run_id=run_id, created_at=stamp())
            )

    def packs_of_runs(self, run_ids: set[str]) -> set[str]:
        ids = sorted(run_ids)
        out: set[str] = set()
        with self.db.tx() as c:
            for i in range(0, len(ids), CHUNK):
                rows = c.execute(
                    sa.select(packs.c.id).where(packs.c.run_id.in_(ids[i : i + CHUNK]))
                ).all()
                out.update(r.id for r in rows)
        return out

    def forget_blocks_in_packs(self, pack_ids: set[str]) -> None:
        ids = sorted(pack_ids)
        with self.db.tx() as c:
            for i in range(0, len(ids), CHUNK):
                c.execute(blocks.delete().where(blocks.c.pack_id.in_(ids[i : i + CHUNK])))

    def forget_packs(self, pack_ids: set[str]) -> None:
        self.forget_blocks_in_packs(pack_ids)
        ids = sorted(pack_ids)
        with self.db.tx() as c:
            for i in range(0, len(ids), CHUNK):
                c.execute(packs.delete().where(packs.c.id.in_(ids[i : i + CHUNK])))


class SqlRetention(_Tables):
    """The `RetentionSettings` port."""

    def set_retention(self, server_id: str, keep: int | None) -> None:
        with self.db.write_tx(f"retention:{server_id}") as c:
            c.execute(retention.delete().where(retention.c.server_id == server_id))
            if keep is not None:
                c.execute(
                    retention.insert().values(server_id=server_id, keep=keep, updated_at=stamp())
                )

    def retention_settings(self) -> dict[str, int]:
        with self.db.tx() as c:
            rows = c.execute(sa.select(retention.c.server_id, retention.c.keep)).all()
        return {r.server_id: r.keep for r in rows}


class StateStore(SqlCatalog, SqlDiskStates, SqlBlocks, SqlRetention, SqlRuns):
    """Catalog, disk states, block index, retention and runs over one database."""

    def __init__(self, url_or_db: str | Database) -> None:
        db = url_or_db if isinstance(url_or_db, Database) else Database(url_or_db)
        SqlRuns.__init__(self, db)

    @classmethod
    def at_path(cls, path: Path) -> StateStore:
        return cls(Database.at_path(path))

    @property
    def engine(self) -> sa.Engine:
        return self.db.engine

    def close(self) -> None:
        self.db.close()


def _server(r: Any) -> ServerRow:
    m = dict(r._mapping)
    m["disks"] = json.loads(m["disks"])
    m["snapshots"] = json.loads(m["snapshots"])
    return ServerRow(**m)
