"""A committed run whose manifest is gone or damaged, over the fakes: the next run reads
that disk in full (recorded with the reason) and restores exact; purge deletes nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from connector.adapters.state import StateStore
from connector.errors import IntegrityError, NotFoundError
from connector.fakes import FakeDiskSource, FakeHypervisor, MemoryObjectStore
from connector.pipeline.context import PipelineSettings
from connector.pipeline.purge import drop_run, purge
from connector.pipeline.restore import restore_disk
from connector.store.keys import LocalKeyProvider, generate_key_file
from connector.store.repository import Repository, commit_key, manifest_key
from tests.harness.pipeline import replicator
from tests.unit.fake_store import HookedObjects

MiB = 1024 * 1024


@pytest.fixture
def env(tmp_path: Path):
    hv = FakeHypervisor(page=2)
    objects = HookedObjects(MemoryObjectStore())
    generate_key_file(tmp_path / "key")
    provider = LocalKeyProvider(tmp_path / "key")
    state = StateStore.at_path(tmp_path / "state.db")
    rep = replicator(
        hv,
        FakeDiskSource(hv),
        lambda: Repository.open(objects, provider, create=True),
        state,
        PipelineSettings(pack_size=4 * MiB),
    )
    return hv, objects, provider, state, rep


def sha(hv: FakeHypervisor, uuid: str, key: int) -> str:
    return hashlib.sha256(hv.vms[uuid].disks[key].data).hexdigest()


def restored(objects, provider, run, key: int, path: Path) -> str:
    repo = Repository.open(objects, provider)
    return restore_disk(repo, run.server_id, run.id, key, path).sha256


@pytest.mark.parametrize("damage", ["deleted", "flipped"])
def test_the_next_run_reads_a_disk_in_full_when_its_base_manifest_cannot_be_read(
    env, tmp_path: Path, damage: str
) -> None:
    hv, objects, provider, _state, rep = env
    uuid = hv.add_vm("lost", [8 * MiB, 8 * MiB])
    hv.write(uuid, 2000, 3 * MiB, b"a" * 9000)
    hv.write(uuid, 2001, 1 * MiB, b"b" * 9000)
    rep.replicate(uuid)
    hv.write(uuid, 2000, 5 * MiB, b"c" * 9000)
    second = rep.replicate(uuid)
    assert [d.mode for d in second.disks] == ["incremental", "incremental"]
    key = manifest_key(second.server_id, second.id, 2000)
    if damage == "deleted":
        objects.delete(key)
    else:
        blob = bytearray(objects.get(key))
        blob[40] ^= 1
        objects.put(key, bytes(blob))
    hv.write(uuid, 2000, 6 * MiB, b"d" * 9000)
    hv.write(uuid, 2001, 2 * MiB, b"e" * 9000)
    third = rep.replicate(uuid)
    assert third.state == "COMPLETED", third.error
    by_key = {d.disk_key: d for d in third.disks}
    assert by_key[2000].mode == "full"
    assert f"manifest of the previous run {second.id} cannot be read" in (by_key[2000].reason or "")
    assert by_key[2000].bytes_read == 8 * MiB and by_key[2000].chain == 0
    assert by_key[2001].mode == "incremental"  # the readable disk stays incremental
    for k in (2000, 2001):
        assert restored(objects, provider, third, k, tmp_path / f"{k}.img") == sha(hv, uuid, k)
    # and the run after it builds on the new full manifest again
    hv.write(uuid, 2000, 0, b"f" * 9000)
    fourth = rep.replicate(uuid)
    assert {d.disk_key: d.mode for d in fourth.disks} == {2000: "incremental", 2001: "incremental"}
    assert restored(objects, provider, fourth, 2000, tmp_path / "4.img") == sha(hv, uuid, 2000)


def test_a_manifest_lost_between_plan_and_transfer_makes_a_full_read(env, tmp_path: Path) -> None:
    hv, objects, provider, _state, rep = env
    uuid = hv.add_vm("lost-late", [8 * MiB])
    hv.write(uuid, 2000, 3 * MiB, b"a" * 9000)
    first = rep.replicate(uuid)
    hv.write(uuid, 2000, 5 * MiB, b"c" * 9000)
    locks = []

    def after_put(key: str) -> None:
        # the run's lock is written by validate, then again when transfer starts:
        # that is after the plan was made, before the base map is read
        if key.startswith("locks/"):
            locks.append(key)
            if len(locks) == 2:
                objects.delete(manifest_key(first.server_id, first.id, 2000))

    objects.after_put = after_put
    second = rep.replicate(uuid)
    objects.after_put = None
    assert len(locks) == 2
    (disk,) = second.disks
    assert disk.mode == "full" and first.id in (disk.reason or "")
    assert restored(objects, provider, second, 2000, tmp_path / "d.img") == sha(hv, uuid, 2000)


def test_purge_deletes_nothing_while_a_committed_runs_manifest_is_missing(
    env, tmp_path: Path
) -> None:
    hv, objects, provider, state, rep = env
    uuid = hv.add_vm("purge-lost", [8 * MiB, 8 * MiB])
    runs = []
    for i in range(3):
        hv.write(uuid, 2000, i * MiB, bytes([i + 1]) * 9000)
        hv.write(uuid, 2001, i * MiB, bytes([i + 7]) * 9000)
        runs.append(rep.replicate(uuid))
    sid = runs[0].server_id
    repo = Repository.open(objects, provider)
    # the oldest run's manifest gone (the base of the later runs' chains)
    base = manifest_key(sid, runs[0].id, 2001)
    saved = objects.get(base)
    objects.delete(base)
    before = dict(objects.objects)
    with pytest.raises(IntegrityError) as caught:
        purge(repo, state, {sid: 1})
    message = str(caught.value)
    assert f"committed run {runs[0].id}" in message and "no manifest for disk 2001" in message
    assert "nothing was deleted" in message and "--drop-run" in message
    assert objects.objects == before
    objects.put(base, saved)
    # the newest run's own manifest gone
    objects.delete(manifest_key(sid, runs[2].id, 2001))
    before = dict(objects.objects)
    with pytest.raises(IntegrityError) as caught:
        purge(repo, state, {sid: 1})
    message = str(caught.value)
    assert f"committed run {runs[2].id}" in message and "no manifest for disk 2001" in message
    assert objects.objects == before
    assert {r.state for r in state.runs(sid)} == {"COMPLETED"}
    # dropping the lost run lets purge go on; the kept run restores exact
    drop_run(repo, state, sid, runs[2].id)
    report = purge(repo, state, {sid: 1})
    assert report.retention[0].kept == [runs[1].id]
    states = {r.id: r.state for r in state.runs(sid)}
    assert states == {runs[0].id: "DELETED", runs[1].id: "COMPLETED", runs[2].id: "DELETED"}
    assert restored(objects, provider, runs[1], 2000, tmp_path / "k.img")
    # the next run builds on no dropped run: both disks in full; it restores exact
    hv.write(uuid, 2001, 7 * MiB, b"z" * 9000)
    nxt = rep.replicate(uuid)
    assert {d.disk_key: d.mode for d in nxt.disks} == {2000: "full", 2001: "full"}
    assert all("no run record in the store any more" in (d.reason or "") for d in nxt.disks)
    for k in (2000, 2001):
        assert restored(objects, provider, nxt, k, tmp_path / f"n{k}.img") == sha(hv, uuid, k)


def test_purge_stops_on_a_damaged_run_record_and_drop_run_needs_a_committed_run(env) -> None:
    hv, objects, provider, state, rep = env
    uuid = hv.add_vm("purge-record", [8 * MiB])
    runs = []
    for i in range(2):
        hv.write(uuid, 2000, i * MiB, bytes([i + 1]) * 9000)
        runs.append(rep.replicate(uuid))
    sid = runs[0].server_id
    record = commit_key(sid, runs[0].id)
    blob = bytearray(objects.get(record))
    blob[30] ^= 1
    objects.put(record, bytes(blob))
    before = dict(objects.objects)
    repo = Repository.open(objects, provider)
    with pytest.raises(IntegrityError) as caught:
        purge(repo, state, {sid: 1})
    message = str(caught.value)
    assert f"the run record of run {runs[0].id}" in message and "cannot be read" in message
    assert "nothing was deleted" in message and "--drop-run" in message
    assert objects.objects == before
    with pytest.raises(NotFoundError) as gone:
        drop_run(repo, state, sid, "r-20260101T000000000Z-00000000")
    assert "has no run record in the store" in str(gone.value)
    # a dry run changes nothing
    assert drop_run(repo, state, sid, runs[0].id, dry_run=True).deleted == [runs[0].id]
    assert objects.objects == before
    drop_run(repo, state, sid, runs[0].id)
    assert purge(repo, state, {sid: 1}).retention[0].kept == [runs[1].id]
