"""A lost state database, rebuilt from the replica store: through the `connector` command,
against the simulator (with CBT) and moto_server over TLS."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from connector.adapters.state import StateStore
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.tcpproxy import TcpProxy
from tests.integration.store_helpers import (
    MiB,
    app_for,
    cli_json_any,
    disk_sha,
    flip_byte,
    objects,
    write_blocks,
)

pytestmark = pytest.mark.integration

SIZES = [16 * MiB, 8 * MiB]


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> ConnectorEnv:
    return write_config(tmp_path / "connector", vcsim, moto, s3_bucket)


def state_dir(env: ConnectorEnv) -> Path:
    return env.workdir / "state"


def lose_state(env: ConnectorEnv, key: bytes | None = None) -> None:
    """The machine is rebuilt: the state directory is gone; the store key comes back
    from its backup (`key`; None: it does not)."""
    shutil.rmtree(state_dir(env))
    state_dir(env).mkdir()
    if key is None:
        return
    path = state_dir(env) / "store.key"
    path.write_bytes(key)
    path.chmod(0o600)


def store_key(env: ConnectorEnv) -> bytes:
    return (state_dir(env) / "store.key").read_bytes()


def two_runs(
    env: ConnectorEnv, vcsim: Any, name: str, seed: int
) -> tuple[str, list[int], list[dict[str, Any]], list[dict[int, str]], random.Random]:
    """A VM with two disks replicated twice: its uuid, disk keys, runs and disk hashes."""
    rng = random.Random(seed)
    uuid = vcsim.add_vm(name, SIZES)
    keys = vcsim.disk_keys(uuid)
    shas: list[dict[int, str]] = []
    for _ in range(2):
        for key in keys:
            write_blocks(vcsim, uuid, key, {rng.randrange(8): rng.randbytes(MiB // 2)})
        env.cli("replicate", name, check=True)
        shas.append({key: disk_sha(vcsim, uuid, key) for key in keys})
    runs = env.cli_json("runs", name)
    assert [r["state"] for r in runs] == ["COMPLETED", "COMPLETED"]
    return uuid, keys, runs, shas, rng


def restore_cli(env: ConnectorEnv, vm: str, run_id: str, key: int, out: Path) -> str:
    res = env.cli_json("restore", vm, "--run", run_id, "--disk", str(key), "--to", str(out))
    return str(res["sha256"])


def catalog(env: ConnectorEnv) -> list[Any]:
    state = StateStore.at_path(state_dir(env) / "state.db")
    try:
        return state.servers()
    finally:
        state.close()


def state_runs(env: ConnectorEnv) -> list[Any]:
    state = StateStore.at_path(state_dir(env) / "state.db")
    try:
        return state.runs()
    finally:
        state.close()


def comparable(run: dict[str, Any]) -> dict[str, Any]:
    """What a rebuilt run must show as the original did (its end time is the commit's)."""
    return {k: v for k, v in run.items() if k != "finished_at"}


def test_state_rebuild_lists_restores_and_continues_incrementally(
    env: ConnectorEnv, vcsim: Any, moto: Any, tmp_path: Path
) -> None:
    name = "rebuild-vm"
    uuid, keys, before, shas, rng = two_runs(env, vcsim, name, 1)
    key_bytes = store_key(env)
    lose_state(env, key_bytes)

    proc = env.cli("state", "rebuild")
    assert proc.returncode == 0, proc.stderr
    assert "1 servers (1 added), 2 committed runs (2 added), 2 disk states" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert env.cli_json("verify")["runs"] == 2
    # again: the state is there, nothing is added
    again = env.cli("state", "rebuild", check=True).stdout
    assert "1 servers (0 added), 2 committed runs (0 added), 0 disk states" in again

    after = env.cli_json("runs", name)
    assert [comparable(r) for r in after] == [comparable(r) for r in before]
    assert [[d["mode"] for d in r["disks"]] for r in after] == [
        ["allocated", "allocated"],
        ["incremental", "incremental"],
    ]
    vms = catalog(env)
    assert [(s.id, s.vm_uuid, s.name) for s in vms] == [(before[0]["server_id"], uuid, name)]
    table = env.cli("runs", check=True).stdout
    assert before[0]["id"] in table and name in table

    for i, run in enumerate(after):
        for key in keys:
            out = tmp_path / f"restore-{i}-{key}.img"
            assert restore_cli(env, name, run["id"], key, out) == shas[i][key]
            assert out.stat().st_size == SIZES[keys.index(key)]

    # the next run starts from the changeIds of the store's last run: incremental
    for key in keys:
        write_blocks(vcsim, uuid, key, {rng.randrange(8): rng.randbytes(MiB // 2)})
    expected = {key: disk_sha(vcsim, uuid, key) for key in keys}
    run3 = env.cli_json("replicate", name)
    assert run3["server_id"] == before[0]["server_id"]
    assert [d["mode"] for d in run3["disks"]] == ["incremental", "incremental"]
    assert [d["change_id_from"] for d in run3["disks"]] == [
        d["change_id_to"] for d in before[1]["disks"]
    ]
    assert all(0 < d["bytes_read"] <= MiB for d in run3["disks"])
    for key in keys:
        assert restore_cli(env, name, run3["id"], key, tmp_path / f"r3-{key}.img") == expected[key]
    # only opaque ids in the object keys: the VM's name is inside the sealed record
    keys_in_bucket = objects(moto, env.bucket)
    assert f"{env.prefix}/servers/{before[0]['server_id']}" in keys_in_bucket
    assert not [k for k in keys_in_bucket if name in k or uuid in k]


def test_first_command_on_an_empty_state_database_rebuilds_it(
    env: ConnectorEnv, vcsim: Any, tmp_path: Path
) -> None:
    name = "rebuild-first-cmd"
    uuid, keys, before, shas, rng = two_runs(env, vcsim, name, 2)
    lose_state(env, store_key(env))

    proc = env.cli("runs", name, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "the state database was empty: rebuilt 1 servers and 2 runs" in proc.stderr
    after = json.loads(proc.stdout)
    assert [r["id"] for r in after] == [r["id"] for r in before]
    assert all(r["state"] == "COMPLETED" for r in after)
    for i, run in enumerate(after):
        for key in keys:
            out = tmp_path / f"restore-{i}-{key}.img"
            assert restore_cli(env, name, run["id"], key, out) == shas[i][key]
    # a second command finds the state in place: nothing rebuilt again
    again = env.cli("runs", name)
    assert again.returncode == 0 and "rebuilt" not in again.stderr

    # vCenter refuses the stored changeId of one disk: that disk is read in full (its
    # allocated areas),
    # the other stays incremental, and both restore exactly
    refused, kept = keys
    vcsim.refuse_change_ids(uuid, refused, "FileFault")
    for key in keys:
        write_blocks(vcsim, uuid, key, {rng.randrange(8): rng.randbytes(MiB // 2)})
    expected = {key: disk_sha(vcsim, uuid, key) for key in keys}
    run3 = env.cli_json("replicate", name)
    modes = {d["disk_key"]: (d["mode"], d["reason"]) for d in run3["disks"]}
    assert modes[refused][0] == "allocated" and "FileFault" in modes[refused][1]
    assert modes[kept][0] == "incremental"
    for key in keys:
        assert restore_cli(env, name, run3["id"], key, tmp_path / f"r3-{key}.img") == expected[key]
    vcsim.allow_change_ids(uuid, refused)


def test_rebuild_with_a_wrong_or_missing_key_fails_and_changes_nothing(
    env: ConnectorEnv, vcsim: Any, moto: Any
) -> None:
    name = "rebuild-wrong-key"
    uuid = vcsim.add_vm(name, [8 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    write_blocks(vcsim, uuid, key, {1: b"x" * MiB})
    env.cli("replicate", name, check=True)
    good = store_key(env)
    bucket_before = objects(moto, env.bucket)

    wrong = base64.b64encode(os.urandom(32)) + b"\n"
    lose_state(env, wrong)
    proc = env.cli("state", "rebuild")
    assert proc.returncode == 1
    assert "does not open this store (wrong key)" in proc.stderr
    assert "use the key file the store was created with" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert state_runs(env) == [] and catalog(env) == []  # nothing was written
    # the first command on the empty state database fails the same way, and adds nothing
    proc = env.cli("runs")
    assert proc.returncode == 1 and "wrong key" in proc.stderr
    assert state_runs(env) == [] and catalog(env) == []

    lose_state(env)  # no key at all
    proc = env.cli("state", "rebuild")
    assert proc.returncode == 2
    assert "store key file" in proc.stderr and "Restore it from your backup" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert state_runs(env) == [] and catalog(env) == []
    proc = env.cli("replicate", name)
    assert proc.returncode == 2 and "Restore it from your backup" in proc.stderr
    assert state_runs(env) == []
    assert objects(moto, env.bucket) == bucket_before  # the store is untouched

    lose_state(env, good)  # with the right key, everything comes back
    env.cli("state", "rebuild", check=True)
    assert [r["state"] for r in env.cli_json("runs", name)] == ["COMPLETED"]


def test_rebuild_without_a_store_says_there_is_nothing_to_rebuild(env: ConnectorEnv) -> None:
    state_dir(env).mkdir(parents=True)
    (state_dir(env) / "store.key").write_bytes(base64.b64encode(os.urandom(32)))
    proc = env.cli("state", "rebuild")
    assert proc.returncode == 1
    assert "holds no replica store" in proc.stderr and "[s3] bucket and prefix" in proc.stderr


def test_a_damaged_run_is_skipped_and_reported_the_others_rebuilt(
    env: ConnectorEnv, vcsim: Any, moto: Any, tmp_path: Path
) -> None:
    name = "rebuild-damaged"
    _uuid, keys, before, shas, _rng = two_runs(env, vcsim, name, 3)
    server_id, first = before[0]["server_id"], before[0]["id"]
    lose_state(env, store_key(env))
    flip_byte(moto, env.bucket, f"{env.prefix}/runs/{server_id}/{first}/commit", 20)

    code, report, _stderr = cli_json_any(env, "state", "rebuild")
    assert code == 1
    assert report["runs_added"] == 1
    assert [f for f in report["faults"] if first in f and "failed authentication" in f]
    proc = env.cli("state", "rebuild")
    assert proc.returncode == 1
    assert f"fault: run {first} of server {server_id}" in proc.stderr
    assert "connector verify" in proc.stderr
    runs = env.cli_json("runs", name)
    assert [r["id"] for r in runs] == [before[1]["id"]]
    out = tmp_path / "second.img"
    assert restore_cli(env, name, before[1]["id"], keys[0], out) == shas[1][keys[0]]


def test_rebuild_refuses_a_vm_the_state_database_names_with_another_id(
    env: ConnectorEnv, vcsim: Any
) -> None:
    name = "rebuild-conflict"
    uuid = vcsim.add_vm(name, [8 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    write_blocks(vcsim, uuid, key, {0: b"y" * MiB})
    env.cli("replicate", name, check=True)
    (run,) = env.cli_json("runs", name)
    lose_state(env, store_key(env))
    # an older connector discovered the VM again into the new state database: a new id
    app = app_for(env)
    try:
        newer = app.state.upsert_server(app.hypervisor.get_vm(uuid))
    finally:
        app.close()
    assert newer.id != run["server_id"]

    proc = env.cli("state", "rebuild")
    assert proc.returncode == 1
    assert f"VM {uuid} is server {newer.id} in the catalog, not server {run['server_id']}" in (
        proc.stderr
    )
    assert "move the state database aside and rebuild it" in proc.stderr
    assert state_runs(env) == []


def test_rebuild_completes_an_older_copy_of_the_state_database(
    env: ConnectorEnv, vcsim: Any, tmp_path: Path
) -> None:
    name = "rebuild-old-copy"
    uuid = vcsim.add_vm(name, [8 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    write_blocks(vcsim, uuid, key, {0: b"a" * MiB})
    env.cli("replicate", name, check=True)
    backup = tmp_path / "backup"
    shutil.copytree(state_dir(env), backup)  # no process has the database open
    write_blocks(vcsim, uuid, key, {1: b"b" * MiB})
    run2 = env.cli_json("replicate", name)
    shutil.rmtree(state_dir(env))
    shutil.copytree(backup, state_dir(env))  # the state as the backup had it: one run

    assert len(env.cli_json("runs", name)) == 1  # not empty: nothing is rebuilt by itself
    proc = env.cli("state", "rebuild")
    assert proc.returncode == 0, proc.stderr
    assert "1 servers (0 added), 2 committed runs (1 added), 1 disk states" in proc.stdout
    runs = env.cli_json("runs", name)
    assert [r["id"] for r in runs][1] == run2["id"]
    assert runs[1]["disks"] == run2["disks"]
    # the next run goes on from the changeId of the store's last run, not the backup's
    write_blocks(vcsim, uuid, key, {2: b"c" * MiB})
    run3 = env.cli_json("replicate", name)
    (disk,) = run3["disks"]
    assert disk["mode"] == "incremental"
    assert disk["change_id_from"] == run2["disks"][0]["change_id_to"]
    assert disk["bytes_read"] == MiB
    assert restore_cli(env, name, run3["id"], key, tmp_path / "r3.img") == disk_sha(
        vcsim, uuid, key
    )


def test_a_store_without_server_records_lists_its_runs_by_server_id(
    env: ConnectorEnv, vcsim: Any, moto: Any, tmp_path: Path
) -> None:
    name = "rebuild-old-store"
    uuid = vcsim.add_vm(name, [8 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    expected = []
    for block in (2, 5):
        write_blocks(vcsim, uuid, key, {block: bytes([block]) * MiB})
        env.cli("replicate", name, check=True)
        expected.append(disk_sha(vcsim, uuid, key))
    before = env.cli_json("runs", name)
    server_id = before[0]["server_id"]
    # as a connector older than the server record wrote it: no record, bare commits
    app = app_for(env)
    try:
        repo = app.repository()
        for run in before:
            commit = repo.read_commit(server_id, run["id"])
            for field in ("type", "started_at"):
                del commit[field]
            for disk in commit["disks"]:
                del disk["result"]
            repo.write_commit(server_id, run["id"], commit)
        repo.delete_server(server_id)
    finally:
        app.close()
    assert not [k for k in objects(moto, env.bucket) if "/servers/" in k]
    lose_state(env, store_key(env))

    proc = env.cli("state", "rebuild")
    assert proc.returncode == 0, proc.stderr
    assert f"server {server_id} has no server record in the store" in proc.stdout
    rebuilt = env.cli_json("runs", server_id)
    assert [(r["id"], r["server_id"], r["state"], r["type"]) for r in rebuilt] == [
        (r["id"], server_id, "COMPLETED", "UNKNOWN") for r in before
    ]
    for run, original in zip(rebuilt, before, strict=True):
        started = dt.datetime.fromisoformat(run["started_at"].replace("Z", "+00:00"))
        then = dt.datetime.fromisoformat(original["started_at"].replace("Z", "+00:00"))
        assert abs((started - then).total_seconds()) < 5  # from the run id
    # mode and reason from the manifests' stats, changeIds and chains from the manifests
    assert [
        (d["mode"], d["reason"], d["chain"], d["change_id_to"]) for r in rebuilt for d in r["disks"]
    ] == [
        (d["mode"], d["reason"], d["chain"], d["change_id_to"]) for r in before for d in r["disks"]
    ]
    assert [d["chain"] for r in rebuilt for d in r["disks"]] == [0, 1]
    for i, run in enumerate(rebuilt):
        out = tmp_path / f"old-{i}.img"
        assert restore_cli(env, server_id, run["id"], key, out) == expected[i]
    # the VM itself is not known by that id: its next run starts a new server
    write_blocks(vcsim, uuid, key, {3: b"w" * MiB})
    run2 = env.cli_json("replicate", name)
    assert run2["server_id"] != server_id
    assert run2["disks"][0]["mode"] == "allocated"
    assert restore_cli(env, name, run2["id"], key, tmp_path / "new.img") == disk_sha(
        vcsim, uuid, key
    )


def test_with_the_store_unreachable_a_command_goes_on_and_says_to_rebuild_later(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    proxy = TcpProxy("127.0.0.1", moto.port)  # down: connections are refused
    env = write_config(
        tmp_path / "c",
        vcsim,
        moto,
        s3_bucket,
        s3={"endpoint_url": f"https://127.0.0.1:{proxy.port}"},
    )
    try:
        name = "rebuild-s3-down"
        vcsim.add_vm(name, [8 * MiB])
        proc = env.cli("vms")
        assert proc.returncode == 0, proc.stderr
        assert name in proc.stdout
        assert "the replica store cannot be reached to rebuild it from" in proc.stderr
        assert "run `connector state rebuild` once it can" in proc.stderr
        # the explicit rebuild needs the store: it fails and says why
        (state_dir(env) / "store.key").write_bytes(base64.b64encode(os.urandom(32)))
        proc = env.cli("state", "rebuild")
        assert proc.returncode == 1
        assert "cannot reach the S3 endpoint" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        proxy.down()


def test_a_kms_store_rebuilds_with_kms_access_and_not_with_the_key_disabled(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    kms = moto.boto3_client("kms")
    key_id = kms.create_key(Description="rebuild test")["KeyMetadata"]["KeyId"]
    env = write_config(
        tmp_path / "c", vcsim, moto, s3_bucket, extra=f'[store]\nkms_key_id = "{key_id}"\n'
    )
    name = "rebuild-kms"
    uuid = vcsim.add_vm(name, [8 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    write_blocks(vcsim, uuid, key, {4: b"k" * MiB})
    env.cli("replicate", name, check=True)
    (run,) = env.cli_json("runs", name)
    lose_state(env)  # nothing to put back: the key is in KMS

    kms.disable_key(KeyId=key_id)
    try:
        proc = env.cli("state", "rebuild")
        assert proc.returncode == 1
        assert "is disabled" in proc.stderr and "Traceback" not in proc.stderr
        assert state_runs(env) == [] and catalog(env) == []
    finally:
        kms.enable_key(KeyId=key_id)
    env.cli("state", "rebuild", check=True)
    out = tmp_path / "kms.img"
    assert restore_cli(env, name, run["id"], key, out) == disk_sha(vcsim, uuid, key)
