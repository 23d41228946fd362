"""The `connector status` report (`application/status.py`) over the in-memory state
fakes, with fake probes of vCenter and S3 and a fake holder of the state lock."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from connector.application.status import HEALTHY, UNHEALTHY, Status, StatusSettings
from connector.domain.jobs import (
    AUTOMATIC,
    JOB_ACTIVE,
    JOB_COMPLETED,
    JOB_FAILING,
    JOB_PAUSED_ON_FAILURE,
    ON_DEMAND,
    RUN_MISSED,
    JobRow,
)
from connector.domain.model import VmInfo
from connector.domain.records import new_run_id
from connector.domain.times import iso, utcnow
from connector.domain.times import parse as parse_time
from connector.errors import AuthenticationError, UnreachableError
from connector.fakestate import MemoryLedger, MemoryState

DAEMON = "pid 4242: connector run"
LIMIT = dt.timedelta(hours=12)


@dataclass
class FakeJobs:
    """The JobSource port over the fakes: jobs in a list, runs by the ledger's job ids."""

    state: MemoryState
    ledger: MemoryLedger
    rows: list[JobRow] = field(default_factory=list)

    def all(self, include_deleted: bool = False) -> list[JobRow]:
        return list(self.rows)

    def run_ids(self, job_id: str) -> list[str]:
        ids = [r.id for r in self.state.runs()]
        return [i for i, c in self.ledger.controls(ids).items() if c.job_id == job_id]

    def on_demand_since(self, job_id: str, since: dt.datetime) -> int:
        mine = set(self.run_ids(job_id))
        return sum(
            1
            for r in self.state.runs()
            if r.id in mine
            and r.type == ON_DEMAND
            and r.state != RUN_MISSED
            and parse_time(r.started_at) >= since
        )


@dataclass
class World:
    state: MemoryState
    ledger: MemoryLedger
    jobs: FakeJobs
    vcenter_error: Exception | None = None
    s3_error: Exception | None = None
    holder: str | None = DAEMON
    vcenter_configured: bool = True
    now: Callable[[], dt.datetime] = utcnow

    def add_job(self, name: str, state: str = JOB_ACTIVE, message: str = "") -> JobRow:
        server = self.state.upsert_server(
            VmInfo(
                uuid=f"uuid-{name}",
                name=name,
                ref="vm-1",
                datacenter="dc",
                power_state="poweredOn",
                cbt_enabled=True,
            )
        )
        now = iso(utcnow())
        job = JobRow(
            id=f"j-{name}",
            server_id=server.id,
            state=state,
            paused=False,
            seed_time=iso(utcnow() - dt.timedelta(hours=1)),
            frequency_hours=24,
            retention=5,
            description="",
            consecutive_failures=0,
            message=message,
            created_at=now,
            updated_at=now,
        )
        self.jobs.rows.append(job)
        return job

    def add_run(
        self, job: JobRow, run_type: str = AUTOMATIC, state: str | None = None, uploaded: int = 0
    ) -> str:
        run_id = new_run_id()
        if state is None:
            self.state.create_run(run_id, job.server_id, run_type)
        else:
            self.state.create_run(run_id, job.server_id, run_type, state=state)
        self.ledger.ensure_control(run_id, job.id)
        if uploaded:
            self.state.record_commit(run_id, [], {"bytes_uploaded": uploaded, "bytes_read": 7})
            self.state.finish_run(run_id)
        return run_id

    def status(self) -> Status:
        def probe(error: Exception | None) -> Callable[[], None]:
            def check() -> None:
                if error is not None:
                    raise error

            return check

        return Status(
            jobs=self.jobs,
            catalog=self.state,
            runs=self.state,
            probe_vcenter=probe(self.vcenter_error) if self.vcenter_configured else None,
            probe_s3=probe(self.s3_error),
            daemon_holder=lambda: self.holder,
            settings=StatusSettings(
                version="9.9.9",
                on_demand_quota=2,
                vcenter_target="https://vc/sdk",
                s3_target="s3://bucket/replicas at https://s3",
            ),
            now=lambda: self.now(),
        )


@pytest.fixture
def world() -> World:
    state = MemoryState()
    ledger = MemoryLedger(state)
    return World(state, ledger, FakeJobs(state, ledger))


