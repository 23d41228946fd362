"""`connector status` as a process against the simulator and moto_server: HEALTHY
with a running daemon and a job whose runs completed, and UNHEALTHY (exit 1) with
S3 unreachable, with vCenter refusing the login, and with the daemon stopped."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.daemon import job_doc, start_daemon, wait_for

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


def status(env: ConnectorEnv) -> tuple[int, dict[str, Any]]:
    proc = env.cli("status", "--json")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def completed(env: ConnectorEnv, job: str, run_id: str | None = None) -> dict[str, Any] | None:
    """The job's run `run_id` (or its first run) once it is COMPLETED."""
    runs = job_doc(env, job)["runs"]
    run = next((r for r in runs if run_id is None or r["id"] == run_id), None)
    if run is not None and run["state"] == "FAILED":
        raise AssertionError(f"run {run['id']} failed: {run['error']}")
    return run if run is not None and run["state"] == "COMPLETED" else None


def test_healthy_after_completed_runs_then_unhealthy_once_the_daemon_stops(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket, extra=FAST)
    uuid = vcsim.add_vm("status-vm", [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.write(uuid, key, 0, random.Random(3).randbytes(MiB))
    job = env.cli_json("jobs", "create", "status-vm", "--frequency", "24")["id"]
    daemon = start_daemon(env)
    try:
        daemon.wait_ready()
        wait_for("the scheduled run to complete", lambda: completed(env, job), timeout=120)
        vcsim.write(uuid, key, 4 * MiB, random.Random(4).randbytes(MiB))
        on_demand = env.cli_json("jobs", "start", job)["run_id"]
        wait_for(
            "the on-demand run to complete", lambda: completed(env, job, on_demand), timeout=120
        )
        code, doc = status(env)
        assert code == 0, doc
        assert doc["status"] == "HEALTHY" and doc["healthy"] is True and doc["reasons"] == []
        assert doc["version"] and doc["daemon"]["running"] is True
        assert doc["vcenter"]["reachable"] is True and doc["s3"]["reachable"] is True
        (j,) = doc["jobs"]
        assert j["id"] == job and j["vm_name"] == "status-vm" and j["state"] == "ACTIVE"
        assert j["last_run"]["id"] == on_demand and j["last_run"]["state"] == "COMPLETED"
        assert j["last_run"]["finished_at"]
        assert j["last_completed_run"]["id"] == on_demand
        assert j["last_completed_run"]["bytes_uploaded"] > 0
        assert 0 <= j["lag_seconds"] < 120
        assert (j["on_demand_quota"], j["on_demand_used"], j["on_demand_left"]) == (2, 1, 1)
        assert j["next_run"]  # the schedule's next firing, a day after the seed
        table = env.cli("status")
        assert table.returncode == 0
        assert "HEALTHY" in table.stdout and job in table.stdout and on_demand in table.stdout
        assert "1 of 2 left" in table.stdout
    finally:
        assert daemon.terminate() == 0, daemon.log()
    code, doc = status(env)
    assert code == 1 and doc["status"] == "UNHEALTHY" and doc["daemon"]["running"] is False
    assert doc["reasons"] == [
        f"the daemon (`connector run`) is not running; 1 job(s) wait for it: {job}"
    ]


def test_s3_unreachable_is_unhealthy_and_named(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    from tests.harness.moto import free_port

    port = free_port()
    env = write_config(
        tmp_path / "c", vcsim, moto, s3_bucket, s3={"endpoint_url": f"https://127.0.0.1:{port}"}
    )
    code, doc = status(env)
    assert code == 1 and doc["status"] == "UNHEALTHY"
    assert doc["vcenter"]["reachable"] is True and doc["s3"]["reachable"] is False
    (reason,) = doc["reasons"]  # no job: the stopped daemon is no fault
    assert reason.startswith("S3 ") and f"127.0.0.1:{port}" in reason
    assert "cannot reach the S3 endpoint" in doc["s3"]["error"]
    assert doc["daemon"]["running"] is False and doc["jobs"] == []
    table = env.cli("status")
    assert table.returncode == 1
    assert "UNHEALTHY" in table.stdout and "S3" in table.stdout and "unreachable" in table.stdout


def test_vcenter_refusing_the_password_is_unhealthy_and_named(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    bad = tmp_path / "bad-password"
    bad.write_text("not-the-password-xyzzy\n")
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket, vcenter={"password_file": str(bad)})
    proc = env.cli("status")
    assert proc.returncode == 1
    assert "UNHEALTHY" in proc.stdout and "vCenter" in proc.stdout
    assert "xyzzy" not in proc.stdout + proc.stderr
    code, doc = status(env)
    assert code == 1 and doc["s3"]["reachable"] is True
    (reason,) = doc["reasons"]
    assert reason.startswith("vCenter at ") and "user name or password" in reason


def test_a_config_error_exits_2(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> None:
    missing = tmp_path / "no-such-password-file"
    env = write_config(
        tmp_path / "c", vcsim, moto, s3_bucket, vcenter={"password_file": str(missing)}
    )
    proc = env.cli("status")
    assert proc.returncode == 2, proc.stderr
    assert str(missing) in proc.stderr and proc.stdout == ""
