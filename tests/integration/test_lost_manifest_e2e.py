"""A committed run whose manifest was deleted from S3, met through the `connector`
command against the simulator and moto_server: the next `replicate` reads that disk in
full (its mode and reason in `connector runs --json`) and restores byte-exact; `purge`
deletes nothing, exits 1 and names the run and what to do; `--drop-run` clears it."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config
from tests.integration.store_helpers import MiB, disk_sha, objects, write_blocks

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> ConnectorEnv:
    return write_config(tmp_path / "connector", vcsim, moto, s3_bucket)


def restore_sha(env: ConnectorEnv, name: str, run_id: str, key: int, out: Path) -> str:
    doc = env.cli_json("restore", name, "--run", run_id, "--disk", str(key), "--to", str(out))
    return str(doc["sha256"])


def test_a_deleted_manifest_makes_a_full_read_and_stops_purge(
    env: ConnectorEnv, vcsim: Any, moto: Any, tmp_path: Path
) -> None:
    rng = random.Random(203)
    name = "lost-manifest"
    uuid = vcsim.add_vm(name, [8 * MiB, 8 * MiB])
    lost, kept = vcsim.disk_keys(uuid)
    write_blocks(vcsim, uuid, lost, {1: rng.randbytes(MiB)})
    write_blocks(vcsim, uuid, kept, {2: rng.randbytes(MiB)})
    env.cli("replicate", name, check=True)
    write_blocks(vcsim, uuid, lost, {3: rng.randbytes(MiB)})
    env.cli("replicate", name, check=True)
    first, second = env.cli_json("runs", name)
    assert [d["mode"] for d in second["disks"]] == ["incremental", "incremental"]
    # the second run's manifest of one disk is deleted from the bucket
    s3 = moto.boto3_client()
    gone = f"{env.prefix}/runs/{second['server_id']}/{second['id']}/disk-{lost}"
    s3.delete_object(Bucket=env.bucket, Key=gone)

    # purge deletes nothing, fails, and says which run and what to do
    before = objects(moto, env.bucket)
    proc = env.cli("purge", name, "--keep", "1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())
    assert f"committed run {second['id']}" in message
    assert f"no manifest for disk {lost}" in message and "nothing was deleted" in message
    assert "connector verify" in message and "--drop-run" in message
    assert objects(moto, env.bucket) == before
    assert {r["state"] for r in env.cli_json("runs", name)} == {"COMPLETED"}

    # the next run reads that disk in full, recorded with the reason, and restores exact
    write_blocks(vcsim, uuid, lost, {5: rng.randbytes(MiB)})
    write_blocks(vcsim, uuid, kept, {6: rng.randbytes(MiB)})
    env.cli("replicate", name, check=True)
    third = env.cli_json("runs", name)[-1]
    assert third["state"] == "COMPLETED"
    disks = {d["disk_key"]: d for d in third["disks"]}
    assert disks[lost]["mode"] == "full"
    assert (
        f"the manifest of the previous run {second['id']} cannot be read" in (disks[lost]["reason"])
    )
    assert disks[lost]["bytes_read"] == 8 * MiB
    assert disks[kept]["mode"] == "incremental"
    for key in (lost, kept):
        sha = restore_sha(env, name, third["id"], key, tmp_path / f"third-{key}.img")
        assert sha == disk_sha(vcsim, uuid, key)

    # dropping the lost run lets purge go on; what is kept still restores exact
    before = objects(moto, env.bucket)
    refused = env.cli("purge", "--drop-run", second["id"])
    assert refused.returncode == 1 and "--yes" in refused.stderr
    unknown = env.cli("purge", "--drop-run", "r-20260101T000000000Z-00000000", "--yes")
    assert unknown.returncode == 1 and "is not in the store" in unknown.stderr
    assert "Traceback" not in refused.stderr + unknown.stderr
    assert objects(moto, env.bucket) == before
    done = env.cli("purge", name, "--keep", "1", "--drop-run", second["id"], "--yes", "--json")
    assert done.returncode == 0, done.stderr
    states = {r["id"]: r["state"] for r in env.cli_json("runs", name)}
    assert states == {first["id"]: "DELETED", second["id"]: "DELETED", third["id"]: "COMPLETED"}
    for key in (lost, kept):
        sha = restore_sha(env, name, third["id"], key, tmp_path / f"after-{key}.img")
        assert sha == disk_sha(vcsim, uuid, key)
    verified = env.cli("verify", name)
    assert verified.returncode == 0, verified.stdout + verified.stderr