def test_a_job_whose_last_run_completed_is_healthy_with_its_lag_bytes_and_quota(
    world: World,
) -> None:
    job = world.add_job("web")
    world.add_run(job, uploaded=4096)
    on_demand = world.add_run(job, ON_DEMAND, uploaded=1000)
    world.add_run(job, ON_DEMAND, state=RUN_MISSED)  # a missed run uses no quota
    world.now = lambda: utcnow() + dt.timedelta(hours=3)
    report = world.status().report(LIMIT)
    assert report.status == HEALTHY and report.reasons == [] and report.version == "9.9.9"
    assert report.daemon.running and report.vcenter.reachable and report.s3.reachable
    (h,) = report.jobs
    assert h.vm_name == "web" and h.state == JOB_ACTIVE
    assert h.last_run is not None and h.last_run.state == RUN_MISSED
    assert h.last_completed_run is not None and h.last_completed_run.id == on_demand
    assert h.last_completed_run.bytes_uploaded == 1000
    assert h.lag_seconds is not None and 3 * 3600 - 60 <= h.lag_seconds <= 3 * 3600 + 60
    assert (h.on_demand_used, h.on_demand_left) == (1, 1)
    assert h.next_run is not None


def test_vcenter_refusing_the_login_is_unhealthy_and_says_why(world: World) -> None:
    world.vcenter_error = AuthenticationError("vCenter refused the user name or password")
    report = world.status().report(LIMIT)
    assert report.status == UNHEALTHY
    assert report.reasons == [
        "vCenter at https://vc/sdk: vCenter refused the user name or password"
    ]
    assert not report.vcenter.reachable and report.s3.reachable


def test_s3_unreachable_is_unhealthy_and_its_reason_is_scrubbed(world: World) -> None:
    from connector.logging import register_secret
    from connector.secrets import Secret

    register_secret(Secret("sekrit-key-123"))
    world.s3_error = UnreachableError("cannot reach the S3 endpoint (key sekrit-key-123)")
    report = world.status().report(LIMIT)
    assert report.status == UNHEALTHY
    (reason,) = report.reasons
    assert reason.startswith("S3 s3://bucket/replicas at https://s3: cannot reach the S3 endpoint")
    assert "sekrit-key-123" not in reason and report.s3.error is not None
    assert "sekrit-key-123" not in report.s3.error


def test_a_probe_that_breaks_unexpectedly_is_a_reason_not_a_crash(world: World) -> None:
    world.s3_error = RuntimeError("boom")
    report = world.status().report(LIMIT)
    assert report.reasons == ["S3 s3://bucket/replicas at https://s3: RuntimeError: boom"]


@pytest.mark.parametrize("state", [JOB_PAUSED_ON_FAILURE, JOB_FAILING])
def test_a_failing_or_paused_on_failure_job_is_unhealthy(world: World, state: str) -> None:
    world.add_job("db", state=state, message="3 failed run(s) in a row")
    report = world.status().report(LIMIT)
    assert report.status == UNHEALTHY
    assert report.reasons == [f"job j-db (VM db) is {state}: 3 failed run(s) in a row"]


def test_a_run_active_longer_than_the_limit_is_unhealthy(world: World) -> None:
    job = world.add_job("app")
    run_id = world.add_run(job)  # ACTIVE
    assert world.status().report(LIMIT).status == HEALTHY
    world.now = lambda: utcnow() + dt.timedelta(hours=13)
    report = world.status().report(LIMIT)
    assert report.status == UNHEALTHY
    (reason,) = report.reasons
    assert reason.startswith(f"run {run_id} of job j-app has been ACTIVE for 13.0 h")
    assert "more than 12.0 h" in reason


def test_a_stopped_daemon_is_unhealthy_only_when_a_job_waits_for_it(world: World) -> None:
    world.holder = None
    report = world.status().report(LIMIT)
    assert report.status == HEALTHY and not report.daemon.running
    world.add_job("done", state=JOB_COMPLETED)  # a finished run-once job needs no daemon
    assert world.status().report(LIMIT).status == HEALTHY
    world.add_job("web")
    report = world.status().report(LIMIT)
    assert report.status == UNHEALTHY
    assert report.reasons == [
        "the daemon (`connector run`) is not running; 1 job(s) wait for it: j-web"
    ]


def test_a_foreground_replicate_holding_the_lock_is_not_the_daemon(world: World) -> None:
    world.holder = "pid 7: connector replicate"
    world.add_job("web")
    report = world.status().report(LIMIT)
    assert not report.daemon.running and report.daemon.holder == "pid 7: connector replicate"
    assert report.status == UNHEALTHY


def test_the_lock_holder_is_read_without_taking_the_lock(tmp_path: Path) -> None:
    from connector.daemon.lock import StateLock

    probe = StateLock(tmp_path / "state.db", "status")
    assert probe.holder() is None and not probe.path.exists()  # creates nothing
    with StateLock(tmp_path / "state.db", "run"):
        assert probe.holder() == f"pid {os.getpid()}: connector run"
    assert probe.holder() is None
    probe.path.write_text("pid 1: connector run\n")  # left by a killed process
    assert probe.holder() is None


def test_no_vcenter_configured_is_not_a_fault(world: World) -> None:
    world.vcenter_configured = False
    report = world.status().report(LIMIT)
    assert report.status == HEALTHY and not report.vcenter.configured
