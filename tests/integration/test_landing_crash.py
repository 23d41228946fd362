"""A `connector land` killed (SIGKILL) at each point of a landing, then run again: the
run ends landed and exact, with no stray snapshot and no AMI on an incomplete one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.harness.fixtures_landing import LandingMoto
from tests.harness.landing_env import MiB, make_env, read_snapshot
from tests.integration.test_landing_e2e import cli, landing_of, ok_json

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "point",
    [
        "land-block:3",  # during PutSnapshotBlock
        "land-wait:1",  # during CompleteSnapshot's wait
        "land-before-image:1",  # between CompleteSnapshot and RegisterImage
    ],
)
def test_a_killed_landing_resumes_exactly(
    point: str, tmp_path: Path, landing_moto: LandingMoto
) -> None:
    env = make_env(tmp_path, landing_moto, landing={"mode": "on-demand"})
    ec2 = landing_moto.server.boto3_client("ec2")
    env.write(0, 0, os.urandom(3 * MiB))
    env.write(1, MiB, os.urandom(MiB))
    first = ok_json(env, "replicate", "web-1")
    assert ok_json(env, "runs", "show", first["id"])["landing"] is None  # on demand only
    assert ok_json(env, "land", "web-1")["state"] == "LANDED"
    env.write(0, 2 * MiB, os.urandom(MiB))
    env.write(1, 0, os.urandom(700 * 1024))
    run = ok_json(env, "replicate", "web-1")
    content = [env.content(0), env.content(1)]

    killed = cli(
        env, "land", "web-1", "--run", run["id"], extra_env={"CONNECTOR_TEST_CRASH_AT": point}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    for image in ec2.describe_images(Owners=["self"])["Images"]:
        for m in image["BlockDeviceMappings"]:  # never an AMI on an incomplete snapshot
            snap = ec2.describe_snapshots(SnapshotIds=[m["Ebs"]["SnapshotId"]])["Snapshots"][0]
            assert snap["State"] == "completed"

    again = cli(env, "land", "web-1", "--run", run["id"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "landed: AMI ami-" in again.stdout
    landing = landing_of(env, run["id"])
    assert landing["state"] == "LANDED"
    for n, d in enumerate(landing["disks"]):
        assert read_snapshot(landing_moto, d["snapshot_id"], len(content[n])) == content[n]
    # No stray snapshot: the run's snapshots are exactly those its AMI names.
    tagged = ec2.describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:connector:run", "Values": [run["id"]]}]
    )["Snapshots"]
    assert sorted(s["SnapshotId"] for s in tagged) == sorted(
        d["snapshot_id"] for d in landing["disks"]
    )
    images = [i for i in ec2.describe_images(Owners=["self"])["Images"] if run["id"] in i["Name"]]
    assert [i["ImageId"] for i in images] == [landing["image_id"]]
    # Resumed, not started over: one snapshot per disk was ever started for the run.
    started = {c["snapshot"] for c in landing_moto.calls("StartSnapshot") if "fault" not in c}
    assert {d["snapshot_id"] for d in landing["disks"]} <= started
    # Landing it once more changes nothing.
    assert ok_json(env, "land", "web-1", "--run", run["id"])["image_id"] == landing["image_id"]
