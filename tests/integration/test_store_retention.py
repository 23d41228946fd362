"""Retention and purge through the CLI, against the simulator and moto_server over TLS."""

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
    disk_sha,
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


def test_retention_keeps_one_run_and_purge_removes_the_others_unique_packs(
    env: ConnectorEnv, vcsim: Any, moto: Any, tmp_path: Path
) -> None:
    rng = random.Random(41)
    name = "store-retention-3"
    uuid = vcsim.add_vm(name, [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    write_blocks(vcsim, uuid, key, {9: rng.randbytes(MiB)})  # in every run's map
    app = app_for(env)
    runs, shas, pack_sets = [], [], []
    try:
        for _ in range(3):
            before = set(packs(moto, env.bucket))
            write_blocks(vcsim, uuid, key, {0: rng.randbytes(MiB), 1: rng.randbytes(MiB)})
            runs.append(replicate(app, uuid))
            shas.append(disk_sha(vcsim, uuid, key))
            pack_sets.append(set(packs(moto, env.bucket)) - before)
        for i, (run, sha) in enumerate(zip(runs, shas, strict=True)):
            assert restore_sha(app, run, key, tmp_path / f"before-{i}.img") == sha
    finally:
        app.close()
    assert [len(p) for p in pack_sets] == [1, 1, 1]
    # run 1's pack also holds block 9, which every run still uses
    first, second, third = pack_sets

    shown = env.cli_json("retention", name, "1")
    assert shown == [{"vm": name, "server_id": runs[0].server_id, "keep": 1, "source": "vm"}]

    dry = env.cli("purge", name, "--dry-run", check=True).stdout
    assert f"would delete run {runs[0].id}" in dry and f"would delete run {runs[1].id}" in dry
    assert set(packs(moto, env.bucket)) == first | second | third

    report = env.cli_json("purge", name)
    (ret,) = report["retention"]
    assert ret["deleted"] == [runs[0].id, runs[1].id] and ret["kept"] == [runs[2].id]
    assert ret["bases"] == {runs[0].id: [runs[2].id], runs[1].id: [runs[2].id]}
    assert set(report["gc"]["deleted"]) == second
    assert report["gc"]["bytes_freed"] >= 2 * MiB
    left = packs(moto, env.bucket)
    assert set(left) == first | third
    keys = objects(moto, env.bucket)
    assert not [k for k in keys if k.endswith(f"{runs[0].id}/commit")]
    assert not [k for k in keys if k.endswith(f"{runs[1].id}/commit")]
    assert not [k for k in keys if "/condemned/" in f"/{k}"]

    # the kept run restores byte-exact; the others are gone, with a clear message
    out = tmp_path / "kept.img"
    res = env.cli_json("restore", name, "--run", runs[2].id, "--disk", str(key), "--to", str(out))
    assert res["sha256"] == shas[2]
    gone = env.cli("restore", name, "--run", runs[0].id, "--disk", str(key), "--to", str(out) + "x")
    assert gone.returncode == 1 and "not committed" in gone.stderr

    app = app_for(env)
    try:
        states = {r.id: r.state for r in app.state.runs(runs[0].server_id)}
        assert states == {runs[0].id: "DELETED", runs[1].id: "DELETED", runs[2].id: "COMPLETED"}
        assert verify_store(app.repository(), {runs[0].server_id: None}).ok
        # a next run rewrites blocks 0 and 1: run 3's pack goes, run 1's stays (block 9)
        write_blocks(vcsim, uuid, key, {0: rng.randbytes(MiB), 1: rng.randbytes(MiB)})
        run4 = replicate(app, uuid)
        report2 = app.retention.apply(run4.server_id, 1)
        assert set(report2.gc.deleted) == third
        assert first <= set(packs(moto, env.bucket))
        out4 = tmp_path / "run4.img"
        assert restore_sha(app, run4, key, out4) == disk_sha(vcsim, uuid, key)
    finally:
        app.close()


def test_zero_keeps_every_run(env: ConnectorEnv, vcsim: Any, moto: Any, tmp_path: Path) -> None:
    rng = random.Random(42)
    name = "store-retention-all"
    uuid = vcsim.add_vm(name, [8 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    app = app_for(env)
    try:
        write_blocks(vcsim, uuid, key, {0: rng.randbytes(MiB)})
        first = replicate(app, uuid)
        write_blocks(vcsim, uuid, key, {0: rng.randbytes(MiB)})
        run = replicate(app, uuid)
    finally:
        app.close()
    before = objects(moto, env.bucket)
    env.cli("retention", name, "0", check=True)
    report = env.cli_json("purge")
    assert report["retention"][0]["deleted"] == [] and report["gc"]["deleted"] == []
    assert objects(moto, env.bucket) == before
    # what a job with "keep 1" calls after its run
    app = app_for(env)
    try:
        done = app.retention.apply(run.server_id, 1)
        assert done.retention[0].deleted == [first.id] and len(done.gc.deleted) == 1
        out = tmp_path / "kept.img"
        assert restore_sha(app, run, key, out) == disk_sha(vcsim, uuid, key)
    finally:
        app.close()


def test_removed_server_loses_all_its_staging_data(
    env: ConnectorEnv, vcsim: Any, moto: Any
) -> None:
    rng = random.Random(43)
    name = "store-removed-vm"
    uuid = vcsim.add_vm(name, [8 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    app = app_for(env)
    try:
        for _ in range(2):
            write_blocks(vcsim, uuid, key, {0: rng.randbytes(MiB), 3: rng.randbytes(MiB)})
            run = replicate(app, uuid)
    finally:
        app.close()
    refused = env.cli("purge", name, "--remove-server")
    assert refused.returncode == 1 and "--yes" in refused.stderr
    report = env.cli_json("purge", name, "--remove-server", "--yes")
    assert len(report["retention"][0]["deleted"]) == 2
    keys = objects(moto, env.bucket)
    assert not [k for k in keys if f"/{run.server_id}/" in k]
    assert packs(moto, env.bucket) == {}
    assert sorted(k.split("/", 1)[1] for k in keys) == ["config"]
