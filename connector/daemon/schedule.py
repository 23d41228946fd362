"""Schedules: APScheduler fires each job's trigger, and a firing only enqueues.

Triggers come from the job's seed time and frequency: an IntervalTrigger that
starts at the seed time for a recurring job (plus one immediate firing when the
seed time has passed and the job never ran), a DateTrigger for a run-once job.
The jobs table is read again every `sync_interval` seconds, so that changes
made with the CLI (create, update, pause, resume, delete) take effect while
the daemon runs.

When a trigger fires while a run of the same VM is pending or active, the run
is recorded as MISSED, never queued twice.

In a fleet, every connector keeps the triggers, but only the one holding the
scheduler's lease (`leader`) fires them; each firing is keyed by its job and
scheduled time (`runs.schedule_key`, unique), so a slot that fires twice (two
members briefly both believing they lead) still makes one run. A member that
becomes the leader fires, once, the latest slot of each job that is due and has
no run (`catch_up`), so a slot that fell while nobody led is not lost.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any, Protocol

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from connector.daemon.runner import Enqueue
from connector.domain.jobs import (
    AUTOMATIC,
    JOB_DELETED,
    JOB_DELETING,
    JOB_FAILED,
    RUN_MISSED,
    RUN_PENDING,
    SCHEDULED_STATES,
    JobRow,
    JobStatus,
)
from connector.domain.records import RunRow, new_run_id
from connector.logging import get_logger

log = get_logger(__name__)

Signature = tuple[str, int | None]


class JobSource(Protocol):
    """What the scheduler reads and writes of jobs (connector.adapters.jobstore.JobStore)."""

    def all(self, include_deleted: bool = False) -> list[JobRow]: ...

    def get(self, job_id: str) -> JobRow: ...

    def update(self, job_id: str, **values: object) -> JobRow: ...

    def set_status(self, job_id: str, status: JobStatus) -> JobRow: ...

    def live_runs(self, server_id: str, exclude: str | None = None) -> list[RunRow]: ...

    def count_runs(
        self, job_id: str, run_type: str | None = None, state: str | None = None
    ) -> int: ...

    def create_run(
        self,
        run_id: str,
        job: JobRow,
        run_type: str,
        state: str,
        error: str | None = None,
        schedule_key: str | None = None,
    ) -> bool: ...

    def run_of_schedule(self, schedule_key: str) -> str | None: ...


class JobScheduler:
    """Keeps one APScheduler trigger set per scheduled job; a firing enqueues a run."""

    def __init__(
        self,
        jobs: JobSource,
        queue: Enqueue,
        unit_seconds: float,
        sync_interval: float,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        leader: Callable[[], bool] = lambda: True,
    ) -> None:
        self.jobs = jobs
        self.queue = queue
        self.unit_seconds = unit_seconds
        self.sync_interval = sync_interval
        self.clock = clock
        self.leader = leader
        self.scheduler = BackgroundScheduler(
            timezone=dt.UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._signatures: dict[str, Signature] = {}
        self._invalid: dict[str, str] = {}  # job id -> why it is not scheduled (logged once)
        self._fire_lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Schedule every job in the table, then re-read the table every `sync_interval`."""
        self.sync()
        self.scheduler.add_job(
            self._sync_safely,
            IntervalTrigger(seconds=self.sync_interval, timezone=dt.UTC),
            id="sync-jobs",
        )
        self.scheduler.start()

    def add_periodic(
        self, name: str, fn: Callable[[], Any], seconds: float, first_after: float
    ) -> None:
        """Run `fn` after `first_after` seconds, then every `seconds`, on the scheduler's
        thread pool."""
        self.scheduler.add_job(
            fn,
            IntervalTrigger(seconds=seconds, timezone=dt.UTC),
            id=name,
            next_run_time=self.clock() + dt.timedelta(seconds=first_after),
        )

    def shutdown(self) -> None:
        """Stop firing triggers; a firing under way is not waited for."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    @property
    def running(self) -> bool:
        """Whether the scheduler's thread runs."""
        return bool(self.scheduler.running)

    # -- keeping triggers in step with the jobs table ----------------------------------

    def _sync_safely(self) -> None:
        """`sync`, logging an error instead of raising it into the scheduler."""
        try:
            self.sync()
        except Exception as exc:  # the next sync tries again; the scheduler must live on
            log.error("reading the jobs failed", error=f"{type(exc).__name__}: {exc}")

    def sync(self) -> None:
        """Bring the triggers in step with the jobs table.

        A job whose seed time or frequency changed gets new triggers; a job that
        is paused, out of the scheduled states or gone loses its own; a DELETING
        job without a live run becomes DELETED.
        """
        seen: set[str] = set()
        for job in self.jobs.all():
            seen.add(job.id)
            if job.state == JOB_DELETING:
                self._drop(job.id)
                if not self.jobs.live_runs(job.server_id):
                    self.jobs.update(job.id, state=JOB_DELETED, message="deleted")
                    log.info("job deleted", job=job.id)
                continue
            problem = job.problem
            if problem is not None:
                # A bad row must not stop the other jobs: skip it, and say so once.
                self._drop(job.id)
                if self._invalid.get(job.id) != problem:
                    self._invalid[job.id] = problem
                    log.error("job not scheduled", job=job.id, problem=problem)
                continue
            self._invalid.pop(job.id, None)
            signature = self._signature(job)
            if signature == self._signatures.get(job.id):
                continue
            self._drop(job.id)
            if signature is None:
                continue
            self._signatures[job.id] = signature
            self._add(job)
        for job_id in set(self._signatures) - seen:
            self._drop(job_id)
        for job_id in set(self._invalid) - seen:
            del self._invalid[job_id]

    def _signature(self, job: JobRow) -> Signature | None:
        """What the triggers of a job depend on; None when the job is not to be scheduled."""
        if job.paused or job.state not in SCHEDULED_STATES:
            return None
        return (job.seed_time, job.frequency_hours)

    def _add(self, job: JobRow) -> None:
        """The triggers of a job: once at its seed time, or every frequency from it."""
        now = self.clock()
        ran = self.jobs.count_runs(job.id, run_type=AUTOMATIC) > 0
        if job.frequency_hours is None:
            if not ran:
                self.scheduler.add_job(
                    self.fire,
                    DateTrigger(run_date=max(job.seed, now), timezone=dt.UTC),
                    args=(job.id, "once"),
                    id=f"once:{job.id}",
                )
            return
        interval = job.frequency_hours * self.unit_seconds
        self.scheduler.add_job(
            self.fire,
            IntervalTrigger(seconds=interval, start_date=job.seed, timezone=dt.UTC),
            args=(job.id, "every"),
            id=f"every:{job.id}",
        )
        if not ran and job.seed <= now:
            # The seed time has passed and the job never ran: its first run is now.
            self.scheduler.add_job(
                self.fire,
                DateTrigger(run_date=now, timezone=dt.UTC),
                args=(job.id, "seed"),
                id=f"seed:{job.id}",
            )
        log.info("job scheduled", job=job.id, every_seconds=interval, seed=job.seed_time)

    def _drop(self, job_id: str) -> None:
        """Remove the triggers of a job."""
        self._signatures.pop(job_id, None)
        for prefix in ("once", "every", "seed"):
            if self.scheduler.get_job(f"{prefix}:{job_id}") is not None:
                self.scheduler.remove_job(f"{prefix}:{job_id}")

    # -- firing --------------------------------------------------------------------

    def slot_key(self, job: JobRow, kind: str) -> str:
        """The key of the slot a firing is for: the job and its scheduled time."""
        if kind != "every" or job.frequency_hours is None:
            return f"{job.id}@{kind}"
        interval = job.frequency_hours * self.unit_seconds
        elapsed = (self.clock() - job.seed).total_seconds()
        # A trigger fires at its slot or just after; a hair early still means that slot.
        index = max(0, int((elapsed + min(1.0, interval / 10)) // interval))
        slot = job.seed + dt.timedelta(seconds=index * interval)
        return f"{job.id}@{slot.strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"

    def catch_up(self) -> list[str]:
        """Fire the latest due slot of each recurring job that has no run (a new leader)."""
        fired: list[str] = []
        for job in self.jobs.all():
            if self._signature(job) is None or job.frequency_hours is None:
                continue
            if job.seed > self.clock():
                continue
            if self.jobs.count_runs(job.id, run_type=AUTOMATIC) == 0:
                continue  # its seed firing is due: `_add` queues it
            if self.jobs.run_of_schedule(self.slot_key(job, "every")) is None:
                run_id = self.fire(job.id, "every")
                if run_id is not None:
                    fired.append(run_id)
        return fired

    def fire(self, job_id: str, kind: str | None = None) -> str | None:
        """The trigger of a job fired: queue a run, or record it as MISSED.

        `kind` ("every", "seed", "once") is the trigger's: the run is keyed by its slot.
        None makes an unkeyed run (a firing asked for by hand)."""
        with self._fire_lock:
            if not self.leader():
                return None
            job = self.jobs.get(job_id)
            if job.paused or job.state not in SCHEDULED_STATES or job.problem is not None:
                return None
            key = None if kind is None else self.slot_key(job, kind)
            run_id = new_run_id()
            live = self.jobs.live_runs(job.server_id)
            if live:
                why = (
                    f"the schedule fired while run {live[0].id} of this VM was still "
                    f"{live[0].state}; this run was skipped"
                )
                if not self.jobs.create_run(
                    run_id, job, AUTOMATIC, RUN_MISSED, error=why, schedule_key=key
                ):
                    return None
                log.warning("scheduled run missed", job=job.id, run=run_id, busy=live[0].id)
                if job.run_once:
                    self.jobs.set_status(
                        job.id, JobStatus(JOB_FAILED, job.consecutive_failures, why)
                    )
                return run_id
            if not self.jobs.create_run(run_id, job, AUTOMATIC, RUN_PENDING, schedule_key=key):
                log.info("schedule slot already has its run", job=job.id, slot=key)
                return None
            self.queue.enqueue(run_id, 0)
            log.info("scheduled run queued", job=job.id, run=run_id)
            return run_id
