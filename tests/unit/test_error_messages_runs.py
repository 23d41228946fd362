"""Error paths of damaged manifests (a Merkle root that does not match, a chain that
loops) in restore, reads and purge, and of a run without its snapshot, each
with the message the troubleshooting guide documents."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from connector.domain.jobs import ON_DEMAND
from connector.domain.records import new_run_id
from connector.errors import IntegrityError, PermanentError, StoreFormatError
from connector.fakes import FakeDiskSource
from connector.pipeline import cleanup, commit, snapshot, validate
from connector.pipeline.context import RunRef
from connector.pipeline.purge import apply_retention, purge
from connector.pipeline.restore import restore_disk
from tests.harness.pipeline import stage_context
from tests.unit.fake_store import Env, MiB, make_env


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def one_run(env: Env, name: str) -> tuple[str, str]:
    uuid = env.hv.add_vm(name, [4 * MiB])
    env.write_blocks(uuid, {0: random.Random(9).randbytes(MiB)})
    run = env.replicate(uuid)
    return run.server_id, run.id


def test_a_manifest_whose_merkle_root_does_not_match_is_not_restored(
    env: Env, tmp_path: Path
) -> None:
    server_id, run_id = one_run(env, "merkle")
    repo = env.repo()
    manifest = repo.read_manifest(server_id, run_id, 2000)
    repo.write_manifest(dataclasses.replace(manifest, merkle_root=bytes(32)))
    with pytest.raises(IntegrityError) as info:
        restore_disk(env.repo(), server_id, run_id, 2000, tmp_path / "out.img")
    assert str(info.value) == (
        f"the block map of run {run_id} disk 2000 does not match its Merkle root"
    )
    assert not (tmp_path / "out.img").exists()


def test_a_manifest_chain_that_loops_is_named_and_purge_deletes_nothing(env: Env) -> None:
    server_id, run_id = one_run(env, "loop")
    repo = env.repo()
    manifest = repo.read_manifest(server_id, run_id, 2000)
    looped = dataclasses.replace(manifest, base_run=run_id)
    repo.write_manifest(looped)
    with pytest.raises(StoreFormatError, match="manifest chain of disk 2000 loops"):
        env.repo().resolve_map(looped)
    before = set(env.objects.objects)
    with pytest.raises(IntegrityError) as info:
        purge(env.repo(), env.state, {server_id: 0})
    assert str(info.value) == f"the manifest chain of run {run_id} loops"
    assert set(env.objects.objects) == before


def test_a_run_without_a_recorded_snapshot_cannot_go_on(env: Env) -> None:
    ctx = stage_context(env.hv, FakeDiskSource(env.hv), env.repo, env.state)
    run_id = "r-20260101T000000000Z-00000000"
    with pytest.raises(PermanentError) as info:
        ctx.run_snapshot(run_id)
    assert str(info.value) == f"run {run_id} has no recorded snapshot; it cannot go on"


def test_retention_deletes_nothing_when_a_kept_runs_manifest_is_damaged(env: Env) -> None:
    uuid = env.hv.add_vm("retention", [4 * MiB])
    env.write_blocks(uuid, {0: random.Random(1).randbytes(MiB)})
    first = env.replicate(uuid)
    env.write_blocks(uuid, {1: random.Random(2).randbytes(MiB)})
    second = env.replicate(uuid)
    (key,) = [k for k in env.objects.objects if f"/{second.id}/disk-" in k]
    env.objects.objects[key] = b"cut"  # shorter than a nonce: a truncated object
    before = set(env.objects.objects)
    with pytest.raises(IntegrityError) as info:
        apply_retention(env.repo(), env.state, first.server_id, 1)
    assert str(info.value) == (
        f"retention stopped, nothing was deleted: the manifest of run {second.id} disk 2000 "
        f"cannot be read (manifest {key} failed authentication (damaged or altered)); run "
        "`connector verify`"
    )
    assert set(env.objects.objects) == before


def test_a_run_that_reaches_commit_without_a_disks_manifest_is_not_committed(env: Env) -> None:
    uuid = env.hv.add_vm("commit", [4 * MiB])
    ctx = dataclasses.replace(env.rep.ctx, _repo=None)
    vm = ctx.hv.get_vm(uuid)
    server = ctx.catalog.upsert_server(vm)
    run_id = new_run_id()
    ctx.runs.create_run(run_id, server.id, ON_DEMAND)
    ref = RunRef(run_id, server.id, vm.uuid)
    validate.run(ctx, ref)
    snapshot.run(ctx, ref)  # and no transfer: no disk has its manifest
    try:
        with pytest.raises(PermanentError) as info:
            commit.run(ctx, ref)
    finally:
        cleanup.run(ctx, ref)
    assert str(info.value) == (f"run {run_id} reached commit without the manifests of disks [2000]")
    assert not ctx.committed(run_id)
    assert ctx.hv.get_vm(uuid).snapshots == ()
