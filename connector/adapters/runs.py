"""Runs and their per-disk results in the state database (the `Runs` port).

The one module that writes the `runs` and `run_disks` tables: the pipeline,
the ledger's queue tokens and the job store all go through it. The ledger and
the job store hand it their connection where a run's row must change in the
same transaction as theirs.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from connector.adapters.sql import CHUNK, Database, disk_state, run_disks, runs
from connector.domain.jobs import RUN_ACTIVE, RUN_COMPLETED, RUN_DELETED, RUN_FAILED
from connector.domain.records import DiskResult, DiskStateRow, RunRow
from connector.domain.times import stamp
from connector.errors import NotFoundError

DONE_STAGE = "done"
TERMINAL_STATES = frozenset({"MISSED", RUN_FAILED, RUN_COMPLETED, RUN_DELETED})


class SqlRuns:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- writes --------------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        server_id: str,
        run_type: str,
        *,
        state: str = RUN_ACTIVE,
        stage: str = "validate",
        error: str | None = None,
        conn: Connection | None = None,
    ) -> None:
        now = stamp()
        with self.db.tx(conn) as c:
            c.execute(
                runs.insert().values(
                    id=run_id,
                    server_id=server_id,
                    type=run_type,
                    state=state,
                    stage=stage,
                    started_at=now,
                    finished_at=now if state in TERMINAL_STATES else None,
                    error=error,
                    stats="{}",
                )
            )

    def set_stage(
        self,
        run_id: str,
        stage: str,
        *,
        snapshot_name: str | None = None,
        snapshot_ref: str | None = None,
    ) -> None:
        values: dict[str, Any] = {"stage": stage}
        if snapshot_name is not None:
            values["snapshot_name"] = snapshot_name
        if snapshot_ref is not None:
            values["snapshot_ref"] = snapshot_ref
        with self.db.tx() as c:
            c.execute(runs.update().where(runs.c.id == run_id).values(**values))

    def move(
        self,
        run_id: str,
        *,
        stage: str | None = None,
        state: str | None = None,
        conn: Connection | None = None,
    ) -> None:
        """A new stage or state of a run (the daemon moving its queue token on)."""
        values: dict[str, Any] = {}
        if stage is not None:
            values["stage"] = stage
        if state is not None:
            values["state"] = state
        if not values:
            return
        with self.db.tx(conn) as c:
            c.execute(runs.update().where(runs.c.id == run_id).values(**values))

    def record_disk(self, run_id: str, result: DiskResult) -> None:
        with self.db.write_tx(f"run:{run_id}") as c:
            c.execute(
                run_disks.delete().where(
                    run_disks.c.run_id == run_id, run_disks.c.disk_key == result.disk_key
                )
            )
            c.execute(run_disks.insert().values(run_id=run_id, **result.to_json()))

    def record_commit(self, run_id: str, disks: list[DiskStateRow], stats: dict[str, Any]) -> None:
        servers = sorted({d.server_id for d in disks})
        with self.db.write_tx(f"run:{run_id}") as c:
            for server_id in servers:
                self.db.lock_key(c, f"disks:{server_id}")
            for d in disks:
                c.execute(
                    disk_state.delete().where(
                        disk_state.c.server_id == d.server_id, disk_state.c.disk_key == d.disk_key
                    )
                )
                c.execute(disk_state.insert().values(**d.__dict__))
            c.execute(runs.update().where(runs.c.id == run_id).values(stats=json.dumps(stats)))

    def finish_run(self, run_id: str, note: str | None = None) -> None:
        with self.db.tx() as c:
            c.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(state=RUN_COMPLETED, stage=DONE_STAGE, finished_at=stamp(), error=note)
            )

    def fail_run(self, run_id: str, error: str) -> None:
        self.end_run(run_id, RUN_FAILED, error)

    def end_run(self, run_id: str, state: str, error: str | None) -> None:
        with self.db.tx() as c:
            c.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(state=state, finished_at=stamp(), error=error)
            )

    def mark_runs_deleted(self, run_ids: set[str]) -> None:
        ids = sorted(run_ids)
        with self.db.tx() as c:
            for i in range(0, len(ids), CHUNK):
                c.execute(
                    runs.update().where(runs.c.id.in_(ids[i : i + CHUNK])).values(state=RUN_DELETED)
                )

    def import_run(self, run: RunRow) -> bool:
        with self.db.write_tx(f"run:{run.id}") as c:
            if c.execute(sa.select(runs.c.id).where(runs.c.id == run.id)).first() is not None:
                return False
            c.execute(
                runs.insert().values(
                    id=run.id,
                    server_id=run.server_id,
                    type=run.type,
                    state=run.state,
                    stage=run.stage,
                    started_at=run.started_at,
                    finished_at=run.finished_at,
                    error=run.error,
                    snapshot_name=run.snapshot_name,
                    snapshot_ref=run.snapshot_ref,
                    stats=json.dumps(run.stats),
                )
            )
            for d in run.disks:
                c.execute(run_disks.insert().values(run_id=run.id, **d.to_json()))
        return True

    # -- reads ---------------------------------------------------------------------

    def run(self, run_id: str) -> RunRow:
        with self.db.tx() as c:
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
        with self.db.tx() as c:
            q = sa.select(runs).order_by(runs.c.started_at, runs.c.id)
            if server_id is not None:
                q = q.where(runs.c.server_id == server_id)
            rows = c.execute(q).all()
            drows = c.execute(sa.select(run_disks).order_by(run_disks.c.disk_key)).all()
        by_run: dict[str, list[Any]] = {}
        for d in drows:
            by_run.setdefault(d.run_id, []).append(d)
        return [_run(r, by_run.get(r.id, [])) for r in rows]


def _run(r: Any, drows: Any) -> RunRow:
    m = dict(r._mapping)
    m["stats"] = json.loads(m["stats"] or "{}")
    m.pop("schedule_key", None)
    disks = []
    for d in drows:
        doc = dict(d._mapping)
        doc.pop("run_id")
        disks.append(DiskResult.from_json(doc))
    return RunRow(**m, disks=disks)
