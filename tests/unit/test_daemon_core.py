"""The daemon's core against the in-memory fakes: job rules, retries by error class,
admission limits, MISSED runs, recovery, the bandwidth limit and sd_notify."""

from __future__ import annotations

import datetime as dt
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from connector.adapters.jobstore import JobStore
from connector.adapters.ledger import SNAPSHOT, RunLedger
from connector.adapters.state import StateStore
from connector.audit import AuditLog, read_records
from connector.daemon.notify import Notifier
from connector.daemon.recovery import recover, sweep
from connector.daemon.runner import LedgerReporter, RunExecutor, RunLimits
from connector.daemon.schedule import JobScheduler
from connector.decorators.bandwidth import (
    BandwidthLimitedStore,
    RateSchedule,
    TokenBucket,
    Window,
    parse_hhmm,
)
from connector.domain import jobs as J
from connector.errors import InvalidInputError, UnreachableError
from connector.fakes import FakeDiskSource, FakeHypervisor, MemoryObjectStore
from connector.faults import crash_point
from connector.pipeline.context import PipelineSettings
from connector.pipeline.driver import RunPipeline
from connector.pipeline.purge import PurgeReport, purge
from connector.store.keys import LocalKeyProvider, generate_key_file
from connector.store.repository import Repository
from tests.harness.pipeline import stage_context

MiB = 1024 * 1024
UTC = dt.UTC


# -- job rules ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 25, -1])
def test_frequency_outside_1_to_24_hours_is_refused(bad: int) -> None:
    with pytest.raises(InvalidInputError, match="from 1 to 24"):
        J.validate_frequency(bad)


def test_frequency_bounds_and_run_once_are_accepted() -> None:
    assert J.validate_frequency(1) == 1
    assert J.validate_frequency(24) == 24
    assert J.validate_frequency(None) is None


def test_seed_time_parsing() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=UTC)
    assert J.parse_seed_time("now", now) == now
    assert J.parse_seed_time("2026-12-01T02:00:00Z", now) == dt.datetime(2026, 12, 1, 2, tzinfo=UTC)
    assert J.parse_seed_time("2026-12-01T02:00", now).tzinfo is not None
    with pytest.raises(InvalidInputError, match="ISO 8601"):
        J.parse_seed_time("tomorrow-ish", now)


@pytest.mark.parametrize(
    "text",
    [
        "0001-01-01T00:00:00Z",  # stored before as an unreadable "1-01-01T00:00:00Z"
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "1969-12-31T23:59:59Z",
        "2024-12-01T10:00:00Z",  # two years back
        "2026-02-01T10:00:01Z",  # just over 30 days ahead
        "9999-12-31T23:00:00-05:00",  # beyond year 9999 in UTC
    ],
)
def test_seed_times_out_of_range_are_refused_with_the_range(text: str) -> None:
    now = dt.datetime(2026, 1, 2, 10, tzinfo=UTC)
    with pytest.raises(InvalidInputError, match="out of range: give a time from") as caught:
        J.validate_seed_time(J.parse_seed_time(text, now), now)
    assert "2025-01-02T10:00:00Z" in str(caught.value)
    assert "2026-02-01T10:00:00Z" in str(caught.value)


def test_seed_times_from_a_year_back_to_30_days_ahead_are_accepted() -> None:
    now = dt.datetime(2026, 1, 2, 10, tzinfo=UTC)
    for value in (
        now,
        now - dt.timedelta(days=365),
        now + dt.timedelta(days=30),
        dt.datetime(2026, 1, 1, 2, tzinfo=UTC),
    ):
        assert J.validate_seed_time(value, now) == value
    assert J.make_spec(now - dt.timedelta(hours=3), 12, 5, "", now=now).seed_time < now
    with pytest.raises(InvalidInputError, match="out of range"):
        J.make_spec(dt.datetime(1, 1, 1, tzinfo=UTC), 1, 5, "", now=now)


