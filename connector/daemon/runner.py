"""Executes queue tasks: admits runs, runs their stages, retries, rolls back.

The retry decision comes from the error's class: a TransientError is retried
(the same stage, after an exponential backoff, up to `stage_retries` times);
a PermanentError, or an error the connector did not expect, fails the run at
once. A failed run is rolled back (snapshot removed) and marked FAILED with
the reason; its job counts the failure and pauses after `failures_before_pause`
failures in a row.

After a completed run, the job's retention is owed: recorded in the jobs table
first, then applied. When it cannot run (another purge holds the state
database's purge guard, S3 is down, a manifest cannot be read), the failure is
recorded with the time of the next try (the backoff of the stage retries,
from `retention_retry_backoff`), and `retry_retention`, called periodically,
tries again until it is applied. Re-queueing rather than waiting for the guard
keeps the worker free (a purge from the CLI may hold the guard for minutes),
covers S3 outages as well as a busy guard, and survives a restart: the record
is in the state database, and `jobs show` prints it.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from connector.adapters.jobstore import JobStore
from connector.adapters.ledger import RunLedger
from connector.adapters.state import StateStore
from connector.domain.jobs import (
    JOB_DELETED,
    JOB_DELETING,
    RUN_ACTIVE,
    RUN_COMPLETED,
    RUN_FAILED,
    RUN_MISSED,
    RUN_PENDING,
    JobRow,
    backoff_delay,
    on_run_completed,
    on_run_failed,
    on_run_started,
)
from connector.domain.records import RunRow
from connector.errors import ConnectorError, NotFoundError, TransientError
from connector.logging import get_logger, scrub
from connector.pipeline.context import StageInterrupted
from connector.pipeline.driver import DONE, RunPipeline
from connector.ports import Hypervisor

log = get_logger(__name__)

# server id: apply that server's retention (connector.application.retention's one rule)
# after a run of its job completed.
Retention = Callable[[str], object]


@dataclass(frozen=True)
class RunLimits:
    max_concurrent_runs: int = 4
    max_runs_per_host: int = 2
    failures_before_pause: int = 5
    stage_retries: int = 5
    retry_backoff: float = 10.0
    retry_backoff_max: float = 600.0
    admission_interval: float = 5.0
    retention_retry_backoff: float = 30.0


class Enqueue(Protocol):
    """What the executor needs from the queue."""

    def enqueue(self, run_id: str, seq: int, delay: float = 0.0) -> None: ...


class Claims(Protocol):
    """The claims on runs' stages (connector.adapters.fleet.Fleet)."""

    def claim(self, run_id: str, seq: int) -> bool: ...

    def stage_started(self, run_id: str, server_id: str, stage: str) -> int: ...

    def stage_ended(self, entry: int, outcome: str) -> None: ...


