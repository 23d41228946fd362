"""Crash safety: `connector run` killed with SIGKILL at named points of a run, then restarted.

Each case kills the daemon (CONNECTOR_TEST_CRASH_AT, see connector/faults.py) in
the middle of a run of a two-disk VM, starts it again, and checks that the run
ends (COMPLETED, resumed where it stopped, or FAILED with a reason when it is
rolled back), that the VM carries no `connector-*` snapshot, that S3 holds no
unfinished multipart upload, and that every COMPLETED run restores byte-exact.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

from connector.app import App
from connector.config import load_config
from connector.pipeline.restore import restore_disk
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.daemon import job_doc, start_daemon, wait_for

pytestmark = pytest.mark.integration

MiB = 1024 * 1024

DAEMON = """
[daemon]
sync_interval = 0.3
admission_interval = 0.3
max_disks_per_vm = 1
stage_retries = 2
retry_backoff = 0.2
discovery_interval = 3600
shutdown_deadline = 5
"""

# Every named point, in the order a run reaches it; multipart ones need a pack
# above the 5 MiB multipart threshold (disk 1 holds 7 MiB of random data).
CRASH_POINTS = [
    "snapshot-create",
    "snapshot-created",
    "changes",
    "multipart-created",
    "multipart-part",
    "pack-uploaded",
    "before-manifest",
    "manifest-written",
    "before-commit",
    "after-commit",
    "snapshot-remove",
    "snapshot-removed",
]


def make_env(tmp_path: Path, vcsim: Any, moto: Any, bucket: str, extra: str = "") -> ConnectorEnv:
    return write_config(
        tmp_path / "c",
        vcsim,
        moto,
        bucket,
        s3={"multipart_threshold": 5 * MiB, "multipart_part_size": 5 * MiB},
        extra=DAEMON + extra,
    )


def make_vm(vcsim: Any, name: str, seed: int) -> tuple[str, dict[int, str]]:
    rng = random.Random(seed)
    uuid = vcsim.add_vm(name, [64 * MiB, 64 * MiB])
    first, second = vcsim.disk_keys(uuid)
    vcsim.write(uuid, first, 1 * MiB, rng.randbytes(7 * MiB))
    vcsim.write(uuid, second, 20 * MiB, rng.randbytes(1 * MiB))
    return uuid, disk_shas(vcsim, uuid)


def disk_shas(vcsim: Any, uuid: str) -> dict[int, str]:
    return {k: hashlib.sha256(vcsim.read_disk(uuid, k)).hexdigest() for k in vcsim.disk_keys(uuid)}


def connector_snapshots(vcsim: Any, uuid: str) -> list[str]:
    return [s for s in vcsim.snapshot_names(uuid) if s.startswith("connector-")]


def open_uploads(moto: Any, bucket: str) -> list[Any]:
    uploads: list[Any] = (
        moto.boto3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    )
    return uploads


def job_runs(env: ConnectorEnv, vm: str) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = job_doc(env, vm)["runs"]
    return runs


def wait_run_ended(env: ConnectorEnv, vm: str, count: int = 1) -> list[dict[str, Any]]:
    def ended() -> list[dict[str, Any]] | None:
        runs = job_runs(env, vm)
        done = [r for r in runs if r["state"] in ("COMPLETED", "FAILED")]
        return runs if len(done) >= count and len(done) == len(runs) else None

    return wait_for(f"the runs of {vm} to end", ended, timeout=120, every=0.1)


def assert_restores(env: ConnectorEnv, tmp_path: Path, run: dict[str, Any], shas: dict[int, str]):
    app = App(load_config(env.config_file))
    try:
        repo = app.repository()
        for key, expected in shas.items():
            out = tmp_path / f"restore-{run['id']}-{key}.img"
            result = restore_disk(repo, run["server_id"], run["id"], key, out)
            assert result.sha256 == expected, f"disk {key} of run {run['id']} differs"
    finally:
        app.close()


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_a_named_point_then_restart(
    point: str, tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = make_env(tmp_path, vcsim, moto, s3_bucket)
    name = f"crash-{point}"
    uuid, shas = make_vm(vcsim, name, seed=len(point))
    env.cli_json("jobs", "create", name, "--run-once")

    crashed = start_daemon(env, "crashed", extra_env={"CONNECTOR_TEST_CRASH_AT": f"{point}:1"})
    crashed.wait_killed()
    (run,) = job_runs(env, name)
    assert run["state"] == "ACTIVE", "the killed process left its run ACTIVE"

    daemon = start_daemon(env, "restarted")
    try:
        daemon.wait_ready()
        (run,) = wait_run_ended(env, name)
    finally:
        assert daemon.terminate() == 0, daemon.log()
    assert run["state"] == "COMPLETED", run["error"]
    assert connector_snapshots(vcsim, uuid) == []
    assert open_uploads(moto, s3_bucket) == []
    assert "1 run(s) resumed" in daemon.log()
    assert_restores(env, tmp_path, run, shas)


def test_an_interrupted_run_too_old_to_resume_is_rolled_back_with_a_reason(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = make_env(tmp_path, vcsim, moto, s3_bucket, extra="resume_within = 0\n")
    uuid, _ = make_vm(vcsim, "crash-rollback", seed=1)
    env.cli_json("jobs", "create", "crash-rollback", "--run-once")
    crashed = start_daemon(
        env, "crashed", extra_env={"CONNECTOR_TEST_CRASH_AT": "multipart-part:1"}
    )
    crashed.wait_killed()
    assert connector_snapshots(vcsim, uuid), "the killed run left its snapshot"
    assert open_uploads(moto, s3_bucket), "the killed run left its multipart upload"

    daemon = start_daemon(env, "restarted")
    try:
        daemon.wait_ready()
        (run,) = wait_run_ended(env, "crash-rollback")
    finally:
        assert daemon.terminate() == 0, daemon.log()
    assert run["state"] == "FAILED"
    assert "interrupted" in run["error"] and "rolled back" in run["error"]
    assert connector_snapshots(vcsim, uuid) == []
    assert open_uploads(moto, s3_bucket) == []
    job = job_doc(env, "crash-rollback")
    assert job["state"] == "FAILED" and "interrupted" in job["message"]


def test_crash_during_an_incremental_run_resumes_and_both_runs_restore(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = make_env(tmp_path, vcsim, moto, s3_bucket, extra="on_demand_quota_per_24h = 5\n")
    uuid, first_shas = make_vm(vcsim, "crash-incremental", seed=7)
    first, _second = vcsim.disk_keys(uuid)
    env.cli_json("jobs", "create", "crash-incremental", "--run-once")
    daemon = start_daemon(env, "first")
    try:
        daemon.wait_ready()
        (run1,) = wait_run_ended(env, "crash-incremental")
    finally:
        assert daemon.terminate() == 0
    assert run1["state"] == "COMPLETED"

    vcsim.write(uuid, first, 40 * MiB, random.Random(8).randbytes(6 * MiB))
    second_shas = disk_shas(vcsim, uuid)
    env.cli_json("jobs", "start", "crash-incremental")
    crashed = start_daemon(
        env, "crashed", extra_env={"CONNECTOR_TEST_CRASH_AT": "before-manifest:1"}
    )
    crashed.wait_killed()
    daemon = start_daemon(env, "restarted")
    try:
        daemon.wait_ready()
        runs = wait_run_ended(env, "crash-incremental", count=2)
    finally:
        assert daemon.terminate() == 0
    run2 = runs[-1]
    assert run2["state"] == "COMPLETED", run2["error"]
    assert {d["mode"] for d in run2["disks"]} == {"incremental"}
    assert connector_snapshots(vcsim, uuid) == []
    assert open_uploads(moto, s3_bucket) == []
    assert_restores(env, tmp_path, run1, first_shas)
    assert_restores(env, tmp_path, run2, second_shas)