def _row(**values: object) -> J.JobRow:
    fields: dict[str, object] = dict(
        id="j-1",
        server_id="s-1",
        state=J.JOB_PENDING,
        paused=False,
        seed_time="2026-01-01T02:00:00Z",
        frequency_hours=12,
        retention=5,
        description="",
        consecutive_failures=0,
        message="",
        created_at="2026-01-01T00:00:00.000000Z",
        updated_at="2026-01-01T00:00:00.000000Z",
    )
    fields.update(values)
    return J.JobRow(**fields)  # type: ignore[arg-type]


def test_a_stored_job_with_a_bad_field_says_what_is_wrong() -> None:
    assert _row().problem is None
    assert _row(seed_time="2025-01-01T00:00:00Z").problem is None  # a job running for a year
    assert _row(seed_time="2026-01-31T00:00:00Z").problem is None  # 30 days after its change
    cases = {
        "1-01-01T00:00:00Z": "is not a valid time",
        "0001-01-01T00:00:00Z": "out of range",
        "2026-03-01T00:00:00Z": "out of range",
        "2026-01-01T02:00:00": "has no time zone",
        "": "is not a valid time",
    }
    for seed, message in cases.items():
        problem = _row(seed_time=seed).problem
        assert problem is not None and message in problem, seed
        assert "connector jobs update j-1 --seed now" in problem
    frequency = _row(frequency_hours=0).problem
    assert frequency is not None and "frequency 0 is out of range" in frequency
    assert "unknown" in (_row(state="BOGUS").problem or "")


def test_retention_and_description_are_checked() -> None:
    for bad in (-1, J.MAX_RETENTION + 1):
        with pytest.raises(InvalidInputError):
            J.validate_retention(bad)
    with pytest.raises(InvalidInputError):
        J.validate_description("two\nlines")
    assert J.validate_retention(3) == 3
    assert J.validate_retention(0) == 0  # keep all, as [retention] keep = 0 says


def test_consecutive_failures_pause_the_job_and_resume_resets_them() -> None:
    status = J.JobStatus(J.JOB_ACTIVE, 0)
    for n in range(1, 5):
        status = J.on_run_failed(status, False, 5, "S3 unreachable")
        assert status.state == J.JOB_FAILING and status.consecutive_failures == n
    status = J.on_run_failed(status, False, 5, "S3 unreachable")
    assert status.state == J.JOB_PAUSED_ON_FAILURE
    assert "5 failed runs" in status.message and "resume" in status.message
    resumed = J.on_resume(status, has_completed_run=True)
    assert resumed == J.JobStatus(J.JOB_ACTIVE, 0, "resumed")
    assert J.on_run_completed(J.JobStatus(J.JOB_FAILING, 3), False).consecutive_failures == 0


def test_run_once_jobs_end_completed_or_failed() -> None:
    assert J.on_run_completed(J.JobStatus(J.JOB_ACTIVE, 0), True).state == J.JOB_COMPLETED
    assert J.on_run_failed(J.JobStatus(J.JOB_ACTIVE, 0), True, 5, "x").state == J.JOB_FAILED


