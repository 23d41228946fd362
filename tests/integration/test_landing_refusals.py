"""What `connector land` refuses or fails with, as a user meets it (exit status and the
message of docs/troubleshooting.md), and that landing the run again afterwards lands
it exactly: a run of another VM, a run that is not COMPLETED, a run whose AMI AMI
retention removed, a snapshot AWS ends in `error`, and one not completed in time."""

from __future__ import annotations

import os
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import write_config
from tests.harness.fixtures_landing import LandingMoto
from tests.harness.landing_env import LandingEnv, MiB, make_env, read_snapshot
from tests.harness.motoext import SNAPSHOT_FAILURE
from tests.integration.test_landing_e2e import cli, landing_of, ok_json

pytestmark = pytest.mark.integration


def message(proc: object) -> str:
    return " ".join(proc.stderr.split())  # type: ignore[attr-defined]


def _replicate(env: LandingEnv) -> str:
    env.write(0, 0, os.urandom(MiB))
    return str(ok_json(env, "replicate", "web-1")["id"])


def _landed_exactly(env: LandingEnv, moto: LandingMoto, run_id: str) -> None:
    landing = landing_of(env, run_id)
    assert landing["state"] == "LANDED", landing
    for n, d in enumerate(landing["disks"]):
        content = env.content(n)
        assert read_snapshot(moto, d["snapshot_id"], len(content)) == content


def test_land_refuses_a_run_of_another_vm_and_a_run_that_is_not_completed(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    env = make_env(tmp_path, landing_moto, sizes=(2 * MiB,), landing={"mode": "on-demand"})
    other = tmp_path / "db-disk.img"
    with other.open("wb") as f:
        f.truncate(MiB)
    env.config.write_text(
        env.config.read_text()
        + f'[[local.vms]]\nname = "db-1"\nquiescent = true\n[[local.vms.disks]]\npath = "{other}"\n'
    )
    run_id = _replicate(env)
    proc = cli(env, "land", "db-1", "--run", run_id)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        f"error: run {run_id} is not a run of db-1; list them with `connector runs db-1`"
        in message(proc)
    )
    # A run that failed (its disk went missing) has nothing to land.
    moved = tmp_path / "moved.img"
    shutil.move(env.images[0], moved)
    assert cli(env, "replicate", "web-1").returncode != 0
    shutil.move(moved, env.images[0])
    failed = [r for r in ok_json(env, "runs", "web-1") if r["state"] != "COMPLETED"]
    assert len(failed) == 1, failed
    proc = cli(env, "land", "web-1", "--run", failed[0]["id"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        f"error: run {failed[0]['id']} is {failed[0]['state']}: only a COMPLETED run can be landed"
        in message(proc)
    )
    assert landing_moto.calls() == []  # nothing reached AWS


def test_a_run_whose_ami_retention_removed_is_not_landed_again(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    env = make_env(
        tmp_path, landing_moto, sizes=(2 * MiB,), landing={"mode": "on-demand", "keep_amis": 1}
    )
    first = _replicate(env)
    assert cli(env, "land", "web-1").returncode == 0
    second = _replicate(env)
    assert cli(env, "land", "web-1").returncode == 0
    assert landing_of(env, first)["state"] == "DELETED"
    proc = cli(env, "land", "web-1", "--run", first)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: run {first} was landed and its AMI removed by AMI retention" in message(proc)
    _landed_exactly(env, landing_moto, second)  # the kept landing is untouched


def test_a_snapshot_aws_ends_in_error_is_replaced_when_the_run_is_landed_again(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    env = make_env(tmp_path, landing_moto, sizes=(2 * MiB,), landing={"mode": "on-demand"})
    run_id = _replicate(env)
    landing_moto.inject(SNAPSHOT_FAILURE, "error")
    proc = cli(env, "land", "web-1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (done,) = landing_moto.calls("CompleteSnapshot")
    bad = done["snapshot"]
    (disk,) = landing_of(env, run_id)["disks"]
    assert (
        f"error: snapshot {bad} of disk {disk['disk_key']} ended error in AWS; land the run "
        f"again (`connector land ... --run {run_id}`) to replace it"
    ) in message(proc)
    assert landing_of(env, run_id)["state"] == "FAILED"
    assert landing_moto.calls("RegisterImage") == []
    assert cli(env, "land", "web-1").returncode == 0
    _landed_exactly(env, landing_moto, run_id)
    assert landing_of(env, run_id)["disks"][0]["snapshot_id"] != bad


def test_a_snapshot_not_completed_in_time_is_waited_for_when_the_run_is_landed_again(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    # AWS reports a completed snapshot `pending` at least once (the extension's
    # MOTOEXT_PENDING_DESCRIBES), so a wait of a nanosecond always ends first.
    env = make_env(tmp_path, landing_moto, sizes=(2 * MiB,), landing={"mode": "on-demand"})
    normal = env.config.read_text()
    env.config.write_text(normal.replace("[landing]\n", "[landing]\nwait_timeout = 1e-9\n"))
    run_id = _replicate(env)
    proc = cli(env, "land", "web-1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (done,) = landing_moto.calls("CompleteSnapshot")
    snapshot = done["snapshot"]
    (disk,) = landing_of(env, run_id)["disks"]
    assert (
        f"error: snapshot {snapshot} of disk {disk['disk_key']} was not completed within 0 s; "
        "land the run again later to wait for it"
    ) in message(proc)
    env.config.write_text(normal)
    assert cli(env, "land", "web-1").returncode == 0
    _landed_exactly(env, landing_moto, run_id)
    assert landing_of(env, run_id)["disks"][0]["snapshot_id"] == snapshot  # the same one


def test_a_run_of_a_vm_without_disks_has_nothing_to_land(
    tmp_path: Path, vcsim: Any, landing_moto: LandingMoto
) -> None:
    server = landing_moto.server
    bucket = f"t-{uuid.uuid4().hex[:20]}"
    server.boto3_client("s3").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": server.region}
    )
    name = f"diskless-{uuid.uuid4().hex[:8]}"
    vcsim.add_vm(name, [])
    env = write_config(
        tmp_path,
        vcsim,
        server,
        bucket,
        extra='[landing]\nmode = "on-demand"\nstaging = "replica"\n',
    )
    proc = env.cli("replicate", name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = env.cli_json("runs", name)
    assert run["state"] == "COMPLETED"
    proc = env.cli("land", name)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: run {run['id']} has no disks to land" in message(proc)
    assert landing_moto.calls() == []  # nothing reached AWS


def test_no_ami_is_registered_while_the_landing_record_names_a_disk_not_landed(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    """A landing record whose disks are not those of the run's commit (a state database
    edited, or put back from another copy) never gives an AMI that lacks a disk."""
    env = make_env(tmp_path, landing_moto, sizes=(2 * MiB,), landing={"mode": "on-demand"})
    run_id = _replicate(env)
    landing_moto.inject("StartSnapshot", "AccessDeniedException", status=403)
    assert cli(env, "land", "web-1").returncode == 1  # a landing record, FAILED
    with sqlite3.connect(tmp_path / "state" / "state.db") as db:
        db.execute(
            "INSERT INTO landed_disks (run_id, disk_key, state, client_token, capacity, "
            "blocks_sent) VALUES (?, 2099, 'started', 'not-a-disk-of-the-commit', ?, 0)",
            (run_id, MiB),
        )
    proc = cli(env, "land", "web-1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: disk 2099 of run {run_id} is not landed yet" in message(proc)
    assert landing_moto.calls("RegisterImage") == []
    assert landing_of(env, run_id)["state"] == "FAILED"
