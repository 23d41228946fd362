"""Readiness: each check's result is cached for its time to live, failures carry a
scrubbed reason, and a probe in flight does not hold up other callers."""

from __future__ import annotations

import threading

from connector.application.readiness import Readiness
from connector.errors import UnreachableError
from connector.logging import register_secret
from connector.secrets import Secret


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_results_are_cached_for_the_ttl_and_probed_again_after() -> None:
    clock = Clock()
    calls = {"s3": 0}
    up = {"s3": True}

    def s3() -> str:
        calls["s3"] += 1
        if not up["s3"]:
            raise UnreachableError("S3 at https://s3.example does not answer; check the network")
        return "bucket answers"

    ready = Readiness({"s3": s3, "queue": lambda: "0 task(s) waiting"}, ttl=10, clock=clock)
    first = ready.report()
    assert first.ready and [c.name for c in first.checks] == ["s3", "queue"]
    assert first.checks[0].detail == "bucket answers" and first.checks[0].age_seconds == 0
    up["s3"] = False
    clock.now += 9.9
    cached = ready.report()
    assert cached.ready and calls["s3"] == 1  # within the TTL: not probed again
    assert round(cached.checks[0].age_seconds, 1) == 9.9
    clock.now += 0.1
    down = ready.report()
    assert not down.ready and calls["s3"] == 2
    assert [c.name for c in down.failing] == ["s3"]
    assert "does not answer" in down.failing[0].detail
    up["s3"] = True
    clock.now += 10
    assert ready.report().ready and calls["s3"] == 3


def test_an_unexpected_error_is_a_failed_check_without_secrets() -> None:
    secret = "hunter2-secret-value"
    register_secret(Secret(secret))

    def vcenter() -> str:
        raise RuntimeError(f"login with {secret} refused")

    report = Readiness({"vcenter": vcenter}, ttl=1).report()
    assert not report.ready
    detail = report.checks[0].detail
    assert detail.startswith("RuntimeError: login with") and secret not in detail


def test_a_probe_in_flight_does_not_hold_up_callers_that_have_a_result() -> None:
    clock = Clock()
    release = threading.Event()
    entered = threading.Event()
    calls = []

    def slow() -> str:
        calls.append(1)
        if len(calls) == 2:
            entered.set()
            assert release.wait(30)
        return f"answer {len(calls)}"

    ready = Readiness({"vcenter": slow}, ttl=1, clock=clock)
    assert ready.report().checks[0].detail == "answer 1"
    clock.now += 5
    worker = threading.Thread(target=ready.report)
    worker.start()
    assert entered.wait(30)
    # the second probe is running: another caller gets the last result at once
    stale = ready.report().checks[0]
    assert stale.detail == "answer 1" and stale.age_seconds == 5
    release.set()
    worker.join(30)
    assert ready.report().checks[0].detail == "answer 2" and len(calls) == 2


def test_the_daemons_loop_check_names_what_is_not_alive() -> None:
    import time
    from typing import Any

    import pytest

    from connector.config import DaemonConfig
    from connector.daemon.service import Daemon
    from connector.errors import PermanentError

    class Scheduler:
        running = True

    class Consumer:
        def __init__(self, alive: bool) -> None:
            thread = threading.Thread(target=lambda: None)
            if alive:
                thread = threading.current_thread()
            self.worker_threads = [(None, thread)]

    daemon = Daemon(DaemonConfig(), state_lock=None, assemble=lambda _: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(PermanentError, match="starting"):
        daemon.loops()
    state: Any = daemon
    state._scheduler, state._consumer, state._heartbeat = (
        Scheduler(),
        Consumer(True),
        time.monotonic(),
    )
    assert daemon.loops() == "scheduler, 1 queue workers and the main loop alive"
    Scheduler.running = False
    state._consumer = Consumer(False)  # a thread never started is not alive
    with pytest.raises(PermanentError) as failed:
        daemon.loops()
    assert "the scheduler is not running" in str(failed.value)
    assert "a queue worker thread died" in str(failed.value)
    assert "journalctl" in str(failed.value)
    Scheduler.running = True
    state._consumer = Consumer(True)
    state._heartbeat = time.monotonic() - 3600
    with pytest.raises(PermanentError, match="the main loop last ran 3600 s ago"):
        daemon.loops()
    daemon.request_stop()
    with pytest.raises(PermanentError, match="stopping"):
        daemon.loops()
