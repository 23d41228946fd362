"""The durable run queue: huey, with its SQLite storage in the state folder, or, in a
fleet, with its storage in the fleet's PostgreSQL (`connector.adapters.sqlqueue`),
shared by every connector: a task is taken by one consumer of the fleet.

One task type, `advance_run(run_id, seq)`: "do the next thing for this run".
What the next thing is (admission, a stage, a rollback) is read from the state
database, and the task runs only if `seq` is still the run's current token
(see `RunLedger.advance`), so a duplicate or a stale task does nothing. The
queue file survives restarts; startup recovery enqueues every unfinished run
again in case its task was being executed when the process died.

The CLI enqueues into the same file (`connector jobs start`), so an on-demand
run waits in the queue until `connector run` picks it up.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from huey import Huey, SqliteHuey
from huey.consumer import Consumer

from connector.adapters.sql import Database
from connector.adapters.sqlqueue import SqlStorage

TASK_NAME = "advance_run"

Handler = Callable[[str, int], None]


class _Consumer(Consumer):  # type: ignore[misc]
    """huey's consumer, minus its signal handlers: the daemon owns SIGTERM/SIGINT/SIGHUP."""

    def _set_signal_handlers(self) -> None:
        return None


class RunQueue:
    """The queue port: `enqueue`, `pending`, `set_handler`, `consumer`, `close`."""

    def __init__(
        self, path: Path | None = None, handler: Handler | None = None, *, huey: Huey | None = None
    ) -> None:
        """The SQLite queue file at `path`, or the `huey` given (`in_database`)."""
        self.path = path
        if huey is None:
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            existed = path.exists()
            huey = SqliteHuey(
                name="connector", filename=str(path), results=False, utc=True, fsync=True
            )
            if not existed and path.exists():
                os.chmod(path, 0o600)
        self.huey = huey
        self._handler = handler

        def advance_run(run_id: str, seq: int) -> None:
            if self._handler is None:
                raise RuntimeError("this queue only enqueues; `connector run` executes")
            self._handler(run_id, seq)

        self._task = self.huey.task(name=TASK_NAME)(advance_run)

    @classmethod
    def in_database(cls, db: Database, handler: Handler | None = None) -> RunQueue:
        """The queue in the state database (a fleet's PostgreSQL), shared by its members."""
        return cls(
            handler=handler,
            huey=Huey(
                name="connector", results=False, utc=True, storage_class=SqlStorage, database=db
            ),
        )

    def set_handler(self, handler: Handler) -> None:
        self._handler = handler

    def enqueue(self, run_id: str, seq: int, delay: float = 0.0) -> None:
        if delay > 0:
            self._task.schedule(args=(run_id, seq), delay=delay)
        else:
            self._task(run_id, seq)

    def pending(self) -> int:
        return int(self.huey.pending_count()) + int(self.huey.scheduled_count())

    def consumer(self, workers: int, shutdown_timeout: float) -> Consumer:
        """Worker threads in this process; start() and stop(graceful=True) are the caller's."""
        return _Consumer(
            self.huey,
            workers=workers,
            periodic=False,
            initial_delay=0.05,
            backoff=1.2,
            max_delay=0.5,
            scheduler_interval=1,
            worker_type="thread",
            check_worker_health=True,
            shutdown_timeout=shutdown_timeout,
        )

    def close(self) -> None:
        self.huey.storage.close()
