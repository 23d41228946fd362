"""`connector run`: the long-running connector.

One process: startup recovery, then the queue's worker threads (huey), the
scheduler (APScheduler: job triggers, inventory discovery, a periodic sweep of
leftovers) and, when given, the HTTPS API server. systemd is told READY=1 once
recovery is done, WATCHDOG=1 at half the watchdog period while the workers and
the scheduler are alive, STATUS=... as things change, and STOPPING=1 on SIGTERM.

On SIGTERM (or SIGINT) the daemon stops taking work, lets the running stages
reach a safe point (they check between reads) for at most `shutdown_deadline`
seconds, and exits. Whatever was cut short resumes at the next start.
"""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from connector.daemon.discovery import Discovery
from connector.daemon.lock import StateLock
from connector.daemon.notify import Notifier
from connector.daemon.queue import RunQueue
from connector.daemon.recovery import recover, sweep
from connector.daemon.runner import LedgerReporter, Retention, RunExecutor, RunLimits
from connector.daemon.schedule import JobScheduler
from connector.logging import get_logger
from connector.pipeline.stages import RunPipeline

if TYPE_CHECKING:
    from connector.app import App

log = get_logger(__name__)

HEALTH_CHECK_INTERVAL = 10.0
DISCOVERY_FIRST_AFTER = 60.0
SWEEP_INTERVAL = 300.0


class ApiServer(Protocol):
    """A server the daemon starts once it is ready and stops first when stopping."""

    def start(self) -> object: ...

    def stop(self) -> None: ...


class Daemon:
    def __init__(
        self,
        app: App,
        retention: Retention,
        api: ApiServer | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.app = app
        self.config = app.config.daemon
        self.retention = retention
        self.api = api
        self.notifier = notifier or Notifier()
        self.stop_requested = threading.Event()
        self.stopping = threading.Event()

    def request_stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        if signum:
            log.info("stop requested", signal=signal.Signals(signum).name)
        self.stop_requested.set()

    def run(self) -> int:
        app, cfg = self.app, self.config
        lock = StateLock(app.config.state.path, "run")
        lock.acquire()
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        queue = RunQueue(app.queue_path)
        discovery = Discovery(app.discovery_hypervisor, app.state)
        scheduler: JobScheduler | None = None
        consumer = None
        try:
            self.notifier.status("recovering unfinished runs")
            reporter = LedgerReporter(app.ledger)
            pipeline = RunPipeline(
                hv=app.hypervisor,
                source=app.disk_source(),
                open_repo=app.open_repository_for_write,
                state=app.state,
                ledger=app.ledger,
                settings=app.pipeline_settings(),
                reporter=reporter,
                should_stop=self.stopping.is_set,
                audit=app.audit,
            )
            executor = RunExecutor(
                pipeline=pipeline,
                hv=app.hypervisor,
                state=app.state,
                ledger=app.ledger,
                jobs=app.jobs,
                queue=queue,
                limits=RunLimits(
                    max_concurrent_runs=cfg.max_concurrent_runs,
                    max_runs_per_host=cfg.max_runs_per_host,
                    failures_before_pause=cfg.failures_before_pause,
                    stage_retries=cfg.stage_retries,
                    retry_backoff=cfg.retry_backoff,
                    retry_backoff_max=cfg.retry_backoff_max,
                    admission_interval=cfg.admission_interval,
                ),
                retention=self.retention,
                stopping=self.stopping,
                on_run_end=reporter.forget,
            )
            queue.set_handler(executor.handle)
            report = recover(
                app.state,
                app.ledger,
                queue,
                app.hypervisor,
                app.objects,
                cfg.resume_within,
                release_lock=pipeline.release_lock,
            )
            consumer = queue.consumer(
                workers=cfg.max_concurrent_runs + 2, shutdown_timeout=cfg.shutdown_deadline
            )
            consumer.start()
            scheduler = JobScheduler(app.jobs, queue, cfg.schedule_unit_seconds, cfg.sync_interval)

            def periodic_sweep() -> None:
                sweep(
                    app.state,
                    app.ledger,
                    app.hypervisor,
                    app.objects,
                    uploads_before=started_at,
                    release_lock=pipeline.release_lock,
                )

            # Recovery and queued runs go first; the inventory follows within a minute.
            scheduler.add_periodic(
                "discovery",
                discovery.poll,
                cfg.discovery_interval,
                first_after=min(cfg.discovery_interval, DISCOVERY_FIRST_AFTER),
            )
            every = max(SWEEP_INTERVAL, cfg.discovery_interval)
            scheduler.add_periodic("sweep", periodic_sweep, every, first_after=every)
            scheduler.start()
            if self.api is not None:
                self.api.start()
            self.notifier.ready(f"running; recovery: {report.summary()}")
            log.info("connector running", recovery=report.summary())
            self._main_loop(consumer, scheduler, queue)
        finally:
            self._shutdown(consumer, scheduler, discovery, queue)
            for s, handler in previous.items():
                signal.signal(s, handler)
            lock.release()
        return 0

    def _main_loop(self, consumer: object, scheduler: JobScheduler, queue: RunQueue) -> None:
        interval = self.notifier.watchdog_interval
        tick = min(1.0, interval) if interval else 1.0
        next_check = time.monotonic() + HEALTH_CHECK_INTERVAL
        last_status = ""
        while not self.stop_requested.wait(tick):
            healthy = scheduler.running and _workers_alive(consumer)
            if healthy and interval:
                self.notifier.watchdog()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + HEALTH_CHECK_INTERVAL
                consumer.check_worker_health()  # type: ignore[attr-defined]
                active = len(self.app.jobs.active_runs())
                status = f"running; {active} active run(s), {queue.pending()} queued task(s)"
                if status != last_status:
                    self.notifier.status(status)
                    last_status = status

    def _shutdown(
        self,
        consumer: object | None,
        scheduler: JobScheduler | None,
        discovery: Discovery,
        queue: RunQueue,
    ) -> None:
        deadline = self.config.shutdown_deadline
        self.notifier.stopping(
            f"stopping: running stages get {deadline:.0f} s to reach a safe point"
        )
        log.info("stopping", deadline=deadline)
        if self.api is not None:
            try:
                self.api.stop()
            except Exception as exc:
                log.error("stopping the API server failed", error=str(exc))
        if scheduler is not None:
            scheduler.shutdown()
        self.stopping.set()
        if consumer is not None:
            consumer.stop(graceful=True)  # type: ignore[attr-defined]
            if _workers_alive(consumer, any_alive=True):
                log.warning(
                    "stages still running at the shutdown deadline; they resume at the next start"
                )
        discovery.close()
        queue.close()
        log.info("stopped")


def _workers_alive(consumer: object, any_alive: bool = False) -> bool:
    threads = [t for _, t in getattr(consumer, "worker_threads", [])]
    alive = [t.is_alive() for t in threads]
    return any(alive) if any_alive else bool(alive) and all(alive)
