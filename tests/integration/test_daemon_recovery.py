"""Crash safety: `connector run` killed with SIGKILL at named points of a run, then restarted.

Each scenario kills a daemon (CONNECTOR_TEST_CRASH_AT, see connector/faults.py)
in the middle of a run of a two-disk VM, starts it again, and checks that the
run ends (COMPLETED, resumed where it stopped, or FAILED with a reason when it
is rolled back), that the VM carries no `connector-*` snapshot, that S3 holds
no unfinished multipart upload, and that every COMPLETED run restores
byte-exact.

The scenarios are independent (one VM, state folder and bucket each), so they
run side by side: every daemon is killed, then every daemon is restarted, and
the per-point tests check what each one left.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from connector.app import App
from connector.config import load_config
from connector.domain.jobs import ON_DEMAND, RUN_PENDING, make_spec
from connector.pipeline.replicate import new_run_id
from connector.pipeline.restore import restore_disk
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.daemon import DaemonProcess, job_doc, start_daemon, wait_for
from tests.harness.fixtures_s3 import _remove_bucket

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
    "block-read",
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


@dataclass
class Scenario:
    name: str
    point: str
    env: ConnectorEnv
    vm_uuid: str
    shas: dict[int, str]
    extra_env: dict[str, str] = field(default_factory=dict)
    crashed: DaemonProcess | None = None
    restarted: DaemonProcess | None = None
    killed_error: str | None = None
    left_snapshot: bool = False
    left_upload: bool = False
    run_after_crash: dict[str, Any] | None = None
    run: dict[str, Any] | None = None
    job: dict[str, Any] | None = None
    snapshots: list[str] = field(default_factory=list)
    uploads: list[Any] = field(default_factory=list)
    exit_code: int | None = None
    log: str = ""


def make_env(workdir: Path, vcsim: Any, moto: Any, bucket: str, extra: str = "") -> ConnectorEnv:
    return write_config(
        workdir,
        vcsim,
        moto,
        bucket,
        s3={"multipart_threshold": 5 * MiB, "multipart_part_size": 5 * MiB},
        extra=DAEMON + extra,
    )


def make_vm(vcsim: Any, name: str, seed: int) -> tuple[str, dict[int, str]]:
    rng = random.Random(seed)
    uuid = vcsim.add_vm(name, [32 * MiB, 32 * MiB])
    first, second = vcsim.disk_keys(uuid)
    vcsim.write(uuid, first, 1 * MiB, rng.randbytes(7 * MiB))
    vcsim.write(uuid, second, 20 * MiB, rng.randbytes(1 * MiB))
    return uuid, disk_shas(vcsim, uuid)


def disk_shas(vcsim: Any, uuid: str) -> dict[int, str]:
    return {k: hashlib.sha256(vcsim.read_disk(uuid, k)).hexdigest() for k in vcsim.disk_keys(uuid)}


def create_job(env: ConnectorEnv, vm_uuid: str, frequency: int | None = None) -> str:
    """The job, made in-process (the CLI's own tests cover `connector jobs create`)."""
    app = App(load_config(env.config_file))
    try:
        server = app.state.upsert_server(app.vsphere.get_vm(vm_uuid))
        spec = make_spec(dt.datetime.now(dt.UTC), frequency, 5, "crash test")
        return app.jobs.create(server.id, spec).id
    finally:
        app.close()


def connector_snapshots(vcsim: Any, uuid: str) -> list[str]:
    return [s for s in vcsim.snapshot_names(uuid) if s.startswith("connector-")]


def open_uploads(moto: Any, bucket: str) -> list[Any]:
    uploads: list[Any] = (
        moto.boto3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    )
    return uploads


def runs_ended(env: ConnectorEnv, job: str, count: int = 1) -> list[dict[str, Any]] | None:
    runs: list[dict[str, Any]] = job_doc(env, job)["runs"]
    done = [r for r in runs if r["state"] in ("COMPLETED", "FAILED")]
    return runs if len(done) >= count and len(done) == len(runs) else None


def assert_restores(env: ConnectorEnv, tmp_path: Path, run: dict[str, Any], shas: dict[int, str]):
    app = App(load_config(env.config_file))
    try:
        repo = app.repository()
        for key, expected in shas.items():
            out = tmp_path / f"restore-{run['id']}-{key}.img"
            result = restore_disk(repo, run["server_id"], run["id"], key, out)
            assert result.sha256 == expected, f"disk {key} of run {run['id']} differs"
            out.unlink()
    finally:
        app.close()


@pytest.fixture(scope="module")
def crashes(
    vcsim: Any, moto: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Scenario]]:
    """Every scenario, crashed and restarted side by side; the tests read the outcome."""
    s3 = moto.boto3_client()
    scenarios: dict[str, Scenario] = {}
    plan = [(p, p, "") for p in CRASH_POINTS] + [
        ("rollback", "multipart-part", "resume_within = 0\n")
    ]
    buckets = []
    try:
        for n, (name, point, extra) in enumerate(plan):
            bucket = f"t-{uuidlib.uuid4().hex[:20]}"
            s3.create_bucket(
                Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": moto.region}
            )
            buckets.append(bucket)
            env = make_env(tmp_path_factory.mktemp(name), vcsim, moto, bucket, extra)
            vm_uuid, shas = make_vm(vcsim, f"crash-{name}-{uuidlib.uuid4().hex[:6]}", seed=n)
            create_job(env, vm_uuid)
            scenarios[name] = Scenario(
                name, point, env, vm_uuid, shas, {"CONNECTOR_TEST_CRASH_AT": f"{point}:1"}
            )
        for sc in scenarios.values():
            sc.crashed = start_daemon(sc.env, "crashed", extra_env=sc.extra_env)
        for sc in scenarios.values():
            assert sc.crashed is not None
            try:
                sc.crashed.wait_killed(timeout=180)
            except AssertionError as exc:
                sc.killed_error = str(exc)
                continue
            sc.left_snapshot = bool(connector_snapshots(vcsim, sc.vm_uuid))
            sc.left_upload = bool(open_uploads(moto, sc.env.bucket))
            sc.run_after_crash = job_doc(sc.env, sc.vm_uuid)["runs"][0]
        for sc in scenarios.values():
            if sc.killed_error is None:
                sc.restarted = start_daemon(sc.env, "restarted")
        for sc in scenarios.values():
            if sc.restarted is None:
                continue
            try:
                sc.restarted.wait_ready(timeout=120)
                runs = wait_for(
                    f"the run of {sc.name} to end",
                    lambda sc=sc: runs_ended(sc.env, sc.vm_uuid),  # type: ignore[misc]
                    timeout=180,
                    every=0.2,
                )
                sc.run = runs[0]
            except AssertionError as exc:
                sc.killed_error = f"after restart: {exc}"
        for sc in scenarios.values():
            if sc.restarted is not None:
                sc.exit_code = sc.restarted.terminate()
                sc.log = sc.restarted.log()
                sc.job = job_doc(sc.env, sc.vm_uuid)
            sc.snapshots = connector_snapshots(vcsim, sc.vm_uuid)
            sc.uploads = open_uploads(moto, sc.env.bucket)
        yield scenarios
    finally:
        for sc in scenarios.values():
            for d in (sc.crashed, sc.restarted):
                if d is not None:
                    d.kill()
        for bucket in buckets:
            _remove_bucket(s3, bucket)


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_a_named_point_then_restart(
    point: str, crashes: dict[str, Scenario], tmp_path: Path
) -> None:
    sc = crashes[point]
    assert sc.killed_error is None, sc.killed_error
    assert sc.run_after_crash is not None and sc.run_after_crash["state"] == "ACTIVE"
    assert sc.exit_code == 0, sc.log
    assert sc.run is not None
    assert sc.run["state"] == "COMPLETED", sc.run["error"]
    assert "1 run(s) resumed" in sc.log
    assert sc.snapshots == []
    assert sc.uploads == []
    assert_restores(sc.env, tmp_path, sc.run, sc.shas)


