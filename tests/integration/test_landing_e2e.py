"""Landing runs in AWS through the `connector` command, against the extended moto_server
over TLS: snapshots read back exactly, only changed blocks sent, AMI retention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.fixtures_landing import LandingMoto
from tests.harness.landing_env import (
    LandingEnv,
    MiB,
    differing_blocks,
    make_env,
    read_snapshot,
)

pytestmark = pytest.mark.integration


def cli(
    env: LandingEnv, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "CONNECTOR_CONFIG": str(env.config),
            "COLUMNS": "200",
            **(extra_env or {}),
        },
        check=False,
    )


def ok_json(env: LandingEnv, *args: str) -> Any:
    proc = cli(env, *args, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def landing_of(env: LandingEnv, run_id: str) -> dict[str, Any]:
    shown = ok_json(env, "runs", "show", run_id)
    landing: dict[str, Any] = shown["landing"]
    return landing


def test_three_runs_land_as_three_amis_sending_only_changed_blocks_and_keep_two(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    env = make_env(tmp_path, landing_moto, landing={"keep_amis": 2})
    ec2 = landing_moto.server.boto3_client("ec2")
    env.write(0, 0, os.urandom(MiB + 4096))  # blocks 0..2 of disk 0
    env.write(1, 2 * MiB, os.urandom(100))  # block 4 of disk 1
    before = [b"", b""]
    landed: list[dict[str, Any]] = []
    contents: list[list[bytes]] = []
    for step in range(3):
        if step == 1:
            env.write(0, MiB + 600 * 1024, b"x" * 10)  # block 3 (only; not 2)
            env.write(1, 2 * MiB, bytes(100))  # block 4 becomes zero again
        if step == 2:
            env.write(1, 0, b"y" * 5)  # block 0 of disk 1
        now = [env.content(0), env.content(1)]
        run = ok_json(env, "replicate", "web-1")
        landing = landing_of(env, run["id"])
        assert landing["state"] == "LANDED"
        image = ec2.describe_images(ImageIds=[landing["image_id"]])["Images"][0]
        assert image["BootMode"] == "uefi" and image["Architecture"] == "x86_64"
        assert image["EnaSupport"] is True
        assert image["Name"] == f"connector-{run['server_id']}-{run['id']}"  # opaque ids only
        mapped = [m["Ebs"]["SnapshotId"] for m in image["BlockDeviceMappings"]]
        assert mapped == [d["snapshot_id"] for d in landing["disks"]]
        assert image["RootDeviceName"] == image["BlockDeviceMappings"][0]["DeviceName"]
        for n, d in enumerate(landing["disks"]):
            assert read_snapshot(landing_moto, d["snapshot_id"], len(now[n])) == now[n]
            sent = landing_moto.blocks_sent(d["snapshot_id"])
            assert sent == differing_blocks(before[n], now[n]), (step, n, sent)
            if step:
                assert d["parent_snapshot_id"] == landed[-1]["disks"][n]["snapshot_id"]
        tags = {
            t["Key"]: t["Value"]
            for t in ec2.describe_snapshots(SnapshotIds=[landing["disks"][0]["snapshot_id"]])[
                "Snapshots"
            ][0]["Tags"]
        }
        assert "web-1" not in json.dumps(tags)  # no VM name in tags
        landed.append(landing)
        contents.append(now)
        before = now
    assert len({x["image_id"] for x in landed}) == 3
    assert len(landing_moto.calls("RegisterImage")) == 3
    # keep = 2: the first AMI is deregistered and its snapshots deleted.
    assert ec2.describe_images(Owners=["self"], ImageIds=[])["Images"] is not None
    remaining = {i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]}
    assert landed[0]["image_id"] not in remaining
    assert {landed[1]["image_id"], landed[2]["image_id"]} <= remaining
    all_snaps = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    assert not {d["snapshot_id"] for d in landed[0]["disks"]} & all_snaps
    assert landing_of(env, landed[0]["run_id"])["state"] == "DELETED"
    table = cli(env, "runs", "web-1")
    assert table.returncode == 0 and landed[2]["image_id"] in table.stdout
    assert "(deleted)" in table.stdout
    shown = cli(env, "runs", "show", landed[2]["run_id"])
    assert shown.returncode == 0 and f"AMI {landed[2]['image_id']}" in shown.stdout
    assert all(d["snapshot_id"] in shown.stdout for d in landed[2]["disks"])
    for k in (1, 2):
        for n, d in enumerate(landed[k]["disks"]):
            assert (
                read_snapshot(landing_moto, d["snapshot_id"], len(contents[k][n])) == contents[k][n]
            )
