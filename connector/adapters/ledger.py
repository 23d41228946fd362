"""The run ledger: what a crash must not forget, in the state database.

- `run_control`: per run, the queue token (`seq`), retry attempts of the current
  stage, the job it belongs to, its ESXi host, a failure waiting to be rolled
  back, and progress for `connector runs` / `jobs show`.
- `run_steps`: results of finished steps keyed by (run, stage, disk), so a
  resumed run skips what is done and a retried step repeats no side effect.
- `side_effects`: what must be undone if the process dies, written BEFORE the
  side effect happens (a snapshot `connector-<run id>` is recorded with its name
  before it is created) or right when its handle exists (a multipart upload id,
  recorded as soon as CreateMultipartUpload returns). Startup recovery finds
  every entry still `pending` and removes or aborts it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from connector.adapters.runs import SqlRuns
from connector.adapters.sql import Database, run_control, run_steps, side_effects
from connector.domain.model import SnapshotInfo
from connector.domain.records import (
    EFFECT_DONE,
    EFFECT_PENDING,
    EFFECT_UNDONE,
    MULTIPART,
    NO_DISK,
    SNAPSHOT,
    Control,
    Effect,
)
from connector.domain.times import stamp
from connector.faults import crash_point

__all__ = ["MULTIPART", "NO_DISK", "SNAPSHOT", "Control", "Effect", "RunLedger"]

PENDING = EFFECT_PENDING
UNDONE = EFFECT_UNDONE
DONE = EFFECT_DONE
_now = stamp


class RunLedger:
    """The `Ledger` (steps, side effects), `RunControls` and `UploadJournal` ports."""

    def __init__(self, state: Database | Any, member: str | None = None) -> None:
        """`member`: the fleet member this process is; its multipart uploads carry it."""
        self.db: Database = state if isinstance(state, Database) else state.db
        self.member = member
        self.runs = SqlRuns(self.db)
        self._tx = self.db.tx

    # -- run control ---------------------------------------------------------------

    def ensure_control(
        self, run_id: str, job_id: str | None = None, conn: Connection | None = None
    ) -> Control:
        with self.db.write_tx(f"run:{run_id}", conn) as c:
            c.execute(
                self.db.insert_ignoring_duplicates(run_control).values(
                    run_id=run_id,
                    job_id=job_id,
                    seq=0,
                    attempts=0,
                    progress_done=0,
                    progress_total=0,
                    detail="",
                    updated_at=_now(),
                    due_at=self.db.now_expr(),  # its first task is due at once
                )
            )
            row = c.execute(sa.select(run_control).where(run_control.c.run_id == run_id)).first()
        assert row is not None
        return Control(**row._mapping)

    def control(self, run_id: str) -> Control | None:
        with self._tx() as c:
            row = c.execute(sa.select(run_control).where(run_control.c.run_id == run_id)).first()
        return None if row is None else Control(**row._mapping)

    def advance(
        self,
        run_id: str,
        stage: str | None = None,
        attempts: int | None = None,
        state: str | None = None,
        host: str | None = None,
        due_in: float = 0.0,
        conn: Connection | None = None,
    ) -> int:
        """Move the run's token on (a new stage, a retry, an admission); return the new seq.

        A queued task carries the seq it was enqueued with; only the task whose seq
        is current runs, so a duplicate or stale task is a no-op. Moving the token
        also ends the claim on the run's stage (`claim`); `due_in` is when the task
        of the new token is due (seconds from now), for the fleet's watch on stalls.
        """
        with self.db.write_tx(f"run:{run_id}", conn) as c:
            ctl = self.ensure_control(run_id, conn=c)
            values: dict[str, Any] = {
                "seq": ctl.seq + 1,
                "updated_at": _now(),
                "owner": None,
                "owner_since": None,
                "due_at": self.db.now_expr() + due_in,
            }
            if stage is not None:
                values["attempts"] = 0
                values["detail"] = ""
            if attempts is not None:
                values["attempts"] = attempts
            if host is not None:
                values["host"] = host
            c.execute(run_control.update().where(run_control.c.run_id == run_id).values(**values))
            self.runs.move(run_id, stage=stage, state=state, conn=c)
        return int(values["seq"])

    def set_failure(self, run_id: str, failed_stage: str, reason: str) -> None:
        with self.db.write_tx(f"run:{run_id}") as c:
            self.ensure_control(run_id, conn=c)
            c.execute(
                run_control.update()
                .where(run_control.c.run_id == run_id)
                .values(failed_stage=failed_stage, failure=reason, updated_at=_now())
            )

    def set_progress(self, run_id: str, done: int, total: int, detail: str) -> None:
        with self._tx() as c:
            c.execute(
                run_control.update()
                .where(run_control.c.run_id == run_id)
                .values(progress_done=done, progress_total=total, detail=detail, updated_at=_now())
            )

    def controls(self, run_ids: list[str]) -> dict[str, Control]:
        if not run_ids:
            return {}
        with self._tx() as c:
            rows = c.execute(sa.select(run_control).where(run_control.c.run_id.in_(run_ids))).all()
        return {r.run_id: Control(**r._mapping) for r in rows}

    # -- steps ---------------------------------------------------------------------

    def step(self, run_id: str, stage: str, disk_key: int = NO_DISK) -> dict[str, Any] | None:
        with self._tx() as c:
            row = c.execute(
                sa.select(run_steps.c.result).where(
                    run_steps.c.run_id == run_id,
                    run_steps.c.stage == stage,
                    run_steps.c.disk_key == disk_key,
                )
            ).first()
        if row is None:
            return None
        result: dict[str, Any] = json.loads(row.result)
        return result

    def steps(self, run_id: str, stage: str) -> dict[int, dict[str, Any]]:
        with self._tx() as c:
            rows = c.execute(
                sa.select(run_steps.c.disk_key, run_steps.c.result).where(
                    run_steps.c.run_id == run_id, run_steps.c.stage == stage
                )
            ).all()
        return {r.disk_key: json.loads(r.result) for r in rows}

    def step_done(self, run_id: str, stage: str, disk_key: int, result: dict[str, Any]) -> None:
        with self.db.write_tx(f"run:{run_id}") as c:
            c.execute(
                run_steps.delete().where(
                    run_steps.c.run_id == run_id,
                    run_steps.c.stage == stage,
                    run_steps.c.disk_key == disk_key,
                )
            )
            c.execute(
                run_steps.insert().values(
                    run_id=run_id,
                    stage=stage,
                    disk_key=disk_key,
                    result=json.dumps(result),
                    done_at=_now(),
                )
            )

    # -- side effects: snapshots -----------------------------------------------------

    def snapshot_intent(self, run_id: str, vm_uuid: str, name: str) -> Effect:
        """Record (once) that this run is about to create snapshot `name` on the VM."""
        mine = sa.select(side_effects).where(
            side_effects.c.run_id == run_id,
            side_effects.c.kind == SNAPSHOT,
            side_effects.c.name == name,
            side_effects.c.state == PENDING,
        )
        with self.db.write_tx(f"run:{run_id}") as c:
            row = c.execute(mine).first()
            if row is None:
                now = _now()
                c.execute(
                    side_effects.insert().values(
                        run_id=run_id,
                        kind=SNAPSHOT,
                        target=vm_uuid,
                        name=name,
                        ref=None,
                        detail="{}",
                        state=PENDING,
                        created_at=now,
                        updated_at=now,
                    )
                )
                row = c.execute(mine).first()
        assert row is not None
        return _effect(row)

    def snapshot_created(self, effect_id: int, snap: SnapshotInfo) -> None:
        detail = {"disks": [asdict(d) for d in snap.disks]}
        with self._tx() as c:
            c.execute(
                side_effects.update()
                .where(side_effects.c.id == effect_id)
                .values(ref=snap.ref, detail=json.dumps(detail), updated_at=_now())
            )

    def undone(self, effect_id: int, state: str = UNDONE) -> None:
        with self._tx() as c:
            c.execute(
                side_effects.update()
                .where(side_effects.c.id == effect_id)
                .values(state=state, updated_at=_now())
            )

    def snapshots_removed(self, vm_uuid: str, names: list[str]) -> None:
        """Snapshots removed by a sweep: their pending entries are settled."""
        if not names:
            return
        with self._tx() as c:
            c.execute(
                side_effects.update()
                .where(
                    side_effects.c.kind == SNAPSHOT,
                    side_effects.c.target == vm_uuid,
                    side_effects.c.name.in_(names),
                    side_effects.c.state == PENDING,
                )
                .values(state=UNDONE, updated_at=_now())
            )

    def pending(self, kind: str | None = None, run_id: str | None = None) -> list[Effect]:
        q = sa.select(side_effects).where(side_effects.c.state == PENDING)
        if kind is not None:
            q = q.where(side_effects.c.kind == kind)
        if run_id is not None:
            q = q.where(side_effects.c.run_id == run_id)
        with self._tx() as c:
            rows = c.execute(q.order_by(side_effects.c.id)).all()
        return [_effect(r) for r in rows]

    # -- side effects: multipart uploads (the S3 adapter's UploadJournal) -------------

    def upload_started(self, key: str, upload_id: str) -> None:
        now = _now()
        with self._tx() as c:
            c.execute(
                side_effects.insert().values(
                    run_id=None,
                    kind=MULTIPART,
                    target=key,
                    name=None,
                    ref=upload_id,
                    detail="{}",
                    state=PENDING,
                    created_at=now,
                    updated_at=now,
                    owner=self.member,
                )
            )
        crash_point("multipart-created")

    def upload_ended(self, key: str, upload_id: str) -> None:
        with self._tx() as c:
            c.execute(
                side_effects.update()
                .where(
                    side_effects.c.kind == MULTIPART,
                    side_effects.c.target == key,
                    side_effects.c.ref == upload_id,
                )
                .values(state=DONE, updated_at=_now())
            )


def _effect(row: Any) -> Effect:
    m = dict(row._mapping)
    m["detail"] = json.loads(m["detail"] or "{}")
    m.pop("updated_at", None)
    return Effect(**m)
