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

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Protocol

from connector.config import DaemonConfig
from connector.daemon.discovery import Discovery
from connector.daemon.fleet import FleetDuty
from connector.daemon.lock import StateLock
from connector.daemon.notify import Notifier
from connector.daemon.queue import RunQueue
from connector.daemon.recovery import RecoveryReport
from connector.daemon.runner import RunExecutor
from connector.daemon.schedule import JobScheduler, JobSource
from connector.errors import PermanentError
from connector.logging import get_logger

log = get_logger(__name__)

HEALTH_CHECK_INTERVAL = 10.0
DISCOVERY_FIRST_AFTER = 60.0


class ApiServer(Protocol):
    """A server the daemon starts once it is ready and stops first when stopping."""

    def start(self) -> object: ...

    def stop(self) -> None: ...


class ActiveRuns(Protocol):
    def active_runs(self) -> list[tuple[str, str | None]]: ...


class Jobs(JobSource, ActiveRuns, Protocol):
    """What the daemon's scheduler and status line read of the jobs."""


@dataclass
class DaemonParts:
    """What the composition root builds for one life of the daemon, once it holds
    the state lock: the queue, the executor of its tasks, the inventory poll,
    startup recovery and the periodic sweep of leftovers."""

    queue: RunQueue
    executor: RunExecutor
    jobs: Jobs
    discovery: Discovery
    recover: Callable[[], RecoveryReport]
    sweep: Callable[[], object]  # undo leftovers: of runs that are over, uploads no put owns
    fleet: FleetDuty | None = None  # a member of a fleet: heartbeat, leadership, takeover
    leave: Callable[[], None] = lambda: None  # a clean stop: tell the fleet


class Daemon:
    def __init__(
        self,
        settings: DaemonConfig,
        state_lock: StateLock,
        assemble: Callable[[threading.Event], DaemonParts],
        api: ApiServer | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        """`assemble(stopping)` builds the parts; stages stop at a safe point once
        `stopping` is set."""
        self.config = settings
        self.state_lock = state_lock
        self.assemble = assemble
        self.api = api
        self.notifier = notifier or Notifier()
        self.stop_requested = threading.Event()
        self.stopping = threading.Event()
        self._scheduler: JobScheduler | None = None
        self._consumer: object | None = None
        self._heartbeat: float | None = None  # the main loop's last tick (monotonic)
        self._tick = 1.0

    def loops(self) -> str:
        """A readiness check: the scheduler, every worker thread and the main loop
        are alive; raise with what is not."""
        problems = []
        if self._heartbeat is None:
            problems.append("the daemon is starting (recovering unfinished runs)")
        elif self.stop_requested.is_set():
            problems.append("the daemon is stopping")
        else:
            if self._scheduler is None or not self._scheduler.running:
                problems.append("the scheduler is not running")
            if self._consumer is None or not _workers_alive(self._consumer):
                problems.append("a queue worker thread died")
            late = time.monotonic() - self._heartbeat
            if late > max(10 * self._tick, HEALTH_CHECK_INTERVAL):
                problems.append(f"the main loop last ran {late:.0f} s ago")
        if problems:
            raise PermanentError(
                "; ".join(problems) + ": see the daemon's log (journalctl -u connector)"
            )
        workers = len(getattr(self._consumer, "worker_threads", []))
        return f"scheduler, {workers} queue workers and the main loop alive"

    def request_stop(self, signum: int = 0, _frame: FrameType | None = None) -> None:
        if signum:
            log.info("stop requested", signal=signal.Signals(signum).name)
        self.stop_requested.set()

    def run(self) -> int:
        cfg = self.config
        lock = self.state_lock
        lock.acquire()
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        parts: DaemonParts | None = None
        scheduler: JobScheduler | None = None
        consumer = None
        try:
            parts = self.assemble(self.stopping)
            queue = parts.queue
            self.notifier.status("recovering unfinished runs")
            queue.set_handler(parts.executor.handle)
            report = parts.recover()
            consumer = queue.consumer(
                workers=cfg.max_concurrent_runs + 2, shutdown_timeout=cfg.shutdown_deadline
            )
            consumer.start()
            duty = parts.fleet
            lead_now = duty.tick() if duty is not None else False
            scheduler = JobScheduler(
                parts.jobs,
                queue,
                cfg.schedule_unit_seconds,
                cfg.sync_interval,
                leader=(lambda: duty.leader) if duty is not None else (lambda: True),
            )
            if duty is not None:
                sched = scheduler

                def fleet_round() -> None:
                    if duty.tick():
                        sched.catch_up()

                scheduler.add_periodic(
                    "fleet",
                    fleet_round,
                    duty.heartbeat_interval,
                    first_after=duty.heartbeat_interval,
                )
            # Recovery and queued runs go first; the inventory follows within a minute.
            scheduler.add_periodic(
                "discovery",
                parts.discovery.poll,
                cfg.discovery_interval,
                first_after=min(cfg.discovery_interval, DISCOVERY_FIRST_AFTER),
            )
            every = cfg.sweep_interval
            scheduler.add_periodic("sweep", parts.sweep, every, first_after=every)
            # Retention that could not be applied after a run is tried again when due.
            scheduler.add_periodic(
                "retention",
                parts.executor.retry_retention,
                cfg.sync_interval,
                first_after=cfg.sync_interval,
            )
            scheduler.start()
            self._scheduler, self._consumer = scheduler, consumer
            self._heartbeat = time.monotonic()
            if lead_now:
                scheduler.catch_up()
            if self.api is not None:
                self.api.start()
            self.notifier.ready(f"running; recovery: {report.summary()}")
            log.info("connector running", recovery=report.summary())
            self._main_loop(consumer, scheduler, parts)
        finally:
            self._shutdown(consumer, scheduler, parts)
            for s, handler in previous.items():
                signal.signal(s, handler)
            lock.release()
        return 0

    def _main_loop(self, consumer: object, scheduler: JobScheduler, parts: DaemonParts) -> None:
        interval = self.notifier.watchdog_interval
        tick = min(1.0, interval) if interval else 1.0
        self._tick = tick
        next_check = time.monotonic() + HEALTH_CHECK_INTERVAL
        last_status = ""
        while True:
            # First at once: a stop that comes within the first tick still finds the
            # watchdog fed since READY=1.
            healthy = scheduler.running and _workers_alive(consumer)
            self._heartbeat = time.monotonic()
            if healthy and interval:
                self.notifier.watchdog()
            if self.stop_requested.wait(tick):
                break
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + HEALTH_CHECK_INTERVAL
                consumer.check_worker_health()  # type: ignore[attr-defined]
                active = len(parts.jobs.active_runs())
                status = f"running; {active} active run(s), {parts.queue.pending()} queued task(s)"
                if status != last_status:
                    self.notifier.status(status)
                    last_status = status

    def _shutdown(
        self,
        consumer: object | None,
        scheduler: JobScheduler | None,
        parts: DaemonParts | None,
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
        if parts is not None:
            try:
                parts.leave()
            except Exception as exc:
                log.warning("telling the fleet of the stop failed", error=str(exc))
            parts.discovery.close()
            parts.queue.close()
        log.info("stopped")


def _workers_alive(consumer: object, any_alive: bool = False) -> bool:
    threads = [t for _, t in getattr(consumer, "worker_threads", [])]
    alive = [t.is_alive() for t in threads]
    return any(alive) if any_alive else bool(alive) and all(alive)
