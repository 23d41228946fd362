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

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from connector.adapters.state import StateStore, metadata, runs
from connector.domain.model import DiskInfo, SnapshotInfo
from connector.faults import crash_point

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

SNAPSHOT = "snapshot"
MULTIPART = "multipart"
PENDING = "pending"
UNDONE = "undone"
DONE = "done"
NO_DISK = -1


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Control:
    run_id: str
    job_id: str | None
    seq: int
    attempts: int
    host: str | None
    failed_stage: str | None
    failure: str | None
    progress_done: int
    progress_total: int
    detail: str
    updated_at: str


@dataclass(frozen=True)
class Effect:
    id: int
    run_id: str | None
    kind: str
    target: str
    name: str | None
    ref: str | None
    detail: dict[str, Any]
    state: str
    created_at: str

    def snapshot(self) -> SnapshotInfo:
        """The recorded snapshot with its frozen disks (after `snapshot_created`)."""
        disks = tuple(DiskInfo(**d) for d in self.detail.get("disks", []))
        return SnapshotInfo(ref=self.ref or "", name=self.name or "", disks=disks)


class RunLedger:
    def __init__(self, state: StateStore) -> None:
        self.state = state
        self.engine = state.engine
        metadata.create_all(self.engine, tables=[run_control, run_steps, side_effects])

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- run control ---------------------------------------------------------------

    def ensure_control(
        self, run_id: str, job_id: str | None = None, conn: Connection | None = None
    ) -> Control:
        if conn is None:
            with self._tx() as c:
                return self.ensure_control(run_id, job_id, c)
        row = conn.execute(sa.select(run_control).where(run_control.c.run_id == run_id)).first()
        if row is None:
            conn.execute(
                run_control.insert().values(
                    run_id=run_id,
                    job_id=job_id,
                    seq=0,
                    attempts=0,
                    progress_done=0,
                    progress_total=0,
                    detail="",
                    updated_at=_now(),
                )
            )
            row = conn.execute(sa.select(run_control).where(run_control.c.run_id == run_id)).first()
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
    ) -> int:
        """Move the run's token on (a new stage, a retry, an admission); return the new seq.

        A queued task carries the seq it was enqueued with; only the task whose seq
        is current runs, so a duplicate or stale task is a no-op.
        """
        with self._tx() as c:
            ctl = self.ensure_control(run_id, conn=c)
            values: dict[str, Any] = {"seq": ctl.seq + 1, "updated_at": _now()}
            if stage is not None:
                values["attempts"] = 0
                values["detail"] = ""
            if attempts is not None:
                values["attempts"] = attempts
            if host is not None:
                values["host"] = host
            c.execute(run_control.update().where(run_control.c.run_id == run_id).values(**values))
            run_values: dict[str, Any] = {}
            if stage is not None:
                run_values["stage"] = stage
            if state is not None:
                run_values["state"] = state
            if run_values:
                c.execute(runs.update().where(runs.c.id == run_id).values(**run_values))
        return int(values["seq"])

    def set_failure(self, run_id: str, failed_stage: str, reason: str) -> None:
        with self._tx() as c:
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
        with self._tx() as c:
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
        with self._tx() as c:
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