class RunExecutor:
    def __init__(
        self,
        pipeline: RunPipeline,
        hv: Hypervisor,
        state: StateStore,
        ledger: RunLedger,
        jobs: JobStore,
        queue: Enqueue,
        limits: RunLimits,
        retention: Retention,
        stopping: threading.Event,
        on_run_end: Callable[[str], object] = lambda _run_id: None,
        claims: Claims | None = None,
        transient_faults: tuple[type[BaseException], ...] = (),
    ) -> None:
        """`transient_faults`: errors of the connector's own services (the state
        database gone for a moment) that a stage is retried after, like a
        TransientError, instead of failing the run."""
        self.pipeline = pipeline
        self.hv = hv
        self.state = state
        self.ledger = ledger
        self.jobs = jobs
        self.queue = queue
        self.limits = limits
        self.retention = retention
        self.stopping = stopping
        self.on_run_end = on_run_end
        self.claims = claims
        self.transient_faults = transient_faults
        self.executing: set[str] = set()  # runs whose task runs in this process now
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._admission = threading.Lock()

    # -- the queue task ------------------------------------------------------------

    def handle(self, run_id: str, seq: int) -> None:
        ctl = self.ledger.control(run_id)
        if ctl is None or ctl.seq != seq:
            return  # a stale task: the run has moved on
        with self._locks_guard:
            lock = self._locks.setdefault(run_id, threading.Lock())
        with lock:  # a duplicate of the current task waits, then finds the token moved on
            if self.claims is not None and not self.claims.claim(run_id, seq):
                return  # another connector works on it, or the token moved on
            self.executing.add(run_id)
            try:
                self._handle(run_id, seq)
            except Exception:
                # A fault of the connector itself (the state database, a bug): the run
                # keeps its state and token, and startup recovery takes it up again.
                log.exception("a queue task failed", run=run_id, seq=seq)
                raise
            finally:
                self.executing.discard(run_id)

    def _handle(self, run_id: str, seq: int) -> None:
        if self.stopping.is_set():
            return  # recovery enqueues it again at the next start
        ctl = self.ledger.control(run_id)
        try:
            run = self.state.run(run_id)
        except NotFoundError:
            return
        if ctl is None or ctl.seq != seq or run.state not in (RUN_PENDING, RUN_ACTIVE):
            return
        if run.state == RUN_PENDING:
            self._admit(run)
            return
        if ctl.failure is not None:
            self._rollback(run_id)
            return
        job = self.jobs.job_of_run(run_id)
        if job is not None and job.state in (JOB_DELETING, JOB_DELETED):
            self._fail(run_id, run.stage, "the job was deleted while the run was active")
            return
        stage = run.stage
        entry = (
            None if self.claims is None else self.claims.stage_started(run_id, run.server_id, stage)
        )
        outcome = "error"
        try:
            following = self.pipeline.execute(run_id, stage)
            outcome = "done"
        except StageInterrupted:
            outcome = "interrupted"
            log.info("stage interrupted by shutdown; it resumes at the next start", run=run_id)
            return
        except TransientError as exc:
            outcome = "retry"
            self._retry(run_id, stage, ctl.attempts + 1, scrub(str(exc)))
            return
        except ConnectorError as exc:
            outcome = "failed"
            self._fail(run_id, stage, scrub(str(exc)))
            return
        except self.transient_faults as exc:
            outcome = "retry"
            reason = scrub(f"the state database failed: {type(exc).__name__}: {exc}")
            self._retry(run_id, stage, ctl.attempts + 1, reason.splitlines()[0])
            return
        except Exception as exc:
            outcome = "failed"
            log.exception("unexpected error in a stage", run=run_id, stage=stage)
            self._fail(run_id, stage, scrub(f"unexpected {type(exc).__name__}: {exc}"))
            return
        finally:
            if entry is not None and self.claims is not None:
                try:
                    self.claims.stage_ended(entry, outcome)
                except Exception as exc:  # the log is for reading; the run goes on
                    log.warning("recording the end of a stage failed", error=str(exc))
        if following == DONE:
            self._finished(run_id)
            return
        new_seq = self.ledger.advance(run_id, stage=following)
        self.queue.enqueue(run_id, new_seq)

    # -- admission -----------------------------------------------------------------

    def _admit(self, run: RunRow) -> None:
        job = self.jobs.job_of_run(run.id)
        if job is not None and job.state in (JOB_DELETING, JOB_DELETED):
            self.jobs.mark_run(run.id, RUN_FAILED, "the job was deleted before the run started")
            return
        vm_uuid = self.state.server(run.server_id).vm_uuid
        try:
            host = self.hv.get_vm(vm_uuid).host or "(unknown host)"
        except TransientError as exc:
            self._wait(run.id, f"waiting for vCenter: {scrub(str(exc))}")
            return
        except ConnectorError as exc:
            self.jobs.mark_run(run.id, RUN_FAILED, scrub(str(exc)))
            if job is not None:
                self._job_failed(job, scrub(str(exc)))
            return
        with self._admission:  # one transaction across the fleet, too (JobStore.admit)
            verdict, why, new_seq = self.jobs.admit(
                run.id,
                run.server_id,
                host,
                self.limits.max_concurrent_runs,
                self.limits.max_runs_per_host,
            )
        if verdict == "missed":
            self.jobs.mark_run(run.id, RUN_MISSED, why)
            return
        if verdict == "wait":
            self._wait(run.id, f"waiting for a free slot: {why}")
            return
        log.info("run admitted", run=run.id, host=host)
        if job is not None:
            self.jobs.set_status(job.id, on_run_started(job.status))
        self.queue.enqueue(run.id, new_seq)

    def _wait(self, run_id: str, why: str) -> None:
        new_seq = self.ledger.advance(run_id, due_in=self.limits.admission_interval)
        self.ledger.set_progress(run_id, 0, 0, why)
        self.queue.enqueue(run_id, new_seq, delay=self.limits.admission_interval)

    # -- failures ------------------------------------------------------------------

    def _retry(self, run_id: str, stage: str, attempt: int, message: str) -> None:
        if attempt > self.limits.stage_retries:
            tries = self.limits.stage_retries + 1
            self._fail(run_id, stage, f"{message} (gave up after {tries} attempts)")
            return
        delay = backoff_delay(attempt, self.limits.retry_backoff, self.limits.retry_backoff_max)
        log.warning(
            "stage failed; retrying", run=run_id, stage=stage, attempt=attempt, error=message
        )
        new_seq = self.ledger.advance(run_id, attempts=attempt, due_in=delay)
        self.ledger.set_progress(
            run_id,
            0,
            0,
            f"{stage}: retry {attempt} of {self.limits.stage_retries} in {delay:.0f} s "
            f"after: {message}",
        )
        self.queue.enqueue(run_id, new_seq, delay=delay)

    def _fail(self, run_id: str, stage: str, reason: str) -> None:
        log.error("run failed; rolling back", run=run_id, stage=stage, error=reason)
        self.ledger.set_failure(run_id, stage, f"{stage}: {reason}")
        seq = self.ledger.advance(run_id, attempts=0)
        if self.claims is not None:
            self.claims.claim(run_id, seq)  # the rollback is this member's work, too
        self._rollback(run_id)

    def _rollback(self, run_id: str) -> None:
        ctl = self.ledger.control(run_id)
        assert ctl is not None and ctl.failure is not None
        last = ctl.attempts >= self.limits.stage_retries
        try:
            self.pipeline.abort(run_id, ctl.failure, best_effort=last)
        except ConnectorError as exc:
            attempt = ctl.attempts + 1
            delay = backoff_delay(attempt, self.limits.retry_backoff, self.limits.retry_backoff_max)
            log.warning("rollback failed; retrying", run=run_id, error=scrub(str(exc)))
            new_seq = self.ledger.advance(run_id, attempts=attempt, due_in=delay)
            self.queue.enqueue(run_id, new_seq, delay=delay)
            return
        self._finished(run_id)

    # -- the end of a run ------------------------------------------------------------

    def _finished(self, run_id: str) -> None:
        with self._locks_guard:
            self._locks.pop(run_id, None)
        run = self.state.run(run_id)
        self.ledger.set_progress(run_id, 0, 0, "")
        self.on_run_end(run_id)
        log.info("run ended", run=run_id, state=run.state, error=run.error)
        job = self.jobs.job_of_run(run_id)
        if job is None:
            return
        if run.state == RUN_COMPLETED:
            self.jobs.set_status(job.id, on_run_completed(job.status, job.run_once))
            token = self.jobs.retention_owed(job.id)
            self._apply_retention(self.jobs.get(job.id), token)
        elif run.state == RUN_FAILED:
            self._job_failed(job, run.error or "unknown error")

    # -- retention owed after a completed run ---------------------------------------------

    def retry_retention(self) -> None:
        """Try again the retention of every job whose owed retention is due (periodic)."""
        if self.stopping.is_set():
            return
        for job in self.jobs.retention_to_retry(dt.datetime.now(dt.UTC)):
            if job.retention_due is None:
                continue
            if job.state == JOB_DELETED:  # its runs stay as they are, like its replicas
                self.jobs.retention_applied(job.id, job.retention_due)
                continue
            self._apply_retention(job, job.retention_due)

    def _apply_retention(self, job: JobRow, token: str) -> None:
        try:
            self.retention(job.server_id)
        except Exception as exc:
            attempt = job.retention_attempts + 1
            delay = backoff_delay(
                attempt, self.limits.retention_retry_backoff, self.limits.retry_backoff_max
            )
            message = scrub(str(exc)) or type(exc).__name__
            self.jobs.retention_failed(
                job.id, token, message, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
            )
            log.warning(
                "retention could not be applied; it is tried again",
                job=job.id,
                attempt=attempt,
                retry_in=round(delay, 1),
                error=message,
            )
            return
        if self.jobs.retention_applied(job.id, token):
            log.info("retention applied", job=job.id)

    def _job_failed(self, job: JobRow, reason: str) -> None:
        current = self.jobs.get(job.id)
        status = on_run_failed(
            current.status, current.run_once, self.limits.failures_before_pause, reason
        )
        self.jobs.set_status(job.id, status)
        if status.state != current.state:
            log.warning("job state changed", job=job.id, state=status.state, why=status.message)


