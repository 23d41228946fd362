"""The landings of runs in the state database (the `Landings` port)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from connector.adapters.sql import Database, landed_disks, landings
from connector.domain.landing import LANDING_ACTIVE, LandedDisk, LandingRow
from connector.domain.times import stamp


class SqlLandings:
    def __init__(self, db: Database) -> None:
        self.db = db

    def landing(self, run_id: str) -> LandingRow | None:
        with self.db.tx() as c:
            row = c.execute(sa.select(landings).where(landings.c.run_id == run_id)).first()
            if row is None:
                return None
            return self._with_disks(c, [row])[0]

    def landings(self, server_id: str | None = None) -> list[LandingRow]:
        q = sa.select(landings).order_by(landings.c.run_id)
        if server_id is not None:
            q = q.where(landings.c.server_id == server_id)
        with self.db.tx() as c:
            return self._with_disks(c, list(c.execute(q)))

    def _with_disks(self, c: Any, rows: list[Any]) -> list[LandingRow]:
        ids = [r.run_id for r in rows]
        disks: dict[str, list[LandedDisk]] = {i: [] for i in ids}
        if ids:
            q = (
                sa.select(landed_disks)
                .where(landed_disks.c.run_id.in_(ids))
                .order_by(landed_disks.c.disk_key)
            )
            for d in c.execute(q):
                disks[d.run_id].append(LandedDisk(**dict(d._mapping)))
        return [LandingRow(**dict(r._mapping), disks=disks[r.run_id]) for r in rows]

    def start_landing(self, run_id: str, server_id: str, image_name: str) -> LandingRow:
        with self.db.tx() as c:
            found = c.execute(sa.select(landings.c.run_id).where(landings.c.run_id == run_id))
            if found.first() is None:
                c.execute(
                    landings.insert().values(
                        run_id=run_id,
                        server_id=server_id,
                        state=LANDING_ACTIVE,
                        image_name=image_name,
                        attempt=0,
                        started_at=stamp(),
                    )
                )
            else:
                c.execute(
                    landings.update()
                    .where(landings.c.run_id == run_id)
                    .values(state=LANDING_ACTIVE, error=None, finished_at=None)
                )
        row = self.landing(run_id)
        assert row is not None
        return row

    def record_snapshot(self, disk: LandedDisk) -> None:
        values = {
            "snapshot_id": disk.snapshot_id,
            "state": disk.state,
            "client_token": disk.client_token,
            "parent_snapshot_id": disk.parent_snapshot_id,
            "capacity": disk.capacity,
            "blocks_sent": disk.blocks_sent,
        }
        key = (landed_disks.c.run_id == disk.run_id) & (landed_disks.c.disk_key == disk.disk_key)
        with self.db.tx() as c:
            if c.execute(landed_disks.update().where(key).values(**values)).rowcount == 0:
                c.execute(
                    landed_disks.insert().values(
                        run_id=disk.run_id, disk_key=disk.disk_key, **values
                    )
                )

    def set_snapshot_state(
        self, run_id: str, disk_key: int, state: str, blocks_sent: int | None = None
    ) -> None:
        values: dict[str, Any] = {"state": state}
        if blocks_sent is not None:
            values["blocks_sent"] = blocks_sent
        key = (landed_disks.c.run_id == run_id) & (landed_disks.c.disk_key == disk_key)
        with self.db.tx() as c:
            c.execute(landed_disks.update().where(key).values(**values))

    def set_attempt(self, run_id: str, attempt: int) -> None:
        with self.db.tx() as c:
            c.execute(landings.update().where(landings.c.run_id == run_id).values(attempt=attempt))

    def record_image(self, run_id: str, image_id: str) -> None:
        with self.db.tx() as c:
            c.execute(
                landings.update().where(landings.c.run_id == run_id).values(image_id=image_id)
            )

    def end_landing(self, run_id: str, state: str, error: str | None = None) -> None:
        with self.db.tx() as c:
            c.execute(
                landings.update()
                .where(landings.c.run_id == run_id)
                .values(state=state, error=error, finished_at=stamp())
            )
