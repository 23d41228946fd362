"""The queue port's contract over both adapters: huey on its SQLite file, and huey on
the fleet's PostgreSQL (its storage in the state database), shared by consumers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from connector.adapters.sql import Database
from connector.daemon.queue import RunQueue
from tests.harness.daemon import wait_for
from tests.harness.postgres import temp_database

Factory = Callable[[], RunQueue]


@contextmanager
def sqlite_queues(tmp_path: Path) -> Iterator[Factory]:
    opened: list[RunQueue] = []

    def new() -> RunQueue:
        q = RunQueue(tmp_path / "queue.db")
        opened.append(q)
        return q

    yield new
    for q in opened:
        q.close()


@contextmanager
def postgresql_queues(tmp_path: Path) -> Iterator[Factory]:
    with temp_database() as url:
        dbs: list[Database] = []
        opened: list[RunQueue] = []

        def new() -> RunQueue:
            db = Database(url)  # each member has its own engine, as on its own machine
            dbs.append(db)
            q = RunQueue.in_database(db)
            opened.append(q)
            return q

        yield new
        for q in opened:
            q.close()
        for db in dbs:
            db.close()


IMPLEMENTATIONS = {"sqlite": sqlite_queues, "postgresql": postgresql_queues}


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.integration),
    ]
)
def queues(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    with IMPLEMENTATIONS[request.param](tmp_path) as factory:
        yield factory


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, int]] = []

    def __call__(self, run_id: str, seq: int) -> None:
        with self.lock:
            self.calls.append((run_id, seq))


@contextmanager
def consuming(queue: RunQueue, handler: Recorder, workers: int = 2) -> Iterator[None]:
    queue.set_handler(handler)
    consumer = queue.consumer(workers=workers, shutdown_timeout=5)
    consumer.start()
    try:
        yield
    finally:
        consumer.stop(graceful=True)


def test_a_task_enqueued_is_handled_once_with_its_arguments(queues: Factory) -> None:
    q = queues()
    q.enqueue("r-1", 3)
    assert q.pending() == 1
    rec = Recorder()
    with consuming(q, rec):
        wait_for("the task", lambda: rec.calls, timeout=30)
        wait_for("an empty queue", lambda: q.pending() == 0, timeout=30)
    assert rec.calls == [("r-1", 3)]


def test_tasks_survive_a_reopening_of_the_queue(queues: Factory) -> None:
    first = queues()
    first.enqueue("r-2", 0)
    first.enqueue("r-3", 1, delay=0.5)
    first.close()
    second = queues()
    assert second.pending() == 2
    rec = Recorder()
    with consuming(second, rec):
        wait_for("both tasks", lambda: len(rec.calls) == 2, timeout=30)
    assert sorted(rec.calls) == [("r-2", 0), ("r-3", 1)]


def test_a_delayed_task_waits_in_the_schedule_then_runs(queues: Factory) -> None:
    q = queues()
    q.enqueue("r-4", 7, delay=3600)
    q.enqueue("r-5", 1, delay=0.2)
    rec = Recorder()
    with consuming(q, rec):
        wait_for("the short delay", lambda: rec.calls, timeout=30)
    assert rec.calls == [("r-5", 1)]
    assert q.pending() == 1  # the hour-long one is still scheduled


def test_an_enqueue_only_queue_refuses_to_execute(queues: Factory) -> None:
    q = queues()
    with pytest.raises(RuntimeError, match="only enqueues"):
        q._task.call_local("r-6", 0)


def test_consumers_of_one_queue_take_each_task_once(queues: Factory) -> None:
    producer = queues()
    for n in range(60):
        producer.enqueue(f"r-{n}", n, delay=0.3 if n % 3 == 0 else 0.0)
    members = [queues() for _ in range(3)]
    recs = [Recorder() for _ in members]
    with (
        consuming(members[0], recs[0]),
        consuming(members[1], recs[1]),
        consuming(members[2], recs[2]),
    ):
        wait_for("every task", lambda: sum(len(r.calls) for r in recs) >= 60, timeout=60)
    calls = [c for r in recs for c in r.calls]
    assert sorted(calls) == sorted((f"r-{n}", n) for n in range(60))  # each exactly once
    assert producer.pending() == 0
