"""`connector status`: is the connector healthy, and where does each job stand.

The use case assembles one report from the state ports (the jobs, the catalog,
the runs) and three small callables the composition root hands it: a probe of
vCenter (a login), a probe of S3 (HeadBucket), each with a short timeout and
raising on failure, and the holder of the daemon's state lock. It decides
HEALTHY or UNHEALTHY and says why; the CLI only prints the report.

UNHEALTHY when vCenter or S3 cannot be reached or refuses the connector, when a
job is PAUSED_ON_FAILURE or FAILING, when a run has been ACTIVE for longer than
the limit, or when the daemon is not running while a job has work for it (with
no such job, a stopped daemon is reported but is not a fault).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from connector.domain.jobs import (
    AUTOMATIC,
    JOB_DELETING,
    JOB_FAILING,
    JOB_PAUSED_ON_FAILURE,
    RUN_ACTIVE,
    RUN_COMPLETED,
    SCHEDULED_STATES,
    JobRow,
    next_run_time,
)
from connector.domain.records import RunRow, ServerRow
from connector.domain.times import iso, parse, utcnow
from connector.errors import ConnectorError, NotFoundError
from connector.logging import scrub

HEALTHY = "HEALTHY"
UNHEALTHY = "UNHEALTHY"

# The on-demand quota counts runs started in this window (as AWS SMS did).
QUOTA_WINDOW = dt.timedelta(hours=24)

Probe = Callable[[], None]
"""Checks one service; returns when it answers and accepts us, raises otherwise."""


class JobSource(Protocol):
    """What the report reads of the jobs (`adapters/jobstore.py` JobStore is one)."""

    def all(self, include_deleted: bool = False) -> list[JobRow]: ...

    def run_ids(self, job_id: str) -> list[str]: ...

    def on_demand_since(self, job_id: str, since: dt.datetime) -> int:
        """On-demand runs of the job started since `since` (what `jobs start` counts)."""
        ...


class ServerSource(Protocol):
    def server(self, server_id: str) -> ServerRow: ...


class RunSource(Protocol):
    def runs(self, server_id: str | None = None) -> list[RunRow]: ...


@dataclass(frozen=True)
class Service:
    """One service the connector depends on, and whether it answered."""

    name: str  # vCenter, S3
    target: str  # the URL or bucket checked
    configured: bool
    reachable: bool
    error: str | None = None


@dataclass(frozen=True)
class DaemonState:
    running: bool
    holder: str | None  # the state lock's holder ("pid 12: connector run"), or None


@dataclass(frozen=True)
class RunSummary:
    id: str
    type: str
    state: str
    started_at: str
    finished_at: str | None
    bytes_uploaded: int = 0
    bytes_read: int = 0


@dataclass(frozen=True)
class JobHealth:
    id: str
    vm_name: str
    vm_uuid: str
    state: str
    paused: bool
    message: str
    last_run: RunSummary | None
    last_completed_run: RunSummary | None
    next_run: str | None
    lag_seconds: int | None  # since the end of the last completed run
    on_demand_quota: int
    on_demand_used: int
    on_demand_left: int


@dataclass(frozen=True)
class StatusReport:
    status: str  # HEALTHY or UNHEALTHY
    reasons: list[str]
    version: str
    checked_at: str
    daemon: DaemonState
    vcenter: Service
    s3: Service
    jobs: list[JobHealth] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.status == HEALTHY


@dataclass(frozen=True)
class StatusSettings:
    version: str
    on_demand_quota: int
    schedule_unit_seconds: float = 3600.0
    vcenter_target: str | None = None  # None: no vCenter configured (local transport)
    s3_target: str = ""
    store_name: str = "S3"  # "replica store" for [store] kind = "local"


class Status:
    """Builds the `connector status` report."""

    def __init__(
        self,
        *,
        jobs: JobSource,
        catalog: ServerSource,
        runs: RunSource,
        probe_vcenter: Probe | None,
        probe_s3: Probe,
        daemon_holder: Callable[[], str | None],
        settings: StatusSettings,
        now: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._jobs = jobs
        self._catalog = catalog
        self._runs = runs
        self._probe_vcenter = probe_vcenter
        self._probe_s3 = probe_s3
        self._daemon_holder = daemon_holder
        self._settings = settings
        self._now = now

    def report(self, active_limit: dt.timedelta) -> StatusReport:
        """Check the services and read the jobs; `active_limit` is how long a run may
        stay ACTIVE before it counts as stuck."""
        now = self._now().replace(microsecond=0)
        reasons: list[str] = []
        vcenter = self._check_vcenter()
        if vcenter.configured and not vcenter.reachable:
            reasons.append(f"vCenter at {vcenter.target}: {vcenter.error}")
        s3 = _check(self._settings.store_name, self._settings.s3_target, self._probe_s3)
        if not s3.reachable:
            reasons.append(f"{s3.name} {s3.target}: {s3.error}")
        daemon = self._daemon()
        jobs = self._jobs.all()
        health = []
        for job in jobs:
            runs = self._job_runs(job)
            h = self._job(job, runs, now)
            health.append(h)
            if job.state in (JOB_PAUSED_ON_FAILURE, JOB_FAILING):
                reasons.append(f"job {job.id} (VM {h.vm_name}) is {job.state}: {job.message}")
            reasons += _stuck_runs(job, runs, now, active_limit)
        waiting = [j.id for j in jobs if _needs_daemon(j)]
        if not daemon.running and waiting:
            reasons.append(
                f"the daemon (`connector run`) is not running; {len(waiting)} job(s) wait "
                f"for it: {', '.join(waiting)}"
            )
        return StatusReport(
            status=UNHEALTHY if reasons else HEALTHY,
            reasons=reasons,
            version=self._settings.version,
            checked_at=iso(now),
            daemon=daemon,
            vcenter=vcenter,
            s3=s3,
            jobs=health,
        )

    def _check_vcenter(self) -> Service:
        target = self._settings.vcenter_target
        if self._probe_vcenter is None or target is None:
            return Service("vCenter", "", configured=False, reachable=False)
        return _check("vCenter", target, self._probe_vcenter)

    def _daemon(self) -> DaemonState:
        holder = self._daemon_holder()
        return DaemonState(
            running=holder is not None and holder.endswith("connector run"), holder=holder
        )

    def _job_runs(self, job: JobRow) -> list[RunRow]:
        ids = set(self._jobs.run_ids(job.id))
        if not ids:
            return []
        return [r for r in self._runs.runs(job.server_id) if r.id in ids]

    def _job(self, job: JobRow, runs: list[RunRow], now: dt.datetime) -> JobHealth:
        try:
            server = self._catalog.server(job.server_id)
            vm_name, vm_uuid = server.name, server.vm_uuid
        except NotFoundError:
            vm_name, vm_uuid = "?", "?"
        completed = [r for r in runs if r.state == RUN_COMPLETED and r.finished_at]
        last_ok = max(completed, key=lambda r: r.finished_at or "", default=None)
        ended = last_ok.finished_at if last_ok else None
        lag = int((now - parse(ended)).total_seconds()) if ended else None
        # Counted as `jobs start` counts them, so the two never disagree.
        used = self._jobs.on_demand_since(job.id, now - QUOTA_WINDOW)
        quota = self._settings.on_demand_quota
        return JobHealth(
            id=job.id,
            vm_name=vm_name,
            vm_uuid=vm_uuid,
            state=job.state,
            paused=job.paused,
            message=job.message,
            last_run=_summary(runs[-1]) if runs else None,
            last_completed_run=_summary(last_ok) if last_ok else None,
            next_run=self._next_run(job, runs, now),
            lag_seconds=max(lag, 0) if lag is not None else None,
            on_demand_quota=quota,
            on_demand_used=used,
            on_demand_left=max(quota - used, 0),
        )

    def _next_run(self, job: JobRow, runs: list[RunRow], now: dt.datetime) -> str | None:
        """As `connector jobs show` computes it: none for a paused, finished or invalid job."""
        if job.problem is not None or job.paused or job.state not in SCHEDULED_STATES:
            return None
        ran = any(r.type == AUTOMATIC for r in runs)
        nxt = next_run_time(
            job.seed, job.frequency_hours, now, ran, self._settings.schedule_unit_seconds
        )
        return iso(nxt) if nxt else None


def _stuck_runs(
    job: JobRow, runs: list[RunRow], now: dt.datetime, limit: dt.timedelta
) -> list[str]:
    """A reason for each run of the job ACTIVE for longer than `limit` (counted from
    when the run was created, its queueing included)."""
    reasons = []
    for r in runs:
        if r.state != RUN_ACTIVE:
            continue
        age = now - parse(r.started_at)
        if age > limit:
            reasons.append(
                f"run {r.id} of job {job.id} has been ACTIVE for {_hours(age)} "
                f"(more than {_hours(limit)}), in stage {r.stage}"
            )
    return reasons


def _check(name: str, target: str, probe: Probe) -> Service:
    """Run one probe; a failure gives its reason, scrubbed of secrets."""
    try:
        probe()
    except ConnectorError as exc:
        return Service(name, target, True, False, scrub(str(exc)))
    except Exception as exc:  # a probe must never break the report
        return Service(name, target, True, False, scrub(f"{type(exc).__name__}: {exc}"))
    return Service(name, target, True, True)


def _needs_daemon(job: JobRow) -> bool:
    """A job the daemon has work for: on its schedule, or being deleted."""
    return job.state == JOB_DELETING or (not job.paused and job.state in SCHEDULED_STATES)


def _summary(r: RunRow) -> RunSummary:
    uploaded = r.stats.get("bytes_uploaded")
    read = r.stats.get("bytes_read")
    return RunSummary(
        id=r.id,
        type=r.type,
        state=r.state,
        started_at=r.started_at,
        finished_at=r.finished_at,
        bytes_uploaded=int(uploaded)
        if uploaded is not None
        else sum(d.pack_bytes for d in r.disks),
        bytes_read=int(read) if read is not None else sum(d.bytes_read for d in r.disks),
    )


def _hours(delta: dt.timedelta) -> str:
    return f"{delta.total_seconds() / 3600:.1f} h"
