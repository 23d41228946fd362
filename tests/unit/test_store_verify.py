"""`verify` on the in-memory fakes: every kind of fault is found and named."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from connector.adapters.state import RunRow
from connector.domain.manifest import BlockRef
from connector.pipeline.verify import verify_store
from connector.store.repository import commit_key, manifest_key, pack_key
from tests.unit.fake_store import Env, MiB, make_env


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def three_runs(env: Env) -> tuple[str, list[RunRow]]:
    """Run 1: blocks 0-1. Run 2: block 3 (its own pack). Run 3: block 3 again, changed."""
    rng = random.Random(21)
    uuid = env.hv.add_vm("db", [8 * MiB + 4096])
    runs = []
    for indices in ((0, 1), (3,), (3,)):
        env.write_blocks(uuid, {i: rng.randbytes(MiB) for i in indices})
        runs.append(env.replicate(uuid))
    return uuid, runs


def ref_of(env: Env, run, index: int) -> BlockRef:
    repo = env.repo()
    full = repo.resolve_map(repo.read_manifest(run.server_id, run.id, 2000))
    ref = full[index]
    assert ref is not None
    return ref


def flip(env: Env, key: str, offset: int) -> None:
    data = bytearray(env.objects.objects[key])
    data[offset] ^= 0x01
    env.objects.objects[key] = bytes(data)


def test_a_sound_store_verifies(env: Env) -> None:
    _uuid, runs = three_runs(env)
    server = runs[0].server_id
    for deep in (False, True):
        report = verify_store(env.repo(), {server: None}, deep=deep)
        assert report.ok, report.faults
        assert report.runs == 3 and report.disks == 3
        assert report.blocks == 2 + 3 + 3  # every block of every run's map
        assert report.blobs == 4  # each stored blob is read once
        assert report.bytes_read > 4 * MiB


def test_a_flipped_byte_names_the_run_disk_block_and_pack(env: Env) -> None:
    _uuid, runs = three_runs(env)
    server = runs[0].server_id
    bad = ref_of(env, runs[1], 3)
    flip(env, pack_key(bad.pack_id), bad.offset + 100)
    for deep in (False, True):
        report = verify_store(env.repo(), {server: None}, deep=deep)
        blocks = [f for f in report.faults if f.block is not None]
        assert [(f.run_id, f.disk_key, f.block, f.pack_id) for f in blocks] == [
            (runs[1].id, 2000, 3, bad.pack_id)
        ]
        assert "authentication" in blocks[0].reason
        if deep:  # the root over the stored data is wrong for that run only
            (root,) = [f for f in report.faults if f.block is None]
            assert root.run_id == runs[1].id and "Merkle" in root.reason
    # runs 1 and 3 are sound
    assert verify_store(env.repo(), {server: [runs[0].id, runs[2].id]}).ok


def test_a_damaged_blob_shared_by_runs_is_a_fault_of_each(env: Env) -> None:
    _uuid, runs = three_runs(env)
    shared = ref_of(env, runs[0], 0)  # block 0 is in every run's map
    flip(env, pack_key(shared.pack_id), shared.offset + shared.length - 1)
    report = verify_store(env.repo(), {runs[0].server_id: None})
    assert sorted((f.run_id, f.block) for f in report.faults) == sorted((r.id, 0) for r in runs)


def test_a_missing_pack_is_reported(env: Env) -> None:
    _uuid, runs = three_runs(env)
    gone = ref_of(env, runs[2], 3)
    del env.objects.objects[pack_key(gone.pack_id)]
    report = verify_store(env.repo(), {runs[0].server_id: None})
    assert [(f.run_id, f.block) for f in report.faults] == [(runs[2].id, 3)]
    assert "missing" in report.faults[0].reason


def test_a_truncated_pack_is_reported(env: Env) -> None:
    _uuid, runs = three_runs(env)
    ref = ref_of(env, runs[1], 3)
    key = pack_key(ref.pack_id)
    env.objects.objects[key] = env.objects.objects[key][: ref.offset + 10]
    report = verify_store(env.repo(), {runs[0].server_id: [runs[1].id]})
    assert [(f.run_id, f.block) for f in report.faults] == [(runs[1].id, 3)]
    assert "truncated" in report.faults[0].reason


def test_damaged_manifests_and_run_records_are_reported(env: Env) -> None:
    _uuid, runs = three_runs(env)
    server = runs[0].server_id
    flip(env, manifest_key(server, runs[2].id, 2000), 40)
    flip(env, commit_key(server, runs[1].id), 20)
    report = verify_store(env.repo(), {server: None})
    by_run = {f.run_id: f for f in report.faults}
    assert set(by_run) == {runs[1].id, runs[2].id}
    assert by_run[runs[1].id].disk_key is None and "run record" in by_run[runs[1].id].reason
    assert by_run[runs[2].id].disk_key == 2000
    assert "manifest" in by_run[runs[2].id].reason
    assert "authentication" in by_run[runs[2].id].reason


def test_a_missing_base_manifest_breaks_the_chain(env: Env) -> None:
    _uuid, runs = three_runs(env)
    server = runs[0].server_id
    del env.objects.objects[manifest_key(server, runs[0].id, 2000)]
    report = verify_store(env.repo(), {server: [runs[2].id]})
    (fault,) = report.faults
    assert fault.run_id == runs[2].id and "chain is broken" in fault.reason
    assert runs[0].id in fault.reason


def test_only_deep_finds_a_blob_that_authenticates_but_holds_other_data(env: Env) -> None:
    """A blob sealed with the right id but other content: only re-hashing finds it."""
    _uuid, runs = three_runs(env)
    repo = env.repo()
    ref = ref_of(env, runs[2], 3)
    forged = repo.keys.seal(random.Random(99).randbytes(MiB), ref.block_id)
    assert len(forged) == ref.length  # incompressible data: same sealed size
    key = pack_key(ref.pack_id)
    data = env.objects.objects[key]
    env.objects.objects[key] = data[: ref.offset] + forged + data[ref.offset + ref.length :]
    assert verify_store(repo, {runs[0].server_id: None}).ok
    deep = verify_store(repo, {runs[0].server_id: None}, deep=True)
    blocks = [f for f in deep.faults if f.block is not None]
    assert [(f.run_id, f.block) for f in blocks] == [(runs[2].id, 3)]
    assert "does not match its block id" in blocks[0].reason


def test_a_run_that_is_not_committed_is_a_fault(env: Env) -> None:
    _uuid, runs = three_runs(env)
    report = verify_store(env.repo(), {runs[0].server_id: ["r-20000101T000000000Z-00000000"]})
    (fault,) = report.faults
    assert "not committed" in fault.reason
