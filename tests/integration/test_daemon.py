"""`connector run` as a real process against the simulator and moto_server:
schedules and MISSED runs, pause on failure, graceful shutdown, sd_notify, the
bandwidth limit, and the jobs CLI."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from connector.app import App
from connector.config import load_config
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.daemon import job_doc, start_daemon, wait_for
from tests.harness.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration

MiB = 1024 * 1024

FAST = """
[daemon]
sync_interval = 0.3
admission_interval = 0.3
discovery_interval = 3600
retry_backoff = 0.1
shutdown_deadline = 10
"""


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def connector_snapshots(vcsim: Any, uuid: str) -> list[str]:
    return [s for s in vcsim.snapshot_names(uuid) if s.startswith("connector-")]


def pause_and_settle(env: ConnectorEnv, job: str) -> None:
    """Stop the schedule and wait for the job's last run to end, so that no run is cut
    short by the daemon's shutdown (a cut-short run keeps its snapshot until the next
    start, when it resumes)."""
    app = App(load_config(env.config_file))
    try:
        app.jobs.update(app.jobs.find(job).id, paused=True)
    finally:
        app.close()
    wait_for(
        "the job's runs to end",
        lambda: all(r["state"] not in ("PENDING", "ACTIVE") for r in job_doc(env, job)["runs"]),
        timeout=120,
        every=0.3,
    )


def test_runs_fire_on_schedule_and_a_collision_is_missed(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    # One scheduling "hour" lasts 1 s; a full read of a 256 MiB disk (CBT off) lasts
    # longer, so some firings find the previous run still active.
    env = write_config(
        tmp_path / "c", vcsim, moto, s3_bucket, extra=FAST + "schedule_unit_seconds = 1\n"
    )
    uuid = vcsim.add_vm("sched-vm", [256 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.disable_disk_cbt(uuid, key)
    vcsim.write(uuid, key, 0, random.Random(1).randbytes(2 * MiB))
    created = env.cli_json("jobs", "create", "sched-vm", "--frequency", "1", "--retention", "3")
    assert created["state"] == "PENDING" and created["frequency_hours"] == 1
    daemon = start_daemon(env)
    try:
        daemon.wait_ready()

        def enough() -> list[dict[str, Any]] | None:
            runs = job_doc(env, "sched-vm")["runs"]
            states = [r["state"] for r in runs]
            done = states.count("COMPLETED") + states.count("DELETING")
            return runs if done >= 2 and states.count("MISSED") >= 1 else None

        wait_for("two completed runs and a missed one", enough, timeout=120, every=0.5)
        pause_and_settle(env, "sched-vm")
    finally:
        assert daemon.terminate() == 0, daemon.log()
    runs = job_doc(env, "sched-vm")["runs"]
    assert {r["type"] for r in runs} == {"AUTOMATIC"}
    missed = [r for r in runs if r["state"] == "MISSED"]
    assert all("still" in r["error"] and r["finished_at"] for r in missed)
    # firings are one "hour" apart (the first one is the seed's, right at start)
    starts = sorted(ts(r["started_at"]) for r in runs)
    gaps = [b - a for a, b in itertools.pairwise(starts[1:])]
    assert gaps and 0.7 <= statistics.median(gaps) <= 1.4, gaps
    # never two runs of the VM at once
    ran = sorted(
        (ts(r["started_at"]), ts(r["finished_at"]))
        for r in runs
        if r["state"] in ("COMPLETED", "DELETING", "FAILED")
    )
    assert all(prev[1] <= nxt[0] + 0.001 for prev, nxt in itertools.pairwise(ran))
    assert connector_snapshots(vcsim, uuid) == []


def test_five_failures_with_s3_unreachable_pause_the_job_and_resume_succeeds(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    proxy = TcpProxy("127.0.0.1", moto.port)
    env = write_config(
        tmp_path / "c",
        vcsim,
        moto,
        s3_bucket,
        s3={"endpoint_url": f"https://127.0.0.1:{proxy.port}"},
        extra=FAST + "schedule_unit_seconds = 1\nstage_retries = 1\nfailures_before_pause = 5\n",
    )
    uuid = vcsim.add_vm("s3-down-vm", [64 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.write(uuid, key, 4 * MiB, random.Random(2).randbytes(MiB))
    env.cli_json("jobs", "create", "s3-down-vm", "--frequency", "1")
    daemon = start_daemon(env)
    try:
        daemon.wait_ready()
        paused = wait_for(
            "the job to pause on failure",
            lambda: (d := job_doc(env, "s3-down-vm"))["state"] == "PAUSED_ON_FAILURE" and d,
            timeout=90,
            every=0.3,
        )
        assert paused["consecutive_failures"] == 5
        failed = [r for r in paused["runs"] if r["state"] == "FAILED"]
        assert len(failed) == 5
        for r in failed:
            assert "cannot reach the S3 endpoint" in r["error"] and "gave up" in r["error"]
        assert connector_snapshots(vcsim, uuid) == []  # refused before any snapshot
        time.sleep(2.5)  # a paused job does not fire: wait more than two "hours"
        assert len(job_doc(env, "s3-down-vm")["runs"]) == len(paused["runs"])

        proxy.up()
        resumed = env.cli_json("jobs", "resume", "s3-down-vm")
        assert resumed["state"] == "PENDING" and resumed["consecutive_failures"] == 0

        def completed() -> dict[str, Any] | None:
            d = job_doc(env, "s3-down-vm")
            return d if any(r["state"] == "COMPLETED" for r in d["runs"]) else None

        done = wait_for("a run after resume", completed, timeout=60, every=0.3)
        pause_and_settle(env, "s3-down-vm")
    finally:
        assert daemon.terminate() == 0, daemon.log()
        proxy.down()
    assert done["state"] == "ACTIVE" and done["consecutive_failures"] == 0
    assert job_doc(env, "s3-down-vm")["runs"][-1]["state"] != "FAILED"
    assert connector_snapshots(vcsim, uuid) == []


def test_sigterm_stops_at_a_safe_point_and_the_run_resumes(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = write_config(
        tmp_path / "c",
        vcsim,
        moto,
        s3_bucket,
        extra=FAST.replace("shutdown_deadline = 10", "shutdown_deadline = 20")
        + "[transport]\nmax_request = 1048576\n",
    )
    uuid = vcsim.add_vm("sigterm-vm", [1024 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.disable_disk_cbt(uuid, key)  # a full read: long enough to be stopped halfway
    vcsim.write(uuid, key, 100 * MiB, random.Random(3).randbytes(MiB))
    env.cli_json("jobs", "create", "sigterm-vm", "--run-once")
    daemon = start_daemon(env, watchdog_usec=1_000_000)
    try:
        daemon.wait_ready()

        def transferring() -> bool:
            runs = job_doc(env, "sigterm-vm")["runs"]
            p = runs[0]["progress"] if runs else None
            return bool(p and runs[0]["stage"] == "transfer" and p["done"] > 0)

        wait_for("the transfer to be under way", transferring, timeout=60, every=0.05)
        started = time.monotonic()
        code = daemon.terminate(timeout=60)
        took = time.monotonic() - started
    finally:
        daemon.kill()
    assert code == 0, daemon.log()
    assert took < 20, f"shutdown took {took:.1f} s"
    notes = daemon.read_notifications()
    assert "READY=1" in notes and "WATCHDOG=1" in notes and "STOPPING=1" in notes
    assert any(n.startswith("STATUS=") for n in notes)
    assert "stage interrupted by shutdown" in daemon.log()
    (run,) = job_doc(env, "sigterm-vm")["runs"]
    assert run["state"] == "ACTIVE" and run["stage"] == "transfer"

    again = start_daemon(env, "again")
    try:
        again.wait_ready()
        # a second daemon on the same state is refused, and so is a one-shot replicate
        second = subprocess.run(
            [sys.executable, "-m", "connector", "run"],
            env=dict(os.environ, CONNECTOR_CONFIG=str(env.config_file)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1 and "another connector process" in second.stderr
        replicate = env.cli("replicate", "sigterm-vm")
        assert replicate.returncode == 1 and "connector jobs start" in replicate.stderr
        wait_for(
            "the resumed run to complete",
            lambda: job_doc(env, "sigterm-vm")["runs"][0]["state"] == "COMPLETED",
            timeout=180,
            every=0.3,
        )
    finally:
        assert again.terminate() == 0, again.log()
    assert "1 run(s) resumed" in again.log()
    assert connector_snapshots(vcsim, uuid) == []


def test_bandwidth_limit_of_8_mib_per_second_paces_a_64_mib_upload(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = write_config(
        tmp_path / "c", vcsim, moto, s3_bucket, extra="[daemon]\nbandwidth_limit = 8388608\n"
    )
    app = App(load_config(env.config_file))
    try:
        store = app.store_objects
        data = os.urandom(64 * MiB)
        started = time.monotonic()
        store.put("bandwidth-test", data)
        took = time.monotonic() - started
        assert store.stat("bandwidth-test") == 64 * MiB
    finally:
        app.close()
    assert took >= 7.0, f"64 MiB at 8 MiB/s took only {took:.1f} s"
    assert took < 120


# -- the CLI: bad input is refused clearly and changes nothing ---------------------------


@pytest.fixture
def cli_env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> tuple[ConnectorEnv, str]:
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket, extra=FAST)
    name = f"cli-vm-{os.urandom(3).hex()}"
    vcsim.add_vm(name, [64 * MiB])
    return env, name


def snapshot_state(env: ConnectorEnv) -> Any:
    app = App(load_config(env.config_file))
    try:
        jobs = [
            (j.id, j.state, j.paused, j.frequency_hours, j.retention, j.seed_time)
            for j in app.jobs.all(True)
        ]
        runs = [(r.id, r.state) for r in app.state.runs()]
        return jobs, runs
    finally:
        app.close()


def test_jobs_cli_lifecycle(cli_env: tuple[ConnectorEnv, str]) -> None:
    env, vm = cli_env
    seed = (dt.datetime.now(dt.UTC) + dt.timedelta(days=20)).strftime("%Y-%m-%dT02:00:00Z")
    job = env.cli_json("jobs", "create", vm, "-f", "12", "--seed", seed, "-d", "web tier")
    assert job["vm_name"] == vm and job["next_run"] == seed
    assert job["state"] == "PENDING" and job["description"] == "web tier"
    listed = env.cli_json("jobs", "list")
    assert [j["id"] for j in listed] == [job["id"]]
    table = env.cli("jobs", "list", check=True).stdout
    assert job["id"] in table and "12 h" in table and "web tier" in table
    updated = env.cli_json("jobs", "update", job["id"], "--frequency", "24", "--retention", "3")
    assert updated["frequency_hours"] == 24 and updated["retention"] == 3
    assert env.cli_json("jobs", "pause", vm)["paused"] is True
    assert env.cli_json("jobs", "resume", vm)["paused"] is False
    started = env.cli_json("jobs", "start", vm)
    assert started["state"] == "PENDING"
    shown = env.cli_json("jobs", "show", vm)
    assert [(r["id"], r["type"], r["state"]) for r in shown["runs"]] == [
        (started["run_id"], "ON_DEMAND", "PENDING")
    ]
    assert "ON_DEMAND" in env.cli("jobs", "show", vm, check=True).stdout
    busy = env.cli("jobs", "start", vm)  # one is pending already
    assert busy.returncode == 2 and "already pending or active" in busy.stderr
    deleting = env.cli_json("jobs", "delete", vm)
    assert deleting["state"] == "DELETING"  # waits for its pending run
    assert [r["state"] for r in env.cli_json("runs", vm)] == ["PENDING"]
    again = env.cli("jobs", "create", vm, "-f", "1")
    assert again.returncode == 2 and "already has job" in again.stderr


RANGE = "is out of range: give a time from"


def test_bad_input_is_refused_and_changes_nothing(cli_env: tuple[ConnectorEnv, str]) -> None:
    env, vm = cli_env
    cases: list[tuple[tuple[str, ...], int, str]] = [
        (("jobs", "create", "no-such-vm", "-f", "1"), 1, "no VM named"),
        (("jobs", "create", vm, "-f", "0"), 2, "frequency 0 is out of range"),
        (("jobs", "create", vm, "-f", "25"), 2, "frequency 25 is out of range"),
        (("jobs", "create", vm), 2, "--frequency HOURS (1 to 24), or --run-once"),
        (("jobs", "create", vm, "-f", "2", "--run-once"), 2, "not both"),
        (("jobs", "create", vm, "-f", "2", "--seed", "soon"), 2, "not an ISO 8601 time"),
        (("jobs", "create", vm, "-f", "1", "--seed", "0001-01-01T00:00:00Z"), 2, RANGE),
        (("jobs", "create", vm, "-f", "1", "--seed", "1969-12-31T23:00:00Z"), 2, RANGE),
        (("jobs", "create", vm, "-f", "1", "--seed", "2099-01-01T00:00:00Z"), 2, RANGE),
        (("jobs", "create", vm, "-f", "2", "-r", "-1"), 2, "retention -1 is out of range"),
    ]
    for args, code, message in cases:
        before = snapshot_state(env)
        proc = env.cli(*args)
        assert proc.returncode == code, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert snapshot_state(env) == before
    env.cli_json("jobs", "create", vm, "-f", "6")
    cases = [
        (("jobs", "show", "j-000000000000"), 1, "no job 'j-000000000000'"),
        (("jobs", "update", "nope", "-f", "2"), 1, "no job 'nope'"),
        (("jobs", "update", vm, "-f", "25"), 2, "frequency 25 is out of range"),
        (("jobs", "update", vm, "-f", "0"), 2, "frequency 0 is out of range"),
        (("jobs", "update", vm, "--seed", "0001-01-01T00:00:00Z"), 2, RANGE),
        (("jobs", "update", vm), 2, "nothing to change"),
        (("jobs", "start", "nope"), 1, "no job 'nope'"),
        (("jobs", "pause", "nope"), 1, "no job 'nope'"),
        (("jobs", "resume", "nope"), 1, "no job 'nope'"),
        (("jobs", "delete", "nope"), 1, "no job 'nope'"),
    ]
    for args, code, message in cases:
        before = snapshot_state(env)
        proc = env.cli(*args)
        assert proc.returncode == code, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert snapshot_state(env) == before


def test_a_stored_job_with_a_bad_seed_is_reported_and_skipped_and_the_others_run(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket, extra=FAST)
    uuid = vcsim.add_vm("good-job-vm", [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.write(uuid, key, MiB, random.Random(9).randbytes(MiB))
    vcsim.add_vm("bad-job-vm", [16 * MiB])
    bad = env.cli_json("jobs", "create", "bad-job-vm", "-f", "1")["id"]
    # The row an older version stored for `--seed 0001-01-01T00:00:00Z`.
    with sqlite3.connect(env.workdir / "state" / "state.db") as db:
        db.execute("UPDATE jobs SET seed_time = '1-01-01T00:00:00Z' WHERE id = ?", (bad,))
    db.close()
    good = env.cli_json("jobs", "create", "good-job-vm", "--run-once")["id"]
    warning = (
        f"warning: job {bad} is not scheduled: its stored seed time '1-01-01T00:00:00Z' is "
        f"not a valid time; fix it with `connector jobs update {bad} --seed now`"
    )

    listed = env.cli("jobs", "list")
    assert listed.returncode == 0, listed.stderr
    assert bad in listed.stdout and good in listed.stdout and "invalid" in listed.stdout
    assert warning in listed.stderr and "Traceback" not in listed.stderr
    shown = env.cli("jobs", "show", bad)
    assert shown.returncode == 0, shown.stderr
    assert f"job {bad}: VM bad-job-vm" in shown.stdout
    assert warning in shown.stderr and "Traceback" not in shown.stderr
    doc = env.cli_json("jobs", "show", bad)
    assert doc["next_run"] is None and "not a valid time" in doc["problem"]

    daemon = start_daemon(env)
    try:
        daemon.wait_ready()
        done = wait_for(
            "the good job's run to complete",
            lambda: [r for r in job_doc(env, good)["runs"] if r["state"] == "COMPLETED"],
            timeout=120,
            every=0.3,
        )
        assert len(done) == 1
        assert job_doc(env, bad)["runs"] == []
    finally:
        assert daemon.terminate() == 0, daemon.log()
    log = daemon.log()
    assert "job not scheduled" in log and bad in log and "not a valid time" in log
    assert "Traceback" not in log
    assert connector_snapshots(vcsim, uuid) == []

    fixed = env.cli("jobs", "update", bad, "--seed", "now", "--json")
    assert fixed.returncode == 0 and json.loads(fixed.stdout)["problem"] is None
    assert "warning" not in fixed.stderr


def test_on_demand_quota(cli_env: tuple[ConnectorEnv, str]) -> None:
    from connector.domain.jobs import ON_DEMAND, RUN_COMPLETED, RUN_PENDING

    env, vm = cli_env
    job = env.cli_json("jobs", "create", vm, "-f", "6")
    app = App(load_config(env.config_file))
    try:  # two on-demand runs in the last 24 hours, both over
        for n in range(2):
            run_id = f"r-quota-{n}"
            app.jobs.create_run(run_id, app.jobs.get(job["id"]), ON_DEMAND, RUN_PENDING)
            app.jobs.mark_run(run_id, RUN_COMPLETED, None)
    finally:
        app.close()
    before = snapshot_state(env)
    proc = env.cli("jobs", "start", vm)
    assert proc.returncode == 2 and "on-demand quota is used up (2 of 2" in proc.stderr
    assert snapshot_state(env) == before


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("[daemon]\nmax_concurrent_runs = 0\n", "daemon.max_concurrent_runs"),
        ("[daemon]\nsweep_interval = 0\n", "daemon.sweep_interval"),
        ("[daemon]\nstale_upload_age = -1\n", "daemon.stale_upload_age"),
        ("[daemon]\nretention_retry_backoff = 0\n", "daemon.retention_retry_backoff"),
        ("[daemon]\nbandwidth_windows = [{start = '25:00', end = '06:00', limit = 1}]\n", "start"),
        ("[daemon]\nno_such_setting = 1\n", "no_such_setting"),
        ("[daemon\n", "not valid TOML"),
    ],
)
def test_malformed_daemon_config_is_refused(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str, section: str, message: str
) -> None:
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket, extra=section)
    for args in (("jobs", "list"), ("run",)):
        proc = env.cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c" / "state").exists()


def test_sigkill_test_hook_is_inert_without_the_variable() -> None:
    # The hook is compiled in; a run without the variable must never die by it.
    proc = subprocess.run(
        [sys.executable, "-c", "from connector.faults import crash_point; crash_point('changes')"],
        env={k: v for k, v in os.environ.items() if k != "CONNECTOR_TEST_CRASH_AT"},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    killed = subprocess.run(
        [sys.executable, "-c", "from connector.faults import crash_point; crash_point('changes')"],
        env=dict(os.environ, CONNECTOR_TEST_CRASH_AT="changes:1"),
        timeout=60,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL


def test_discovery_keeps_the_catalog_current_while_the_daemon_runs(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = write_config(
        tmp_path / "c",
        vcsim,
        moto,
        s3_bucket,
        extra=FAST.replace("discovery_interval = 3600", "discovery_interval = 1"),
    )
    daemon = start_daemon(env)
    try:
        daemon.wait_ready()
        name = f"disc-{os.urandom(3).hex()}"
        uuid = vcsim.add_vm(name, [64 * MiB], cbt=False)

        def catalog() -> dict[str, Any] | None:
            app = App(load_config(env.config_file))
            try:
                rows = app.state.find_servers(uuid)
            finally:
                app.close()
            return rows[0].__dict__ if rows else None

        row = wait_for("the new VM in the catalog", catalog, timeout=90, every=0.5)
        assert row["name"] == name and row["cbt_enabled"] is False
        app = App(load_config(env.config_file))
        try:
            app.vsphere.enable_cbt(uuid)
        finally:
            app.close()
        wait_for(
            "the catalog to show CBT on",
            lambda: (r := catalog()) is not None and r["cbt_enabled"] is True,
            timeout=90,
            every=0.5,
        )
    finally:
        assert daemon.terminate() == 0, daemon.log()
    assert "new VM in the inventory" in daemon.log()