class LedgerReporter:
    """Records a run's stage and progress in the ledger (at most once a second per run)."""

    def __init__(self, ledger: RunLedger, interval: float = 1.0) -> None:
        self.ledger = ledger
        self.interval = interval
        self._lock = threading.Lock()
        self._disks: dict[str, dict[int, tuple[int, int]]] = {}
        self._last: dict[str, float] = {}
        self._detail: dict[str, str] = {}

    def stage(self, run_id: str, stage: str, detail: str = "") -> None:
        text = f"{stage}: {detail}" if detail else stage
        with self._lock:
            self._detail[run_id] = text
            done, total = self._sums(run_id)
        self.ledger.set_progress(run_id, done, total, text)

    def disk_progress(self, run_id: str, disk_key: int, done: int, total: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._disks.setdefault(run_id, {})[disk_key] = (done, total)
            if done < total and now - self._last.get(run_id, 0.0) < self.interval:
                return
            self._last[run_id] = now
            sums = self._sums(run_id)
            detail = self._detail.get(run_id, "transfer")
        self.ledger.set_progress(run_id, sums[0], sums[1], detail)

    def forget(self, run_id: str) -> None:
        """Drop what is kept of a run that ended."""
        with self._lock:
            for kept in (self._disks, self._last, self._detail):
                kept.pop(run_id, None)

    def _sums(self, run_id: str) -> tuple[int, int]:
        disks = self._disks.get(run_id, {})
        return sum(d for d, _ in disks.values()), sum(t for _, t in disks.values())
