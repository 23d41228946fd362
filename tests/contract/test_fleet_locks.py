"""The fleet's locks on a real PostgreSQL: a run's claim (the VM's lock) held by one
member at a time and freed when its holder stops heartbeating, the scheduler's
leadership passing on, a schedule slot making one run, and one purge at a time
across connectors, released with its holder's session."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import psycopg
import pytest

from connector.adapters.fleet import SCHEDULER, Fleet
from connector.adapters.jobstore import JobStore
from connector.adapters.ledger import RunLedger
from connector.adapters.sql import Database, advisory_key
from connector.adapters.state import StateStore
from connector.application.retention import Retention
from connector.domain.jobs import AUTOMATIC, RUN_PENDING, make_spec
from connector.errors import PermanentError
from tests.harness.daemon import wait_for

pytestmark = pytest.mark.integration

LEASE = 1.0


def members(url: str, n: int) -> list[Fleet]:
    out = []
    for i in range(n):
        f = Fleet(Database(url), f"m-{i}", LEASE)
        f.register("test", ["transport:local"])
        out.append(f)
    return out


def test_a_claim_is_held_by_one_member_until_its_holder_dies(pg_url: str) -> None:
    a, b = members(pg_url, 2)
    ledger = RunLedger(a.db)
    ledger.runs.create_run("r-1", "s-1", "AUTOMATIC")
    seq = ledger.advance("r-1")
    assert a.claim("r-1", seq)
    assert not b.claim("r-1", seq)  # a is alive: its claim holds
    assert not b.claim("r-1", seq + 1)  # a stale or future token is never claimed
    assert a.claim("r-1", seq)  # the holder may claim again

    # b keeps heartbeating, a stops: after the lease, a's claim is free for b
    def a_dead() -> bool:
        b.heartbeat()
        return not b.members()[0].alive

    wait_for("a to count as dead", a_dead, 10)
    assert b.claim("r-1", seq)
    assert b.holds("r-1") and not a.holds("r-1")
    orphans = a.orphans(set(), grace=0)
    assert [o.run_id for o in orphans] == []  # b holds it and b is alive
    # moving the token on ends the claim
    ledger.advance("r-1")
    assert not b.holds("r-1")


def test_an_orphan_of_a_dead_member_is_found_and_released_once(pg_url: str) -> None:
    a, b, c = members(pg_url, 3)
    ledger = RunLedger(a.db)
    ledger.runs.create_run("r-2", "s-2", "AUTOMATIC")
    seq = ledger.advance("r-2")
    assert a.claim("r-2", seq)

    def a_dead() -> bool:
        b.heartbeat()
        c.heartbeat()
        return any(o.run_id == "r-2" for o in b.orphans(set(), grace=60))

    wait_for("the orphan", a_dead, 10)
    assert [o.owner for o in b.orphans(set(), grace=60)] == ["m-0"]
    assert b.release_if("r-2", "m-0")
    assert not c.release_if("r-2", "m-0")  # only one taker


def test_leadership_passes_on_when_the_leader_stops(pg_url: str) -> None:
    a, b = members(pg_url, 2)
    assert a.hold_lease(SCHEDULER)
    assert not b.hold_lease(SCHEDULER)
    assert a.lease_holder(SCHEDULER) == "m-0"
    a.leave()  # a clean stop gives it up at once
    assert b.hold_lease(SCHEDULER)
    assert b.lease_holder(SCHEDULER) == "m-1"
    assert not a.hold_lease(SCHEDULER) or a.lease_holder(SCHEDULER) == "m-0"


def test_a_schedule_slot_makes_one_run(pg_url: str) -> None:
    state = StateStore(Database(pg_url))
    other = StateStore(Database(pg_url))
    try:
        jobs = JobStore(state, RunLedger(state))
        jobs2 = JobStore(other, RunLedger(other))
        state.add_server("s-9", "uuid-9", "vm-9")
        job = jobs.create("s-9", make_spec(dt.datetime.now(dt.UTC), 1, 3, ""))
        key = f"{job.id}@2026-12-01T10:00:00.000000Z"
        assert jobs.create_run("r-a", job, AUTOMATIC, RUN_PENDING, schedule_key=key)
        assert not jobs2.create_run("r-b", job, AUTOMATIC, RUN_PENDING, schedule_key=key)
        assert jobs.count_runs(job.id) == 1
        assert jobs.run_of_schedule(key) == "r-a"
    finally:
        state.close()
        other.close()


def test_one_purge_at_a_time_across_connectors(pg_url: str, tmp_path: Path) -> None:
    dbs = [Database(pg_url), Database(pg_url)]
    guards = [
        Retention(
            open_repo=lambda: None,  # type: ignore[arg-type,return-value]
            state=None,  # type: ignore[arg-type]
            default_keep=0,
            stale_lock_age=dt.timedelta(hours=1),
            guard_path=tmp_path / f"c{i}" / "purge.lock",  # each its own machine
            shared_guard=lambda db=db: db.session_lock("purge"),  # type: ignore[misc]
        )
        for i, db in enumerate(dbs)
    ]
    with (
        guards[0].guard(),
        pytest.raises(PermanentError, match="another connector of the fleet is purging"),
        guards[1].guard(),
    ):
        pass
    with guards[1].guard():  # released at the end of the first
        pass
    # a holder whose process dies (its session ends without unlocking) releases it
    holder = psycopg.connect(pg_url, autocommit=True)
    assert holder.execute("SELECT pg_try_advisory_lock(%s)", (advisory_key("purge"),)).fetchone()
    with (
        pytest.raises(PermanentError, match="another connector"),
        guards[1].guard(),
    ):
        pass
    holder.close()
    with guards[1].guard():
        pass
    for db in dbs:
        db.close()


def test_the_stage_log_records_who_ran_what_and_is_pruned(pg_url: str) -> None:
    (a,) = members(pg_url, 1)
    entry = a.stage_started("r-7", "s-7", "transfer")
    a.stage_ended(entry, "done")
    (row,) = a.stage_history()
    assert (row["member"], row["stage"], row["outcome"]) == ("m-0", "transfer", "done")
    assert row["ended"] >= row["started"]  # type: ignore[operator]
    assert a.prune_stage_log(3600) == 0
    assert a.prune_stage_log(-1) == 1
    assert a.stage_history() == []