def test_multipart_and_snapshot_are_really_left_by_the_kill(crashes: dict[str, Scenario]) -> None:
    # The kill leaves what recovery then cleans: proof that the points bite.
    assert crashes["multipart-part"].left_upload
    assert crashes["multipart-created"].left_upload
    assert crashes["snapshot-created"].left_snapshot
    assert crashes["snapshot-remove"].left_snapshot
    assert not crashes["snapshot-create"].left_snapshot


def test_an_interrupted_run_too_old_to_resume_is_rolled_back_with_a_reason(
    crashes: dict[str, Scenario],
) -> None:
    sc = crashes["rollback"]
    assert sc.killed_error is None, sc.killed_error
    assert sc.left_snapshot and sc.left_upload
    assert sc.exit_code == 0, sc.log
    assert sc.run is not None and sc.run["state"] == "FAILED"
    assert "interrupted" in sc.run["error"] and "rolled back" in sc.run["error"]
    assert sc.snapshots == [] and sc.uploads == []
    assert sc.job is not None
    assert sc.job["state"] == "FAILED" and "interrupted" in sc.job["message"]


def test_crash_during_an_incremental_run_resumes_and_both_runs_restore(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = make_env(tmp_path / "c", vcsim, moto, s3_bucket)
    uuid, first_shas = make_vm(vcsim, "crash-incremental", seed=7)
    first, _second = vcsim.disk_keys(uuid)
    job_id = create_job(env, uuid)
    daemon = start_daemon(env, "first")
    try:
        daemon.wait_ready()
        (run1,) = wait_for("the first run", lambda: runs_ended(env, job_id), timeout=120)
    finally:
        assert daemon.terminate() == 0
    assert run1["state"] == "COMPLETED"

    vcsim.write(uuid, first, 20 * MiB, random.Random(8).randbytes(6 * MiB))
    second_shas = disk_shas(vcsim, uuid)
    app = App(load_config(env.config_file))
    try:  # an on-demand run waits in the durable queue until the daemon starts
        from connector.daemon.queue import RunQueue

        run_id = new_run_id()
        app.jobs.create_run(run_id, app.jobs.get(job_id), ON_DEMAND, RUN_PENDING)
        queue = RunQueue(app.queue_path)
        queue.enqueue(run_id, 0)
        queue.close()
    finally:
        app.close()
    crash = {"CONNECTOR_TEST_CRASH_AT": "before-manifest:1"}
    start_daemon(env, "crashed", extra_env=crash).wait_killed()
    daemon = start_daemon(env, "restarted")
    try:
        daemon.wait_ready()
        runs = wait_for("the second run", lambda: runs_ended(env, job_id, 2), timeout=120)
    finally:
        assert daemon.terminate() == 0
    run2 = runs[-1]
    assert run2["id"] == run_id and run2["type"] == "ON_DEMAND"
    assert run2["state"] == "COMPLETED", run2["error"]
    assert {d["mode"] for d in run2["disks"]} == {"incremental"}
    assert connector_snapshots(vcsim, uuid) == []
    assert open_uploads(moto, s3_bucket) == []
    assert_restores(env, tmp_path, run1, first_shas)
    assert_restores(env, tmp_path, run2, second_shas)
