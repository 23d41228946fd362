"""Replication jobs in the state database, and the run queries the daemon needs.

A job belongs to one VM (server); at most one job that is not DELETED exists
per VM. Runs of a job are rows of the `runs` table whose `run_control.job_id`
names the job.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from connector.adapters.ledger import RunLedger, run_control
from connector.adapters.state import RunRow, StateStore, metadata, runs, servers
from connector.domain.jobs import (
    JOB_DELETED,
    JOB_PENDING,
    LIVE_RUN_STATES,
    ON_DEMAND,
    RUN_ACTIVE,
    RUN_COMPLETED,
    RUN_MISSED,
    JobSpec,
    JobStatus,
)
from connector.errors import InvalidInputError, NotFoundError

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
)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class JobRow:
    id: str
    server_id: str
    state: str
    paused: bool
    seed_time: str
    frequency_hours: int | None
    retention: int
    description: str
    consecutive_failures: int
    message: str
    created_at: str
    updated_at: str

    @property
    def run_once(self) -> bool:
        return self.frequency_hours is None

    @property
    def seed(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.seed_time.replace("Z", "+00:00"))

    @property
    def status(self) -> JobStatus:
        return JobStatus(self.state, self.consecutive_failures, self.message)


class JobStore:
    def __init__(self, state: StateStore, ledger: RunLedger) -> None:
        self.state = state
        self.ledger = ledger
        self.engine = state.engine
        metadata.create_all(self.engine, tables=[jobs])

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # -- jobs ----------------------------------------------------------------------

    def create(self, server_id: str, spec: JobSpec) -> JobRow:
        existing = self.for_server(server_id)
        if existing is not None:
            raise InvalidInputError(
                f"the VM already has job {existing.id} ({existing.state}); change it with "
                "`connector jobs update` or delete it first"
            )
        job_id = "j-" + os.urandom(6).hex()
        now = _now()
        with self._tx() as c:
            c.execute(
                jobs.insert().values(
                    id=job_id,
                    server_id=server_id,
                    state=JOB_PENDING,
                    paused=False,
                    seed_time=iso(spec.seed_time),
                    frequency_hours=spec.frequency_hours,
                    retention=spec.retention,
                    description=spec.description,
                    consecutive_failures=0,
                    message="",
                    created_at=now,
                    updated_at=now,
                )
            )
        return self.get(job_id)

    def get(self, job_id: str) -> JobRow:
        with self._tx() as c:
            row = c.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        if row is None:
            raise NotFoundError(f"no job {job_id}; list them with `connector jobs list`")
        return JobRow(**row._mapping)

    def for_server(self, server_id: str) -> JobRow | None:
        with self._tx() as c:
            row = c.execute(
                sa.select(jobs).where(jobs.c.server_id == server_id, jobs.c.state != JOB_DELETED)
            ).first()
        return None if row is None else JobRow(**row._mapping)

    def find(self, ref: str) -> JobRow:
        """A job by its id, or by the name or instance UUID of its VM."""
        with self._tx() as c:
            row = c.execute(sa.select(jobs).where(jobs.c.id == ref)).first()
            if row is not None:
                return JobRow(**row._mapping)
            rows = c.execute(
                sa.select(jobs)
                .join(servers, servers.c.id == jobs.c.server_id)
                .where(
                    jobs.c.state != JOB_DELETED,
                    sa.or_(servers.c.name == ref, servers.c.vm_uuid == ref),
                )
            ).all()
        if not rows:
            raise NotFoundError(
                f"no job {ref!r} (by job id, VM name or instance UUID); list them with "
                "`connector jobs list`"
            )
        if len(rows) > 1:
            ids = ", ".join(r.id for r in rows)
            raise InvalidInputError(f"{len(rows)} jobs match {ref!r} ({ids}); use the job id")
        return JobRow(**rows[0]._mapping)

    def all(self, include_deleted: bool = False) -> list[JobRow]:
        q = sa.select(jobs).order_by(jobs.c.created_at, jobs.c.id)
        if not include_deleted:
            q = q.where(jobs.c.state != JOB_DELETED)
        with self._tx() as c:
            rows = c.execute(q).all()
        return [JobRow(**r._mapping) for r in rows]

    def update(self, job_id: str, **values: object) -> JobRow:
        with self._tx() as c:
            c.execute(jobs.update().where(jobs.c.id == job_id).values(updated_at=_now(), **values))
        return self.get(job_id)

    def set_status(self, job_id: str, status: JobStatus) -> JobRow:
        return self.update(
            job_id,
            state=status.state,
            consecutive_failures=status.consecutive_failures,
            message=status.message,
        )

    # -- runs of jobs --------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        job: JobRow,
        run_type: str,
        state: str,
        error: str | None = None,
    ) -> None:
        """A new run of a job: PENDING (to be queued) or MISSED (recorded, never run)."""
        now = _now()
        terminal = state == RUN_MISSED
        with self._tx() as c:
            c.execute(
                runs.insert().values(
                    id=run_id,
                    server_id=job.server_id,
                    type=run_type,
                    state=state,
                    stage="missed" if terminal else "queued",
                    started_at=now,
                    finished_at=now if terminal else None,
                    error=error,
                    stats="{}",
                )
            )
            self.ledger.ensure_control(run_id, job.id, conn=c)

    def job_of_run(self, run_id: str) -> JobRow | None:
        ctl = self.ledger.control(run_id)
        if ctl is None or ctl.job_id is None:
            return None
        try:
            return self.get(ctl.job_id)
        except NotFoundError:
            return None

    def run_ids(self, job_id: str) -> list[str]:
        with self._tx() as c:
            rows = c.execute(
                sa.select(run_control.c.run_id).where(run_control.c.job_id == job_id)
            ).all()
        return [r.run_id for r in rows]

    def runs_of(self, job_id: str) -> list[RunRow]:
        ids = set(self.run_ids(job_id))
        if not ids:
            return []
        server_id = self.get(job_id).server_id
        return [r for r in self.state.runs(server_id) if r.id in ids]

    def live_runs(self, server_id: str, exclude: str | None = None) -> list[RunRow]:
        """Runs of the VM that are PENDING or ACTIVE."""
        with self._tx() as c:
            rows = c.execute(
                sa.select(runs.c.id)
                .where(runs.c.server_id == server_id, runs.c.state.in_(LIVE_RUN_STATES))
                .order_by(runs.c.started_at)
            ).all()
        return [self.state.run(r.id) for r in rows if r.id != exclude]

    def active_runs(self) -> list[tuple[str, str | None]]:
        """(run id, ESXi host) of every ACTIVE run."""
        with self._tx() as c:
            rows = c.execute(
                sa.select(runs.c.id, run_control.c.host)
                .select_from(runs.outerjoin(run_control, run_control.c.run_id == runs.c.id))
                .where(runs.c.state == RUN_ACTIVE)
            ).all()
        return [(r.id, r.host) for r in rows]

    def on_demand_since(self, job_id: str, since: dt.datetime) -> int:
        """On-demand runs of the job started since `since` (missed ones do not count)."""
        stamp = since.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with self._tx() as c:
            n = c.execute(
                sa.select(sa.func.count())
                .select_from(runs.join(run_control, run_control.c.run_id == runs.c.id))
                .where(
                    run_control.c.job_id == job_id,
                    runs.c.type == ON_DEMAND,
                    runs.c.state != RUN_MISSED,
                    runs.c.started_at >= stamp,
                )
            ).scalar_one()
        return int(n)

    def count_runs(self, job_id: str, run_type: str | None = None, state: str | None = None) -> int:
        q = (
            sa.select(sa.func.count())
            .select_from(runs.join(run_control, run_control.c.run_id == runs.c.id))
            .where(run_control.c.job_id == job_id)
        )
        if run_type is not None:
            q = q.where(runs.c.type == run_type)
        if state is not None:
            q = q.where(runs.c.state == state)
        with self._tx() as c:
            return int(c.execute(q).scalar_one())

    def has_completed_run(self, job_id: str) -> bool:
        return self.count_runs(job_id, state=RUN_COMPLETED) > 0

    def mark_run(self, run_id: str, state: str, error: str | None) -> None:
        """End a run that never started (MISSED, or FAILED before admission)."""
        with self._tx() as c:
            c.execute(
                runs.update()
                .where(runs.c.id == run_id)
                .values(state=state, error=error, finished_at=_now())
            )

    def set_run_state(self, run_id: str, state: str) -> None:
        with self._tx() as c:
            c.execute(runs.update().where(runs.c.id == run_id).values(state=state))
