"""Replication jobs as users manage them: create, update, start, pause, resume, delete.

One use case behind both the `connector jobs` commands and the HTTPS API, so the
two can never disagree: the same checks (the on-demand quota, a deleted job
refused), the same documents (`document`, what `jobs show --json` prints and the
API returns), and the same audit records. Every action is recorded in the audit
log (`job.create`, `job.update`, `job.start`, `job.pause`, `job.resume`,
`job.delete`) with its outcome, a refused one included; `actor` names who asked
(the API passes its client, the CLI the user running it).

The composition root hands it the job store, the catalog, the run controls, a
VM resolver, a way to enqueue a run, the audit log and its settings.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from connector.domain.jobs import (
    AUTOMATIC,
    JOB_DELETED,
    JOB_DELETING,
    ON_DEMAND,
    RUN_PENDING,
    SCHEDULED_STATES,
    JobRow,
    JobSpec,
    JobStatus,
    make_spec,
    next_run_time,
    on_demand_refusal,
    on_resume,
    parse_seed_time,
    validate_description,
    validate_frequency,
    validate_retention,
    validate_seed_time,
)
from connector.domain.records import Control, RunRow, ServerRow, new_run_id
from connector.domain.times import iso
from connector.errors import ConnectorError, InvalidInputError
from connector.ports import Auditor

# The on-demand quota counts runs started in this window (as AWS SMS did).
QUOTA_WINDOW = dt.timedelta(hours=24)
_UNSET: Any = object()


class JobRecords(Protocol):
    """What the use case reads and writes of the jobs (`adapters/jobstore.py` JobStore)."""

    def create(self, server_id: str, spec: JobSpec) -> JobRow: ...
    def get(self, job_id: str) -> JobRow: ...
    def find(self, ref: str) -> JobRow: ...
    def all(self, include_deleted: bool = False) -> list[JobRow]: ...
    def update(self, job_id: str, **values: object) -> JobRow: ...
    def set_status(self, job_id: str, status: JobStatus) -> JobRow: ...
    def create_run(
        self,
        run_id: str,
        job: JobRow,
        run_type: str,
        state: str,
        error: str | None = None,
        schedule_key: str | None = None,
    ) -> bool: ...
    def runs_of(self, job_id: str) -> list[RunRow]: ...
    def live_runs(self, server_id: str, exclude: str | None = None) -> list[RunRow]: ...
    def on_demand_since(self, job_id: str, since: dt.datetime) -> int: ...
    def count_runs(
        self, job_id: str, run_type: str | None = None, state: str | None = None
    ) -> int: ...
    def has_completed_run(self, job_id: str) -> bool: ...


class ServerLookup(Protocol):
    def server(self, server_id: str) -> ServerRow: ...


class RunControlsLookup(Protocol):
    def controls(self, run_ids: list[str]) -> dict[str, Control]: ...


class RetentionRule(Protocol):
    """The one retention rule (`application/retention.py` Retention): a VM's own
    setting, else `[retention] keep`."""

    def keep_for(self, server_id: str) -> tuple[int, str]: ...


class RetentionSetter(Protocol):
    def set_retention(self, server_id: str, keep: int | None) -> None: ...


@dataclass(frozen=True)
class JobSettings:
    on_demand_quota: int  # [daemon] on_demand_quota_per_24h
    schedule_unit_seconds: float = 3600.0


@dataclass(frozen=True)
class Started:
    """An on-demand run put in the queue."""

    run_id: str
    job_id: str
    state: str = RUN_PENDING


def now_utc() -> dt.datetime:
    """Now in UTC, to the second (seed times and quotas are compared with it)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


