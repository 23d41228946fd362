"""One byte flipped in a pack in S3: verify names it, restore refuses it, other runs restore."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from connector.pipeline.verify import verify_store
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.integration.store_helpers import (
    MiB,
    app_for,
    cli_json_any,
    disk_sha,
    flip_byte,
    objects,
    packs,
    replicate,
    restore_sha,
    write_blocks,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> ConnectorEnv:
    return write_config(tmp_path / "connector", vcsim, moto, s3_bucket)


def test_flipped_byte_is_reported_by_verify_and_refused_by_restore(
    env: ConnectorEnv, vcsim: Any, moto: Any, tmp_path: Path
) -> None:
    rng = random.Random(51)
    name = "store-flipped-byte"
    uuid = vcsim.add_vm(name, [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    app = app_for(env)
    runs, shas, new_packs = [], [], []
    try:
        # run 1: blocks 0 and 1; run 2: block 6 (in a pack of its own); run 3: block 6 again
        for blocks in ((0, 1), (6,), (6,)):
            before = set(packs(moto, env.bucket))
            write_blocks(vcsim, uuid, key, {i: rng.randbytes(MiB) for i in blocks})
            runs.append(replicate(app, uuid))
            shas.append(disk_sha(vcsim, uuid, key))
            new_packs.append(set(packs(moto, env.bucket)) - before)
        assert verify_store(app.repository(), {runs[0].server_id: None}, deep=True).ok
    finally:
        app.close()
    (damaged,) = new_packs[1]
    (pack_object,) = [k for k in objects(moto, env.bucket) if k.endswith(damaged)]
    flip_byte(moto, env.bucket, pack_object, 1000)  # inside the sealed block 6

    for extra in ((), ("--deep",)):
        status, report, _stderr = cli_json_any(env, "verify", name, *extra)
        assert status == 1
        faults = [f for f in report["faults"] if f["block"] is not None]
        assert [(f["run_id"], f["disk_key"], f["block"], f["pack_id"]) for f in faults] == [
            (runs[1].id, key, 6, damaged)
        ]
        assert faults[0]["vm"] == name and "authentication" in faults[0]["reason"]
        assert {f["run_id"] for f in report["faults"]} == {runs[1].id}
    text = env.cli("verify", name)
    assert text.returncode == 1
    assert f"fault: {name} run {runs[1].id} disk {key} block 6:" in text.stderr
    assert "1 faults" in text.stdout
    # the other runs verify clean
    assert env.cli("verify", name, "--run", runs[2].id, "--deep").returncode == 0

    # restore refuses the damaged block and names it; nothing is left at the target
    out = tmp_path / "damaged.img"
    refused = env.cli("restore", name, "--run", runs[1].id, "--disk", str(key), "--to", str(out))
    assert refused.returncode == 1
    assert f"block 6 of run {runs[1].id} disk {key}" in refused.stderr
    assert "failed authentication" in refused.stderr
    assert not out.exists() and not list(tmp_path.glob(".damaged.img*"))
    app = app_for(env)
    try:
        assert verify_store(app.repository(), {runs[0].server_id: [runs[0].id]}, deep=True).ok
        for i in (0, 2):
            assert restore_sha(app, runs[i], key, tmp_path / f"run{i}.img") == shas[i]
    finally:
        app.close()


def test_verify_of_an_unknown_run_is_a_clear_error(env: ConnectorEnv, vcsim: Any) -> None:
    uuid = vcsim.add_vm("store-verify-unknown", [8 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.write(uuid, key, 0, b"data" * 1000)
    app = app_for(env)
    try:
        replicate(app, uuid)
    finally:
        app.close()
    proc = env.cli("verify", "--run", "r-20000101T000000000Z-00000000")
    assert proc.returncode == 1
    assert "run r-20000101T000000000Z-00000000 is not in the store" in proc.stderr
    proc = env.cli("verify", "store-verify-unknown", "--run", "r-20000101T000000000Z-00000000")
    assert proc.returncode == 1 and "not committed" in proc.stderr
