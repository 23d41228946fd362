"""End to end: the connector against the real simulator (with CBT) and moto_server over TLS."""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from connector.app import App
from connector.config import load_config
from connector.domain.extents import blocks_touched
from connector.domain.model import Extent
from connector.errors import AuthenticationError, TLSTrustError, UnsupportedSourceError
from tests.harness.connector_env import ConnectorEnv, write_config

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
BLOCK = MiB


def bucket_keys(moto: Any, bucket: str) -> list[str]:
    s3 = moto.boto3_client()
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def scatter(
    vcsim: Any, uuid: str, key: int, capacity: int, rng: random.Random, n: int
) -> list[Extent]:
    written = []
    for _ in range(n):
        length = rng.randrange(1, 96 * 1024)
        offset = rng.randrange(0, capacity - length)
        vcsim.write(uuid, key, offset, rng.randbytes(length))
        written.append(Extent(offset, length))
    return written


def disk_sha(vcsim: Any, uuid: str, key: int) -> str:
    return hashlib.sha256(vcsim.read_disk(uuid, key)).hexdigest()


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> ConnectorEnv:
    return write_config(tmp_path / "connector", vcsim, moto, s3_bucket)


def app_for(env: ConnectorEnv) -> App:
    return App(load_config(env.config_file))


def restore_sha(app: App, server_id: str, run_id: str, key: int, out: Path) -> str:
    from connector.pipeline.restore import restore_disk

    return restore_disk(app.repository(), server_id, run_id, key, out).sha256


def test_two_disks_full_then_two_incrementals_restore_byte_exact(
    env: ConnectorEnv, vcsim: Any, tmp_path: Path
) -> None:
    rng = random.Random(2026)
    sizes = [64 * MiB, 256 * MiB]
    uuid = vcsim.add_vm("e2e-two-disks", sizes)
    keys = vcsim.disk_keys(uuid)
    assert len(keys) == 2
    caps = dict(zip(keys, sizes, strict=True))
    app = app_for(env)
    try:
        expected: list[dict[int, str]] = []
        written: list[dict[int, list[Extent]]] = []
        run_ids: list[str] = []
        for round_ in range(3):
            w = {k: scatter(vcsim, uuid, k, caps[k], rng, 12 if round_ == 0 else 6) for k in keys}
            written.append(w)
            expected.append({k: disk_sha(vcsim, uuid, k) for k in keys})
            run = app.replicator().replicate(uuid)
            assert run.state == "COMPLETED", run.error
            assert [s for s in vcsim.snapshot_names(uuid) if s.startswith("connector-")] == []
            run_ids.append(run.id)
        server = app.servers.resolve(uuid, refresh=False)
        runs = {r.id: r for r in app.state.runs(server.id)}
        # the first run reads allocated areas; the next ones only changed extents
        assert {d.mode for d in runs[run_ids[0]].disks} == {"allocated"}
        for i in (1, 2):
            for d in runs[run_ids[i]].disks:
                assert d.mode == "incremental"
                bound = len(blocks_touched(written[i][d.disk_key], BLOCK, d.capacity)) * BLOCK
                assert 0 < d.bytes_read <= bound, (d.bytes_read, bound)
                assert d.bytes_changed <= d.bytes_read
        # every run of every disk restores to the disk's content at that snapshot
        for i, run_id in enumerate(run_ids):
            for k in keys:
                out = tmp_path / f"restore-{i}-{k}.img"
                assert restore_sha(app, server.id, run_id, k, out) == expected[i][k]
                assert out.stat().st_size == caps[k]
    finally:
        app.close()