def test_on_demand_quota_and_active_runs() -> None:
    assert J.on_demand_refusal(0, 1, 2, J.JOB_ACTIVE) is None
    assert "quota" in (J.on_demand_refusal(0, 2, 2, J.JOB_ACTIVE) or "")
    assert "already" in (J.on_demand_refusal(1, 0, 2, J.JOB_ACTIVE) or "")
    assert "deleted" in (J.on_demand_refusal(0, 0, 2, J.JOB_DELETING) or "")


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [J.backoff_delay(n, 10, 60) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_next_run_time_follows_seed_and_frequency() -> None:
    seed = dt.datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    now = dt.datetime(2026, 1, 1, 5, 30, tzinfo=UTC)
    assert J.next_run_time(seed, 2, now, ran=True) == dt.datetime(2026, 1, 1, 6, 0, tzinfo=UTC)
    assert J.next_run_time(seed, 2, now, ran=False) == now
    later = seed + dt.timedelta(days=1)
    assert J.next_run_time(later, 2, now, ran=False) == later
    assert J.next_run_time(seed, None, now, ran=True) is None
    half = now + dt.timedelta(seconds=30)
    assert J.next_run_time(seed, 1, half, ran=True, unit_seconds=60) == dt.datetime(
        2026, 1, 1, 5, 31, tzinfo=UTC
    )


# -- bandwidth limit --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def test_token_bucket_paces_64_mib_at_8_mib_per_second_to_7_seconds() -> None:
    clock = FakeClock()
    noon = dt.datetime(2026, 1, 1, 12, 0).astimezone()
    bucket = TokenBucket(RateSchedule(8 * MiB), clock.monotonic, clock.sleep, lambda: noon)
    inner = MemoryObjectStore()
    store = BandwidthLimitedStore(inner, bucket)
    store.put("a", bytes(64 * MiB))
    assert clock.t == pytest.approx(7.0)
    for _ in range(4):
        store.put("b", bytes(8 * MiB))
    assert clock.t == pytest.approx(11.0)  # then 8 MiB per second
    assert inner.stat("a") == 64 * MiB and store.get("b", 0, 4) == bytes(4)


def test_time_of_day_windows_choose_the_rate() -> None:
    night = Window(parse_hhmm("22:00"), parse_hhmm("06:00"), 0)
    office = Window(parse_hhmm("08:00"), parse_hhmm("18:00"), 1 * MiB)
    schedule = RateSchedule(4 * MiB, (night, office))

    def at(h: int, m: int = 0) -> dt.datetime:
        return dt.datetime(2026, 1, 1, h, m)

    assert schedule.rate_at(at(23)) == 0 and schedule.rate_at(at(5, 59)) == 0
    assert schedule.rate_at(at(9)) == 1 * MiB
    assert schedule.rate_at(at(7)) == 4 * MiB and schedule.rate_at(at(18)) == 4 * MiB
    assert not schedule.unlimited and RateSchedule(0).unlimited

    clock = FakeClock()
    bucket = TokenBucket(schedule, clock.monotonic, clock.sleep, lambda: at(23))
    bucket.take(100 * MiB)  # unlimited at night
    assert clock.sleeps == []


# -- sd_notify -------------------------------------------------------------------------


def test_notifier_sends_datagrams_to_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000"})
        assert n.enabled and n.watchdog_interval == pytest.approx(1.5)
        n.ready("running")
        lines = sock.recv(4096).decode().splitlines()
        assert lines[:2] == ["READY=1", "STATUS=running"]
        n.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"
        n.stopping("bye")
        assert sock.recv(4096).decode().splitlines() == ["STOPPING=1", "STATUS=bye"]


def test_notifier_abstract_socket_and_foreign_watchdog_pid() -> None:
    name = f"connector-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
        assert n.watchdog_interval is None  # the watchdog is for another process
        n.status("hello")
        assert sock.recv(100) == b"STATUS=hello"
    assert not Notifier({}).enabled


def test_crash_point_does_nothing_unless_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONNECTOR_TEST_CRASH_AT", raising=False)
    crash_point("after-commit")
    monkeypatch.setenv("CONNECTOR_TEST_CRASH_AT", "before-commit:3")
    crash_point("after-commit")
    crash_point("before-commit")  # the first of three hits: still alive
    assert os.getpid() > 0


def test_a_pause_point_waits_until_its_file_is_removed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    marker = tmp_path / "paused"
    monkeypatch.setenv("CONNECTOR_TEST_PAUSE_AT", "block-read:2,snapshot-remove:1")
    monkeypatch.setenv("CONNECTOR_TEST_PAUSE_FILE", str(marker))
    crash_point("block-read")  # the first hit of two: no pause
    assert not marker.exists()
    passed = threading.Event()

    def reach() -> None:
        crash_point("block-read")
        passed.set()

    worker = threading.Thread(target=reach)
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < deadline, "the pause point wrote no file"
            time.sleep(0.01)
        assert marker.read_text().split() == [str(os.getpid()), "block-read"]
        assert not passed.wait(0.2)  # still paused while the file is there
    finally:
        marker.unlink(missing_ok=True)
        worker.join(10)
    assert passed.is_set()


# -- the executor against the fakes -------------------------------------------------------


class ListQueue:
    def __init__(self) -> None:
        self.tasks: list[tuple[str, int, float]] = []

    def enqueue(self, run_id: str, seq: int, delay: float = 0.0) -> None:
        self.tasks.append((run_id, seq, delay))


class World:
    def __init__(self, tmp_path: Path, **limits: float) -> None:
        self.hv = FakeHypervisor(page=2)
        self.objects = MemoryObjectStore()
        generate_key_file(tmp_path / "key")
        self.provider = LocalKeyProvider(tmp_path / "key")
        self.state = StateStore.at_path(tmp_path / "state.db")
        self.ledger = RunLedger(self.state)
        self.jobs = JobStore(self.state, self.ledger)
        self.queue = ListQueue()
        self.s3_down = 0  # how many more repository opens fail
        self.retained: list[tuple[str, int]] = []
        self.stopping = threading.Event()
        self.reporter = LedgerReporter(self.ledger)
        self.audit = AuditLog(tmp_path / "audit.jsonl")
        self.pipeline = RunPipeline(
            stage_context(
                self.hv,
                FakeDiskSource(self.hv),
                self.open_repo,
                self.state,
                PipelineSettings(pack_size=2 * MiB, max_disks_per_vm=2),
                ledger=self.ledger,
                reporter=self.reporter,
                should_stop=self.stopping.is_set,
                audit=self.audit,
            )
        )
        defaults = {"stage_retries": 2, "retry_backoff": 0.5, "retry_backoff_max": 10.0}
        defaults.update(limits)
        self.limits = RunLimits(**defaults)  # type: ignore[arg-type]

        def retention(server_id: str) -> PurgeReport:
            # as the CLI does: a job's --retention is its server's retention setting
            job = self.jobs.for_server(server_id)
            assert job is not None
            n = job.retention
            self.retained.append((server_id, n))
            return purge(self.open_repo(), self.state, {server_id: n})

        self.executor = RunExecutor(
            self.pipeline,
            self.hv,
            self.state,
            self.ledger,
            self.jobs,
            self.queue,
            self.limits,
            retention,
            self.stopping,
            on_run_end=self.reporter.forget,
        )
        self.scheduler = JobScheduler(self.jobs, self.queue, unit_seconds=1, sync_interval=1)

    def open_repo(self) -> Repository:
        if self.s3_down > 0:
            self.s3_down -= 1
            raise UnreachableError("cannot reach the S3 endpoint https://s3.test (refused)")
        return Repository.open(self.objects, self.provider, create=True)

    def vm_with_job(self, name: str, frequency: int | None = 1, retention: int = 2) -> str:
        uuid = self.hv.add_vm(name, [8 * MiB, 4 * MiB])
        rng = random.Random(name)
        self.hv.write(uuid, 2000, 1 * MiB, rng.randbytes(3 * MiB))
        self.hv.write(uuid, 2001, 0, rng.randbytes(1 * MiB))
        server = self.state.upsert_server(self.hv.get_vm(uuid))
        spec = J.make_spec(dt.datetime.now(UTC), frequency, retention, name)
        return self.jobs.create(server.id, spec).id

    def drain(self, limit: int = 200) -> list[float]:
        """Run queued tasks in order (delays are recorded, not waited)."""
        delays: list[float] = []
        for _ in range(limit):
            if not self.queue.tasks:
                return delays
            run_id, seq, delay = self.queue.tasks.pop(0)
            delays.append(delay)
            self.executor.handle(run_id, seq)
        raise AssertionError("the queue never drained")


def test_a_scheduled_run_completes_and_retention_is_applied(tmp_path: Path) -> None:
    w = World(tmp_path)
    job_id = w.vm_with_job("vm-a")
    for _ in range(3):
        assert w.scheduler.fire(job_id)
        w.drain()
    runs = w.jobs.runs_of(job_id)
    assert [r.state for r in runs] == ["DELETED", "COMPLETED", "COMPLETED"]
    server_id = runs[0].server_id
    stored = w.open_repo().scan_runs(server_id)[server_id]
    assert not stored[runs[0].id].commit  # its commit is gone from the store
    assert stored[runs[2].id].commit
    assert w.open_repo().lock_ids() == []  # every run removed its lock
    assert all(r.type == "AUTOMATIC" and r.stage == "done" for r in runs)
    assert w.jobs.get(job_id).state == J.JOB_ACTIVE
    assert w.retained and w.retained[-1][1] == 2
    records = read_records(w.audit.path)
    for run in runs:
        mine = [(r["action"], r["outcome"]) for r in records if r["details"]["run"] == run.id]
        assert mine == [("run.start", "started"), ("run.finish", "success")]
    assert all(not s for v in w.hv.vms.values() for s in v.snapshots)
    ctl = w.ledger.control(runs[-1].id)
    assert ctl is not None and ctl.detail == "" and ctl.attempts == 0
    assert w.reporter._disks == {}  # nothing kept of ended runs


def test_a_stored_job_with_a_bad_seed_is_skipped_and_the_others_are_scheduled(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    good = w.vm_with_job("vm-good")
    bad = w.vm_with_job("vm-bad")
    w.jobs.update(bad, seed_time="1-01-01T00:00:00Z")  # as an older version stored year 1
    w.scheduler.sync()
    assert w.scheduler.scheduler.get_job(f"every:{good}") is not None
    assert w.scheduler.scheduler.get_job(f"every:{bad}") is None
    assert w.scheduler.fire(bad) is None and not w.queue.tasks
    assert w.scheduler.fire(good) is not None
    w.drain()
    assert [r.state for r in w.jobs.runs_of(good)] == ["COMPLETED"]
    w.jobs.update(bad, seed_time="2026-01-01T00:00:00Z")  # fixed: scheduled at the next sync
    w.scheduler.sync()
    assert w.scheduler.scheduler.get_job(f"every:{bad}") is not None


def test_a_fire_during_an_active_run_is_missed_not_queued(tmp_path: Path) -> None:
    w = World(tmp_path)
    job_id = w.vm_with_job("vm-b")
    first = w.scheduler.fire(job_id)
    second = w.scheduler.fire(job_id)  # the first is still PENDING
    assert first and second
    assert w.state.run(second).state == "MISSED"
    assert "still PENDING" in (w.state.run(second).error or "")
    assert [t[0] for t in w.queue.tasks] == [first]
    w.drain()
    assert w.state.run(first).state == "COMPLETED"


def test_transient_errors_are_retried_with_backoff_then_succeed(tmp_path: Path) -> None:
    w = World(tmp_path)
    job_id = w.vm_with_job("vm-c")
    w.s3_down = 2
    run_id = w.scheduler.fire(job_id)
    assert run_id
    delays = w.drain()
    assert [d for d in delays if d > 0] == [0.5, 1.0]  # two retries, doubling
    assert w.state.run(run_id).state == "COMPLETED"


def test_five_failed_runs_pause_the_job_and_resume_succeeds(tmp_path: Path) -> None:
    w = World(tmp_path, failures_before_pause=5)
    job_id = w.vm_with_job("vm-d")
    for n in range(5):
        w.s3_down = 3  # more than stage_retries
        run_id = w.scheduler.fire(job_id)
        assert run_id
        w.drain()
        run = w.state.run(run_id)
        assert run.state == "FAILED"
        assert "cannot reach the S3 endpoint" in (run.error or "")
        assert "gave up after 3 attempts" in (run.error or "")
        assert w.jobs.get(job_id).consecutive_failures == n + 1
    job = w.jobs.get(job_id)
    assert job.state == J.JOB_PAUSED_ON_FAILURE
    assert w.scheduler.fire(job_id) is None  # a paused job does not run
    w.jobs.set_status(job_id, J.on_resume(job.status, w.jobs.has_completed_run(job_id)))
    assert w.jobs.get(job_id).state == J.JOB_PENDING
    w.s3_down = 0
    run_id = w.scheduler.fire(job_id)
    assert run_id
    w.drain()
    assert w.state.run(run_id).state == "COMPLETED"
    assert w.jobs.get(job_id).state == J.JOB_ACTIVE


def test_a_permanent_error_fails_at_once_and_rolls_back(tmp_path: Path) -> None:
    w = World(tmp_path)
    job_id = w.vm_with_job("vm-e")
    run_id = w.scheduler.fire(job_id)
    assert run_id
    w.queue.tasks.clear()
    w.executor.handle(run_id, 0)  # admitted
    w.executor.handle(run_id, 1)  # validate
    assert w.open_repo().lock_ids() == [run_id]  # held before any dedup lookup
    w.executor.handle(run_id, 2)  # snapshot: connector-<run> exists now
    uuid = w.state.server(w.state.run(run_id).server_id).vm_uuid
    assert len(w.hv.vms[uuid].snapshots) == 1
    w.executor.handle(run_id, 3)  # changes
    ref = next(iter(w.hv.vms[uuid].snapshots))
    w.hv.vms[uuid].snapshots[ref][1][2000] = b""  # the snapshot's disk can no longer be read
    w.queue.tasks.clear()
    w.executor.handle(run_id, 4)  # transfer fails: not transient, no retry
    run = w.state.run(run_id)
    assert run.state == "FAILED" and (run.error or "").startswith("transfer: unexpected")
    assert not w.hv.vms[uuid].snapshots
    assert w.ledger.pending(SNAPSHOT, run_id) == []
    assert w.queue.tasks == []
    assert w.open_repo().lock_ids() == []  # the rollback removed the run's lock
    finish = [r for r in read_records(w.audit.path) if r["action"] == "run.finish"]
    assert finish[-1]["outcome"] == "failure" and finish[-1]["details"]["run"] == run_id


def test_stale_and_duplicate_tasks_do_nothing(tmp_path: Path) -> None:
    w = World(tmp_path)
    job_id = w.vm_with_job("vm-f")
    run_id = w.scheduler.fire(job_id)
    assert run_id
    w.drain()
    before = w.state.run(run_id)
    w.queue.enqueue(run_id, 0)
    w.queue.enqueue(run_id, 3)
    w.drain()
    assert w.state.run(run_id) == before


def test_admission_waits_for_a_free_slot(tmp_path: Path) -> None:
    w = World(tmp_path, max_concurrent_runs=1, admission_interval=2.0)
    a, b = w.vm_with_job("vm-g"), w.vm_with_job("vm-h")
    run_a, run_b = w.scheduler.fire(a), w.scheduler.fire(b)
    assert run_a and run_b
    w.queue.tasks.clear()
    w.executor.handle(run_a, 0)
    w.executor.handle(run_b, 0)
    assert w.state.run(run_a).state == "ACTIVE"
    assert w.state.run(run_b).state == "PENDING"
    ctl = w.ledger.control(run_b)
    assert ctl is not None and "max_concurrent_runs" in ctl.detail
    assert (run_b, ctl.seq, 2.0) in w.queue.tasks
    w.drain()
    assert w.state.run(run_a).state == w.state.run(run_b).state == "COMPLETED"


def test_recovery_resumes_an_active_run_and_removes_leftovers(tmp_path: Path) -> None:
    w = World(tmp_path)
    job_id = w.vm_with_job("vm-i")
    run_id = w.scheduler.fire(job_id)
    assert run_id
    for seq in range(4):  # admit, validate, snapshot, changes; then the process "dies"
        w.queue.tasks.clear()
        w.executor.handle(run_id, seq)
    assert w.state.run(run_id).stage == "transfer"
    w.queue.tasks.clear()
    w.ledger.upload_started("packs/ab/abandoned", "upload-1")

    class Uploads:
        aborted: list[tuple[str, str]] = []

        def abort_upload(self, key: str, upload_id: str) -> bool:
            self.aborted.append((key, upload_id))
            return True

        def abort_incomplete_uploads(
            self, older_than: dt.timedelta, keep: frozenset[str] = frozenset()
        ) -> int:
            return 0

        def uploads_in_use(self) -> frozenset[str]:
            return frozenset()

    uploads = Uploads()
    report = recover(w.state, w.ledger, w.queue, w.hv, uploads, resume_within=3600)
    assert report.resumed == [run_id] and report.uploads_aborted == 1
    assert uploads.aborted == [("packs/ab/abandoned", "upload-1")]
    w.drain()
    assert w.state.run(run_id).state == "COMPLETED"
    assert all(not v.snapshots for v in w.hv.vms.values())
    assert w.open_repo().lock_ids() == []


def test_recovery_sweep_removes_the_lock_of_a_run_it_ends(tmp_path: Path) -> None:
    w = World(tmp_path)
    job_id = w.vm_with_job("vm-j")
    run_id = w.scheduler.fire(job_id)
    assert run_id
    for seq in range(3):  # admit, validate, snapshot; then the process "dies"
        w.queue.tasks.clear()
        w.executor.handle(run_id, seq)
    assert w.open_repo().lock_ids() == [run_id]
    w.jobs.mark_run(run_id, "FAILED", "ended elsewhere")  # over, its snapshot still recorded

    class Uploads:
        def abort_upload(self, key: str, upload_id: str) -> bool:
            return True

        def abort_incomplete_uploads(
            self, older_than: dt.timedelta, keep: frozenset[str] = frozenset()
        ) -> int:
            return 0

        def uploads_in_use(self) -> frozenset[str]:
            return frozenset()

    report = sweep(w.state, w.ledger, w.hv, Uploads(), release_lock=w.pipeline.release_lock)
    assert report.snapshots_removed == 1
    assert w.open_repo().lock_ids() == []


def test_the_block_index_takes_the_same_block_from_concurrent_writers(tmp_path: Path) -> None:
    from connector.domain.manifest import BlockRef

    state = StateStore.at_path(tmp_path / "state.db")
    shared = [bytes([n]) * 32 for n in range(50)]
    errors: list[BaseException] = []

    def writer(pack: str) -> None:
        try:
            for n in range(0, 50, 5):
                state.add([BlockRef(b, pack, i, 1) for i, b in enumerate(shared[n : n + 5])])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"pack-{t}",)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    found = [state.lookup(b) for b in shared]
    assert all(ref is not None and ref.pack_id.startswith("pack-") for ref in found)


def test_admission_limits_runs_per_esxi_host(tmp_path: Path) -> None:
    w = World(tmp_path, max_concurrent_runs=4, max_runs_per_host=1, admission_interval=1.0)
    a, b = w.vm_with_job("vm-j"), w.vm_with_job("vm-k")  # the fakes' VMs share one host
    run_a, run_b = w.scheduler.fire(a), w.scheduler.fire(b)
    assert run_a and run_b
    w.queue.tasks.clear()
    w.executor.handle(run_a, 0)
    w.executor.handle(run_b, 0)
    ctl = w.ledger.control(run_b)
    assert w.state.run(run_b).state == "PENDING"
    assert ctl is not None and "max_runs_per_host" in ctl.detail
    w.drain()
    assert w.state.run(run_b).state == "COMPLETED"


def test_retention_that_cannot_run_is_recorded_and_tried_again_until_applied(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, retention_retry_backoff=60.0, retry_backoff_max=600.0)
    job_id = w.vm_with_job("vm-ret", retention=1)
    assert w.scheduler.fire(job_id)
    w.drain()
    apply = w.executor.retention
    failures = [UnreachableError("cannot reach the S3 endpoint https://s3.test (refused)")] * 2

    def flaky(server_id: str) -> object:
        if failures:
            raise failures.pop()
        return apply(server_id)

    w.executor.retention = flaky
    assert w.scheduler.fire(job_id)
    w.drain()
    job = w.jobs.get(job_id)
    assert job.retention_due is not None and job.retention_attempts == 1
    assert "cannot reach the S3 endpoint" in (job.retention_error or "")
    runs = w.jobs.runs_of(job_id)
    assert [r.state for r in runs] == ["COMPLETED", "COMPLETED"]  # nothing deleted yet
    now = dt.datetime.now(UTC)
    next_at = dt.datetime.strptime(job.retention_next_at or "", "%Y-%m-%dT%H:%M:%S.%fZ")
    assert 55 <= (next_at.replace(tzinfo=UTC) - now).total_seconds() <= 61
    # not due yet: the periodic retry leaves it alone
    w.executor.retry_retention()
    assert w.jobs.get(job_id).retention_attempts == 1 and len(failures) == 1
    assert [j.id for j in w.jobs.retention_to_retry(now + dt.timedelta(seconds=61))] == [job_id]
    # due: the second try fails too, and waits twice as long
    w.jobs.update(job_id, retention_next_at="2000-01-01T00:00:00.000000Z")
    w.executor.retry_retention()
    job = w.jobs.get(job_id)
    assert job.retention_attempts == 2 and not failures
    next_at = dt.datetime.strptime(job.retention_next_at or "", "%Y-%m-%dT%H:%M:%S.%fZ")
    assert 115 <= (next_at.replace(tzinfo=UTC) - dt.datetime.now(UTC)).total_seconds() <= 121
    # the third try applies it
    w.jobs.update(job_id, retention_next_at="2000-01-01T00:00:00.000000Z")
    w.executor.retry_retention()
    job = w.jobs.get(job_id)
    assert job.retention_due is None and job.retention_attempts == 0
    assert job.retention_error is None
    assert [r.state for r in w.jobs.runs_of(job_id)] == ["DELETED", "COMPLETED"]


def test_owed_retention_of_a_deleted_job_is_dropped_not_applied(tmp_path: Path) -> None:
    w = World(tmp_path)
    job_id = w.vm_with_job("vm-ret-gone", retention=1)
    token = w.jobs.retention_owed(job_id)
    w.jobs.update(job_id, state=J.JOB_DELETED)
    w.executor.retry_retention()
    assert w.retained == []
    assert w.jobs.get(job_id).retention_due is None
    # a stale token settles nothing
    newer = w.jobs.retention_owed(job_id)
    assert newer != token and not w.jobs.retention_applied(job_id, token)
    assert w.jobs.get(job_id).retention_due == newer


def test_the_sweep_aborts_recorded_uploads_no_put_owns_and_stale_unrecorded_ones(
    tmp_path: Path,
) -> None:
    w = World(tmp_path)
    w.ledger.upload_started("packs/aa/in-flight", "upload-owned")
    w.ledger.upload_started("packs/bb/left-over", "upload-orphan")
    w.ledger.upload_started("packs/cc/refused", "upload-refused")

    class Uploads:
        def __init__(self) -> None:
            self.aborted: list[str] = []
            self.listed: list[dt.timedelta] = []

        def abort_upload(self, key: str, upload_id: str) -> bool:
            self.aborted.append(upload_id)
            return upload_id != "upload-refused"  # S3 refused this abort

        def abort_incomplete_uploads(
            self, older_than: dt.timedelta, keep: frozenset[str] = frozenset()
        ) -> int:
            self.listed.append(older_than)
            return 2

        def uploads_in_use(self) -> frozenset[str]:
            return frozenset({"upload-owned"})

    uploads = Uploads()
    age = dt.timedelta(seconds=90)
    report = sweep(w.state, w.ledger, w.hv, uploads, stale_upload_age=age)
    assert uploads.aborted == ["upload-orphan", "upload-refused"]  # never the owned one
    assert uploads.listed == [age]
    assert report.uploads_aborted == 3
    assert report.problems == ["multipart upload of packs/cc/refused could not be aborted"]
    pending = sorted(e.ref or "" for e in w.ledger.pending("multipart"))
    assert pending == ["upload-owned", "upload-refused"]  # the refused one is tried again
    # without an age, no prefix-wide listing
    uploads.listed.clear()
    sweep(w.state, w.ledger, w.hv, uploads)
    assert uploads.listed == []

    class Unreachable(Uploads):
        def abort_incomplete_uploads(
            self, older_than: dt.timedelta, keep: frozenset[str] = frozenset()
        ) -> int:
            raise UnreachableError("cannot reach the S3 endpoint https://s3.test (refused)")

    report = sweep(w.state, w.ledger, w.hv, Unreachable(), stale_upload_age=age)
    assert any(
        p.startswith("listing incomplete uploads: cannot reach the S3 endpoint")
        for p in report.problems
    )
