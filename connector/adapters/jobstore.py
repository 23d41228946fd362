"""Replication jobs in the state database, and the run queries the daemon needs.

A job belongs to one VM (server); at most one job that is not DELETED exists
per VM. Runs of a job are rows of the `runs` table whose `run_control.job_id`
names the job.
"""

from __future__ import annotations

import datetime as dt
import json
import os

import sqlalchemy as sa

from connector.adapters.ledger import RunLedger
from connector.adapters.runs import SqlRuns
from connector.adapters.sql import jobs, run_control, runs, servers
from connector.adapters.state import StateStore
from connector.domain.jobs import (
    JOB_DELETED,
    JOB_PENDING,
    LIVE_RUN_STATES,
    ON_DEMAND,
    RUN_ACTIVE,
    RUN_COMPLETED,
    RUN_MISSED,
    JobRow,
    JobSpec,
    JobStatus,
)
from connector.domain.landing import LandingSpec
from connector.domain.records import RunRow
from connector.domain.times import iso, stamp
from connector.errors import InvalidInputError, NotFoundError

__all__ = ["JobRow", "JobStore", "iso"]

_now = stamp


class JobStore:
    """Jobs, and the queries about runs of jobs the daemon needs; run rows are
    written through `SqlRuns`."""

    def __init__(self, state: StateStore, ledger: RunLedger) -> None:
        self.state = state
        self.ledger = ledger
        self.runs = SqlRuns(state.db)
        self._tx = state.db.tx

    # -- jobs ----------------------------------------------------------------------

    def create(self, server_id: str, spec: JobSpec) -> JobRow:
        job_id = "j-" + os.urandom(6).hex()
        now = _now()
        # One job per VM, also when two commands (on two connectors) create one at once.
        with self.state.db.write_tx(f"jobs:{server_id}") as c:
            existing = c.execute(
                sa.select(jobs).where(jobs.c.server_id == server_id, jobs.c.state != JOB_DELETED)
            ).first()
            if existing is not None:
                raise InvalidInputError(
                    f"the VM already has job {existing.id} ({existing.state}); change it with "
                    "`connector jobs update` or delete it first"
                )
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

    def set_landing(self, job_id: str, spec: LandingSpec | None) -> JobRow:
        """The job's landing settings (None: back to the [landing] defaults)."""
        value = None if spec is None else json.dumps(spec.to_json(), sort_keys=True)
        return self.update(job_id, landing=value)

    def set_status(self, job_id: str, status: JobStatus) -> JobRow:
        return self.update(
            job_id,
            state=status.state,
            consecutive_failures=status.consecutive_failures,
            message=status.message,
        )

    # -- retention owed after completed runs -------------------------------------------

    def retention_owed(self, job_id: str) -> str:
        """Record that the job's retention must be applied now; returns the record's token
        (its time, to the microsecond), which a later try must present to settle it."""
        token = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with self._tx() as c:
            c.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(
                    retention_due=token,
                    retention_attempts=0,
                    retention_next_at=token,
                    retention_error=None,
                )
            )
        return token

    def retention_applied(self, job_id: str, token: str) -> bool:
        """Settle the owed retention, unless a newer run owes it again since `token`."""
        with self._tx() as c:
            done = c.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.retention_due == token)
                .values(
                    retention_due=None,
                    retention_attempts=0,
                    retention_next_at=None,
                    retention_error=None,
                )
            )
        return bool(done.rowcount)

    def retention_failed(self, job_id: str, token: str, error: str, next_at: dt.datetime) -> None:
        """Count a failed try of the owed retention and when to try again."""
        with self._tx() as c:
            c.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.retention_due == token)
                .values(
                    retention_attempts=jobs.c.retention_attempts + 1,
                    retention_next_at=next_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    retention_error=error,
                )
            )

    def retention_to_retry(self, now: dt.datetime) -> list[JobRow]:
        """Jobs whose owed retention is due for another try at `now`."""
        cutoff = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with self._tx() as c:
            rows = c.execute(
                sa.select(jobs)
                .where(jobs.c.retention_due.is_not(None), jobs.c.retention_next_at <= cutoff)
                .order_by(jobs.c.retention_next_at)
            ).all()
        return [JobRow(**r._mapping) for r in rows]

    # -- runs of jobs --------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        job: JobRow,
        run_type: str,
        state: str,
        error: str | None = None,
        schedule_key: str | None = None,
    ) -> bool:
        """A new run of a job: PENDING (to be queued) or MISSED (recorded, never run).

        With `schedule_key` (the job and its scheduled time), a second run of the same
        key is not made: False, nothing changed (a schedule that fired twice)."""
        if schedule_key is not None and self.run_of_schedule(schedule_key) is not None:
            return False
        try:
            with self._tx() as c:
                self.runs.create_run(
                    run_id,
                    job.server_id,
                    run_type,
                    state=state,
                    stage="missed" if state == RUN_MISSED else "queued",
                    error=error,
                    conn=c,
                )
                if schedule_key is not None:
                    c.execute(
                        runs.update().where(runs.c.id == run_id).values(schedule_key=schedule_key)
                    )
                self.ledger.ensure_control(run_id, job.id, conn=c)
        except sa.exc.IntegrityError:
            if schedule_key is not None and self.run_of_schedule(schedule_key) is not None:
                return False
            raise
        return True

    def run_of_schedule(self, schedule_key: str) -> str | None:
        """The run made for a schedule slot, if any."""
        with self._tx() as c:
            return c.execute(
                sa.select(runs.c.id).where(runs.c.schedule_key == schedule_key)
            ).scalar()

    def admit(
        self, run_id: str, server_id: str, host: str, max_total: int, max_per_host: int
    ) -> tuple[str, str, int]:
        """Admit a PENDING run, in one transaction that every connector of a fleet takes
        in turn: ("missed", why, 0) when another run of the VM is active, ("wait", why,
        0) when the fleet or the host has no free slot, ("admitted", "", seq)."""
        with self.state.db.write_tx("admission") as c:
            busy = c.execute(
                sa.select(runs.c.id).where(
                    runs.c.server_id == server_id, runs.c.state == RUN_ACTIVE, runs.c.id != run_id
                )
            ).first()
            if busy is not None:
                return (
                    "missed",
                    f"run {busy.id} of this VM was still active when this run was due",
                    0,
                )
            active = c.execute(
                sa.select(runs.c.id, run_control.c.host)
                .select_from(runs.outerjoin(run_control, run_control.c.run_id == runs.c.id))
                .where(runs.c.state == RUN_ACTIVE)
            ).all()
            on_host = sum(1 for r in active if r.host == host)
            if len(active) >= max_total:
                return "wait", f"{len(active)} runs are active (max_concurrent_runs)", 0
            if on_host >= max_per_host:
                return "wait", f"{on_host} runs are active on host {host} (max_runs_per_host)", 0
            seq = self.ledger.advance(run_id, stage="validate", state=RUN_ACTIVE, host=host, conn=c)
            return "admitted", "", seq

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
        since_stamp = stamp(since)
        with self._tx() as c:
            n = c.execute(
                sa.select(sa.func.count())
                .select_from(runs.join(run_control, run_control.c.run_id == runs.c.id))
                .where(
                    run_control.c.job_id == job_id,
                    runs.c.type == ON_DEMAND,
                    runs.c.state != RUN_MISSED,
                    runs.c.started_at >= since_stamp,
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
        self.runs.end_run(run_id, state, error)