def test_refused_change_id_falls_back_to_a_full_read(
    env: ConnectorEnv, vcsim: Any, tmp_path: Path
) -> None:
    rng = random.Random(5)
    uuid = vcsim.add_vm("e2e-refused", [64 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    scatter(vcsim, uuid, key, 64 * MiB, rng, 5)
    app = app_for(env)
    try:
        assert app.replicator().replicate(uuid).state == "COMPLETED"
        scatter(vcsim, uuid, key, 64 * MiB, rng, 3)
        vcsim.refuse_change_ids(uuid, key, "FileFault")
        expected = disk_sha(vcsim, uuid, key)
        run = app.replicator().replicate(uuid)
        (d,) = run.disks
        # a full read without a base run, of the allocated areas only ('*')
        assert d.mode == "allocated" and d.change_id_from == "*"
        assert "refused" in (d.reason or "") and "FileFault" in (d.reason or "")
        assert 0 < d.bytes_read < 64 * MiB
        server = app.servers.resolve(uuid, refresh=False)
        assert restore_sha(app, server.id, run.id, key, tmp_path / "r.img") == expected
        # InvalidArgument is handled the same way
        vcsim.refuse_change_ids(uuid, key, "InvalidArgument")
        scatter(vcsim, uuid, key, 64 * MiB, rng, 2)
        run2 = app.replicator().replicate(uuid)
        assert run2.disks[0].mode == "allocated"
        assert "InvalidArgument" in (run2.disks[0].reason or "")
        vcsim.allow_change_ids(uuid, key)
        scatter(vcsim, uuid, key, 64 * MiB, rng, 2)
        expected3 = disk_sha(vcsim, uuid, key)
        run3 = app.replicator().replicate(uuid)
        assert run3.disks[0].mode == "incremental"
        assert restore_sha(app, server.id, run3.id, key, tmp_path / "r3.img") == expected3
    finally:
        app.close()


def test_cbt_disabled_disk_is_read_in_full(env: ConnectorEnv, vcsim: Any, tmp_path: Path) -> None:
    rng = random.Random(9)
    uuid = vcsim.add_vm("e2e-nocbt", [64 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.disable_disk_cbt(uuid, key)
    scatter(vcsim, uuid, key, 64 * MiB, rng, 4)
    expected = disk_sha(vcsim, uuid, key)
    app = app_for(env)
    try:
        run = app.replicator().replicate(uuid)
        (d,) = run.disks
        assert d.mode == "full" and "CBT is off" in (d.reason or "")
        server = app.servers.resolve(uuid, refresh=False)
        assert restore_sha(app, server.id, run.id, key, tmp_path / "r.img") == expected
    finally:
        app.close()


def test_cli_replicate_runs_and_restore(env: ConnectorEnv, vcsim: Any, tmp_path: Path) -> None:
    rng = random.Random(11)
    uuid = vcsim.add_vm("e2e-cli", [64 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    scatter(vcsim, uuid, key, 64 * MiB, rng, 4)
    expected = disk_sha(vcsim, uuid, key)
    vms = env.cli_json("vms")
    assert any(v["vm_uuid"] == uuid and v["name"] == "e2e-cli" for v in vms)
    env.cli("replicate", "e2e-cli", check=True)
    runs = env.cli_json("runs", "e2e-cli")
    assert [r["state"] for r in runs] == ["COMPLETED"]
    out = tmp_path / "disk.img"
    res = env.cli_json(
        "restore", "e2e-cli", "--run", runs[0]["id"], "--disk", str(key), "--to", str(out)
    )
    assert res["sha256"] == expected
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
    table = env.cli("runs", check=True).stdout
    assert runs[0]["id"] in table and "COMPLETED" in table


def test_failed_run_leaves_no_snapshot(env: ConnectorEnv, vcsim: Any, moto: Any) -> None:
    uuid = vcsim.add_vm("e2e-fail", [64 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.write(uuid, key, 0, b"data" * 1000)
    app = app_for(env)
    try:
        app.replicator().replicate(uuid)  # creates the store
        vcsim.write(uuid, key, 10 * MiB, b"more" * 1000)
        # the disk file disappears mid-run: the read fails after the snapshot exists
        path = vcsim.disk_path(uuid, key)
        saved = path.read_bytes()
        path.unlink()
        try:
            with pytest.raises(Exception) as info:
                app.replicator().replicate(uuid)
        finally:
            path.write_bytes(saved)
        assert str(info.value)
        runs = app.state.runs(app.servers.resolve(uuid, refresh=False).id)
        assert runs[-1].state == "FAILED" and runs[-1].error
        assert not [s for s in vcsim.snapshot_names(uuid) if s.startswith("connector-")]
    finally:
        app.close()


def test_snapshot_left_by_a_killed_process_is_removed_at_the_next_start(
    env: ConnectorEnv, vcsim: Any
) -> None:
    rng = random.Random(3)
    uuid = vcsim.add_vm("e2e-killed", [256 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.disable_disk_cbt(uuid, key)  # a full read keeps the process busy after the snapshot
    scatter(vcsim, uuid, key, 256 * MiB, rng, 4)
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "connector", "replicate", "e2e-killed"],
        env=dict(os.environ, CONNECTOR_CONFIG=str(env.config_file)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(s.startswith("connector-") for s in vcsim.snapshot_names(uuid)):
            assert proc.poll() is None, "replicate ended before its snapshot was seen"
            assert time.monotonic() < deadline, "no snapshot appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert any(s.startswith("connector-") for s in vcsim.snapshot_names(uuid))
    vcsim.allow_change_ids(uuid, key)
    app = app_for(env)
    try:
        run = app.replicator().replicate(uuid)
        assert run.state == "COMPLETED"
        assert not [s for s in vcsim.snapshot_names(uuid) if s.startswith("connector-")]
        killed = [r for r in app.state.runs(run.server_id) if r.id != run.id]
        assert [r.state for r in killed] == ["FAILED"]
        assert "interrupted" in (killed[0].error or "")
    finally:
        app.close()


# -- errors that must name their cause and change nothing in S3 --------------------


def test_pre_existing_snapshot_is_refused(env: ConnectorEnv, vcsim: Any, moto: Any) -> None:
    uuid = vcsim.add_vm("e2e-user-snap", [64 * MiB])
    vcsim.create_snapshot(uuid, "before-patching")
    before = bucket_keys(moto, env.bucket)
    proc = env.cli("replicate", "e2e-user-snap")
    assert proc.returncode == 1
    assert "e2e-user-snap" in proc.stderr and "already has snapshots" in proc.stderr
    assert "before-patching" in proc.stderr
    assert bucket_keys(moto, env.bucket) == before
    assert vcsim.snapshot_names(uuid) == ["before-patching"]
    app = app_for(env)
    try:
        with pytest.raises(UnsupportedSourceError):
            app.replicator().replicate(uuid)
    finally:
        app.close()


def test_wrong_password_is_refused(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> None:
    bad = tmp_path / "bad-password"
    bad.write_text("not-the-password-xyzzy\n")
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket, vcenter={"password_file": str(bad)})
    proc = env.cli("vms")
    assert proc.returncode == 1
    assert "user name or password" in proc.stderr
    assert "xyzzy" not in proc.stderr + proc.stdout
    assert bucket_keys(moto, s3_bucket) == []
    app = app_for(env)
    try:
        with pytest.raises(AuthenticationError):
            app.vsphere.list_vms()
    finally:
        app.close()


def test_untrusted_vcenter_certificate_is_refused(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    from tests.harness.ca import make_ca

    other = make_ca(tmp_path / "other-ca")
    env = write_config(
        tmp_path / "c", vcsim, moto, s3_bucket, vcenter={"ca_file": str(other.cert_file)}
    )
    proc = env.cli("replicate", "anything")
    assert proc.returncode == 1
    assert "not trusted" in proc.stderr and "127.0.0.1" in proc.stderr
    assert bucket_keys(moto, s3_bucket) == []
    app = app_for(env)
    try:
        with pytest.raises(TLSTrustError):
            app.vsphere.list_vms()
    finally:
        app.close()


def test_unreachable_s3_is_refused_before_a_snapshot(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    from tests.harness.moto import free_port

    uuid = vcsim.add_vm("e2e-no-s3", [64 * MiB])
    env = write_config(
        tmp_path / "c",
        vcsim,
        moto,
        s3_bucket,
        s3={"endpoint_url": f"https://127.0.0.1:{free_port()}"},
    )
    proc = env.cli("replicate", uuid)
    assert proc.returncode == 1
    assert "127.0.0.1" in proc.stderr and ("cannot reach the S3 endpoint" in proc.stderr)
    assert not [s for s in vcsim.snapshot_names(uuid) if s.startswith("connector-")]
    assert bucket_keys(moto, s3_bucket) == []


def test_malformed_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[vcenter]\nurl = "https://admin:hunter2@vc.example/sdk"\nuser = "a"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "connector", "runs", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "must not carry a user name or password" in proc.stderr
    assert "hunter2" not in proc.stderr