class JobActions:
    def __init__(
        self,
        *,
        jobs: JobRecords,
        catalog: ServerLookup,
        controls: RunControlsLookup,
        resolve_vm: Callable[[str], ServerRow],
        enqueue: Callable[[str], None],
        audit: Auditor,
        settings: JobSettings,
        retention: RetentionRule,
        retention_settings: RetentionSetter,
        now: Callable[[], dt.datetime] = now_utc,
    ) -> None:
        self._jobs = jobs
        self._catalog = catalog
        self._controls = controls
        self._resolve_vm = resolve_vm
        self._enqueue = enqueue
        self._audit = audit
        self.settings = settings
        self._retention = retention
        self._retention_settings = retention_settings
        self._now = now

    # -- reading -----------------------------------------------------------------------

    def find(self, ref: str) -> JobRow:
        """A job by its id, or by the name or instance UUID of its VM."""
        return self._jobs.find(ref)

    def all(self, include_deleted: bool = False) -> list[JobRow]:
        return self._jobs.all(include_deleted)

    def document(self, job: JobRow, with_runs: bool = False) -> dict[str, Any]:
        """A job as `jobs show --json` prints it: its row, its VM, its next run, the
        on-demand quota, and (`with_runs`) its runs with their progress.

        A stored job with an invalid field has no next run and says why in `problem`
        (the daemon does not schedule it)."""
        server = self._catalog.server(job.server_id)
        problem = job.problem
        now = self._now()
        ran = self._jobs.count_runs(job.id, run_type=AUTOMATIC) > 0
        nxt = (
            next_run_time(
                job.seed, job.frequency_hours, now, ran, self.settings.schedule_unit_seconds
            )
            if problem is None and not job.paused and job.state in SCHEDULED_STATES
            else None
        )
        used = self._jobs.on_demand_since(job.id, now - QUOTA_WINDOW)
        quota = self.settings.on_demand_quota
        doc: dict[str, Any] = asdict(job)
        keep, source = self._retention.keep_for(job.server_id)
        doc.update(
            retention=keep,  # what the one retention rule keeps for this VM now
            retention_from=source,  # "vm": its own setting; "default": [retention] keep
            vm_name=server.name,
            vm_uuid=server.vm_uuid,
            run_once=job.run_once,
            next_run=iso(nxt) if nxt else None,
            problem=problem,
            retention_pending=_retention_pending(job),
            on_demand={"quota": quota, "used": used, "left": max(quota - used, 0)},
        )
        if with_runs:
            doc["runs"] = self.run_documents(self._jobs.runs_of(job.id))
        return doc

    def run_documents(self, rows: list[RunRow]) -> list[dict[str, Any]]:
        """Runs as documents, with the job and the progress the ledger holds of each."""
        controls = self._controls.controls([r.id for r in rows])
        docs = []
        for r in rows:
            doc = asdict(r)
            ctl = controls.get(r.id)
            doc["job_id"] = ctl.job_id if ctl else None
            doc["progress"] = (
                {
                    "done": ctl.progress_done,
                    "total": ctl.progress_total,
                    "detail": ctl.detail,
                    "attempts": ctl.attempts,
                }
                if ctl
                else None
            )
            docs.append(doc)
        return docs

    # -- changing ----------------------------------------------------------------------

    def create(
        self,
        vm: str,
        *,
        frequency_hours: int | None,
        seed: str | None = None,
        retention: int | None = None,
        description: str | None = None,
        actor: str | None = None,
    ) -> JobRow:
        """A job for the VM named `vm` (name, instance UUID or server id); `seed` is
        ISO 8601 or 'now' (the default); `frequency_hours` None: run once."""
        with self._audited("job.create", vm, actor) as rec:
            now = self._now()
            server = self._resolve_vm(vm)
            spec = make_spec(
                parse_seed_time(seed or "now", now),
                frequency_hours,
                self._retention.keep_for(server.id)[0] if retention is None else retention,
                description or "",
                now=now,
            )
            if retention is not None:
                self._retention_settings.set_retention(server.id, spec.retention)
            job = self._jobs.create(server.id, spec)
            rec.update(job=job.id, server=server.id)
            return job

    def update(
        self,
        ref: str,
        *,
        frequency_hours: int | None = _UNSET,
        seed: str | None = None,
        retention: int | None = None,
        description: str | None = None,
        actor: str | None = None,
    ) -> JobRow:
        """Change what is given; `frequency_hours=None` makes the job run once."""
        with self._audited("job.update", ref, actor) as rec:
            values: dict[str, Any] = {}
            if frequency_hours is not _UNSET:
                values["frequency_hours"] = validate_frequency(frequency_hours)
            if seed is not None:
                now = self._now()
                values["seed_time"] = iso(validate_seed_time(parse_seed_time(seed, now), now))
            if retention is not None:
                values["retention"] = validate_retention(retention)
            if description is not None:
                values["description"] = validate_description(description)
            if not values:
                raise InvalidInputError(
                    "nothing to change: give the frequency (or run once), the seed time, "
                    "the retention or the description"
                )
            row = self._jobs.find(ref)
            refuse_deleted(row)
            rec.update(job=row.id, changed=sorted(values))
            if retention is not None:
                self._retention_settings.set_retention(row.server_id, values["retention"])
            return self._jobs.update(row.id, **values)

    def start(self, ref: str, actor: str | None = None) -> Started:
        """Queue an on-demand run now, within the on-demand quota; the daemon runs it."""
        with self._audited("job.start", ref, actor) as rec:
            row = self._jobs.find(ref)
            rec.update(job=row.id)
            refusal = on_demand_refusal(
                live_runs=len(self._jobs.live_runs(row.server_id)),
                on_demand_last_24h=self._jobs.on_demand_since(row.id, self._now() - QUOTA_WINDOW),
                quota=self.settings.on_demand_quota,
                job_state=row.state,
            )
            if refusal:
                raise InvalidInputError(f"cannot start a run of job {row.id}: {refusal}")
            run_id = new_run_id()
            self._jobs.create_run(run_id, row, ON_DEMAND, RUN_PENDING)
            self._enqueue(run_id)
            rec.update(run=run_id)
            return Started(run_id, row.id)

    def pause(self, ref: str, actor: str | None = None) -> JobRow:
        """Stop scheduling runs of the job (a running run finishes)."""
        with self._audited("job.pause", ref, actor) as rec:
            row = self._jobs.find(ref)
            rec.update(job=row.id)
            refuse_deleted(row)
            return self._jobs.update(row.id, paused=True)

    def resume(self, ref: str, actor: str | None = None) -> JobRow:
        """Put a paused job (by pause, or PAUSED_ON_FAILURE) back on its schedule."""
        with self._audited("job.resume", ref, actor) as rec:
            row = self._jobs.find(ref)
            rec.update(job=row.id)
            status = on_resume(row.status, self._jobs.has_completed_run(row.id))
            self._jobs.set_status(row.id, status)
            return self._jobs.update(row.id, paused=False)

    def delete(self, ref: str, actor: str | None = None) -> JobRow:
        """No more runs; an active run is stopped and rolled back (the daemon does it).
        Replicas already in the store are kept (retention and purge remove them)."""
        with self._audited("job.delete", ref, actor) as rec:
            row = self._jobs.find(ref)
            rec.update(job=row.id)
            refuse_deleted(row)
            live = self._jobs.live_runs(row.server_id)
            state = JOB_DELETING if live else JOB_DELETED
            message = "deleting: waiting for the active run to stop" if live else "deleted"
            return self._jobs.update(row.id, state=state, message=message)

    @contextmanager
    def _audited(self, action: str, obj: str, actor: str | None) -> Iterator[dict[str, Any]]:
        """Record the action with its outcome; a refused one with the reason."""
        extra: dict[str, Any] = {}
        try:
            yield extra
        except ConnectorError as exc:
            self._audit.record(action, obj, "failure", actor=actor, **extra, error=str(exc))
            raise
        self._audit.record(action, obj, "success", actor=actor, **extra)


def _retention_pending(job: JobRow) -> dict[str, Any] | None:
    """The retention a completed run owes and has not had applied yet, or None."""
    if job.retention_due is None:
        return None
    return {
        "state": "failed" if job.retention_attempts else "pending",
        "since": job.retention_due,
        "attempts": job.retention_attempts,
        "next_try": job.retention_next_at,
        "error": job.retention_error,
    }


def refuse_deleted(job: JobRow) -> None:
    """Refuse to change a job that is deleted or being deleted."""
    if job.state in (JOB_DELETING, JOB_DELETED):
        raise InvalidInputError(f"job {job.id} is {job.state}; create a new job for the VM")
