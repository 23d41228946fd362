"""Disks without changed block tracking: hash comparison with the previous run's
map, and skipping what the reader reports as unallocated (fakes, fast)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from connector.adapters.state import StateStore
from connector.domain.extents import merge
from connector.domain.model import DiskInfo, Extent, SnapshotInfo, VmInfo
from connector.fakes import FakeDiskReader, FakeDiskSource, FakeHypervisor, MemoryObjectStore
from connector.pipeline.changes import DiskPlan, skip_unallocated
from connector.pipeline.context import PipelineSettings
from connector.pipeline.replicate import Replicator
from connector.pipeline.restore import restore_disk
from connector.store.keys import LocalKeyProvider, generate_key_file
from connector.store.repository import Repository
from tests.harness.pipeline import replicator

MiB = 1024 * 1024


class SparseReader(FakeDiskReader):
    """A fake reader that also knows which 64 KiB areas hold data."""

    def allocated_extents(self) -> list[Extent] | None:
        step = 64 * 1024
        return merge(
            Extent(o, min(step, len(self.data) - o))
            for o in range(0, len(self.data), step)
            if any(self.data[o : o + step])
        )


class SparseSource(FakeDiskSource):
    def open(self, vm: VmInfo, snapshot: SnapshotInfo, disk: DiskInfo) -> FakeDiskReader:
        frozen = self.hv.vms[vm.uuid].snapshots[snapshot.ref][1][disk.key]
        reader = SparseReader(frozen)
        self.readers.append(reader)
        return reader


@pytest.fixture
def env(tmp_path: Path):
    hv = FakeHypervisor()
    objects = MemoryObjectStore()
    generate_key_file(tmp_path / "key")
    provider = LocalKeyProvider(tmp_path / "key")
    state = StateStore.at_path(tmp_path / "state.db")

    def make(source: FakeDiskSource) -> Replicator:
        return replicator(
            hv,
            source,
            lambda: Repository.open(objects, provider, create=True),
            state,
            PipelineSettings(enable_cbt=False, pack_size=4 * MiB),
        )

    return hv, objects, provider, make


def restored(objects, provider, run, key: int, path: Path) -> str:
    repo = Repository.open(objects, provider)
    return restore_disk(repo, run.server_id, run.id, key, path).sha256


def test_runs_without_cbt_store_only_blocks_whose_hash_changed(env, tmp_path):
    hv, objects, provider, make = env
    rep = make(FakeDiskSource(hv))
    uuid = hv.add_vm("kvm", [16 * MiB + 4096])
    hv.vms[uuid].disks[2000].cbt = False
    disk = hv.vms[uuid].disks[2000]
    hv.write(uuid, 2000, 0, b"a" * (5 * MiB))
    hv.write(uuid, 2000, 16 * MiB, b"tail" * 1024)  # the short last block
    run1 = rep.replicate(uuid)
    exp1 = hashlib.sha256(disk.data).hexdigest()
    # run 2: two blocks change, one non-zero block becomes zero
    hv.write(uuid, 2000, 1 * MiB + 10, b"b" * 100)
    hv.write(uuid, 2000, 16 * MiB, b"TAIL")
    hv.write(uuid, 2000, 4 * MiB, bytes(MiB))
    run2 = rep.replicate(uuid)
    exp2 = hashlib.sha256(disk.data).hexdigest()
    # run 3: nothing changes
    run3 = rep.replicate(uuid)
    (d1,), (d2,), (d3,) = run1.disks, run2.disks, run3.disks
    assert (d1.mode, d2.mode, d3.mode) == ("full", "compare", "compare")
    assert run1.id in (d2.reason or "") and run2.id in (d3.reason or "")
    # every run reads the whole disk, but stores only what changed
    assert d1.bytes_read == d2.bytes_read == d3.bytes_read == disk.capacity
    assert d1.blocks_new == 2  # "aaaa..." blocks deduplicate to one, plus the tail
    assert d2.blocks_new == 2 and d2.bytes_changed == 2 * MiB + 4096
    assert d3.blocks_new == 0 and d3.bytes_changed == 0 and d3.bytes_uploaded == 0
    repo = Repository.open(objects, provider)
    manifest2 = repo.read_manifest(run2.server_id, run2.id, 2000)
    assert manifest2.base_run == run1.id
    assert sorted(manifest2.entries) == [1, 4, 16]
    assert manifest2.entries[4] is None
    assert restored(objects, provider, run1, 2000, tmp_path / "1.img") == exp1
    assert restored(objects, provider, run2, 2000, tmp_path / "2.img") == exp2
    assert restored(objects, provider, run3, 2000, tmp_path / "3.img") == exp2


def test_a_resized_disk_without_cbt_is_read_in_full_again(env, tmp_path):
    hv, objects, provider, make = env
    rep = make(FakeDiskSource(hv))
    uuid = hv.add_vm("kvm", [4 * MiB])
    disk = hv.vms[uuid].disks[2000]
    disk.cbt = False
    hv.write(uuid, 2000, 0, b"x" * 100)
    rep.replicate(uuid)
    disk.capacity = 6 * MiB
    disk.data.extend(bytes(2 * MiB))
    hv.write(uuid, 2000, 5 * MiB, b"y" * 100)
    run = rep.replicate(uuid)
    assert run.disks[0].mode == "full"
    exp = hashlib.sha256(disk.data).hexdigest()
    assert restored(objects, provider, run, 2000, tmp_path / "r.img") == exp


def test_unallocated_ranges_are_not_read_and_vanished_data_becomes_zero(env, tmp_path):
    hv, objects, provider, make = env
    rep = make(SparseSource(hv))
    uuid = hv.add_vm("kvm", [32 * MiB])
    disk = hv.vms[uuid].disks[2000]
    disk.cbt = False
    hv.write(uuid, 2000, 3 * MiB, b"q" * 1000)
    hv.write(uuid, 2000, 20 * MiB + 5, b"r" * 1000)
    run1 = rep.replicate(uuid)
    assert run1.disks[0].bytes_read == 2 * MiB
    assert "unallocated bytes skipped" in (run1.disks[0].reason or "")
    # the data at 3 MiB is discarded (the range becomes unallocated), new data appears
    hv.write(uuid, 2000, 3 * MiB, bytes(1000))
    hv.write(uuid, 2000, 9 * MiB, b"s" * 10)
    run2 = rep.replicate(uuid)
    (d2,) = run2.disks
    assert d2.mode == "compare" and d2.bytes_read == 2 * MiB
    assert d2.blocks_new == 1
    repo = Repository.open(objects, provider)
    manifest = repo.read_manifest(run2.server_id, run2.id, 2000)
    assert manifest.entries[3] is None and manifest.entries[9] is not None
    assert 20 not in manifest.entries
    exp = hashlib.sha256(disk.data).hexdigest()
    assert restored(objects, provider, run2, 2000, tmp_path / "r.img") == exp


def test_skip_unallocated_leaves_cbt_plans_alone():
    disk = DiskInfo(2000, "d", 8 * MiB, "[ds] d.vmdk", "flat")
    inc = DiskPlan(disk, "incremental", "changed", (Extent(0, 10),), "x/1", "r-1")
    assert skip_unallocated(inc, [Extent(0, 1)]) is inc
    full = DiskPlan(disk, "full", "first", (Extent(0, 8 * MiB),), None, None)
    assert skip_unallocated(full, None) is full
    narrowed = skip_unallocated(full, [Extent(MiB, 10), Extent(7 * MiB, 2 * MiB)])
    assert narrowed.extents == (Extent(MiB, 10), Extent(7 * MiB, MiB))
    assert narrowed.mode == "full" and narrowed.bytes_changed == MiB + 10
