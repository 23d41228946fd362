"""The whole pipeline against the in-memory fakes: fast checks of the core logic."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from connector.adapters.state import StateStore
from connector.errors import IntegrityError, UnsupportedSourceError
from connector.fakes import FakeDiskSource, FakeHypervisor, MemoryObjectStore
from connector.pipeline.context import PipelineSettings
from connector.pipeline.replicate import RunStopped
from connector.pipeline.restore import restore_disk
from connector.store.keys import LocalKeyProvider, generate_key_file
from connector.store.repository import Repository
from tests.harness.pipeline import replicator

MiB = 1024 * 1024


@pytest.fixture
def env(tmp_path: Path):
    hv = FakeHypervisor(page=2)
    objects = MemoryObjectStore()
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


def scatter(hv: FakeHypervisor, uuid: str, key: int, rng: random.Random, n: int) -> None:
    cap = hv.vms[uuid].disks[key].capacity
    for _ in range(n):
        off = rng.randrange(0, cap - 70000)
        hv.write(uuid, key, off, rng.randbytes(rng.randrange(1, 70000)))


def restore_sha(objects, provider, state, run, key, tmp_path: Path) -> str:
    repo = Repository.open(objects, provider)
    out = tmp_path / f"{run.id}-{key}.img"
    return restore_disk(repo, run.server_id, run.id, key, out).sha256


def test_full_then_incremental_runs_restore_exactly(env, tmp_path):
    hv, objects, provider, state, rep = env
    rng = random.Random(7)
    uuid = hv.add_vm("web", [16 * MiB, 40 * MiB + 4096])
    expected = []
    runs = []
    for round_ in range(3):
        for key in (2000, 2001):
            scatter(hv, uuid, key, rng, 6)
        expected.append(
            {k: hashlib.sha256(d.data).hexdigest() for k, d in hv.vms[uuid].disks.items()}
        )
        runs.append(rep.replicate(uuid))
        assert runs[-1].state == "COMPLETED"
        assert hv.vms[uuid].snapshots == {}
    assert [d.mode for d in runs[0].disks] == ["allocated", "allocated"]
    assert [d.mode for d in runs[1].disks] == ["incremental", "incremental"]
    for run, exp in zip(runs, expected, strict=True):
        for key in (2000, 2001):
            assert restore_sha(objects, provider, state, run, key, tmp_path) == exp[key]
    # incremental runs read at most the changed extents widened to whole blocks
    for d in runs[2].disks:
        assert d.bytes_read <= d.bytes_changed + 2 * MiB * 6
        assert d.bytes_read < d.capacity


def test_refused_change_id_reads_the_allocated_areas_in_full(env, tmp_path):
    hv, objects, provider, state, rep = env
    uuid = hv.add_vm("db", [8 * MiB])
    hv.write(uuid, 2000, 5 * MiB, b"x" * 5000)
    rep.replicate(uuid)
    hv.write(uuid, 2000, 1 * MiB, b"y" * 5000)
    hv.vms[uuid].disks[2000].refuse = "FileFault"
    run = rep.replicate(uuid)
    disk = run.disks[0]
    assert disk.mode == "allocated" and "FileFault" in (disk.reason or "")
    assert disk.change_id_from == "*"
    assert disk.bytes_read == 2 * MiB  # the two allocated blocks, not the 8 MiB capacity
    exp = hashlib.sha256(hv.vms[uuid].disks[2000].data).hexdigest()
    assert restore_sha(objects, provider, state, run, 2000, tmp_path) == exp


def test_refused_allocated_areas_too_read_the_whole_disk(env, tmp_path):
    hv, objects, provider, state, rep = env
    uuid = hv.add_vm("db", [8 * MiB])
    hv.write(uuid, 2000, 5 * MiB, b"x" * 5000)
    rep.replicate(uuid)
    hv.write(uuid, 2000, 1 * MiB, b"y" * 5000)
    hv.vms[uuid].disks[2000].refuse_all = "FileFault"
    run = rep.replicate(uuid)
    disk = run.disks[0]
    assert disk.mode == "full" and "allocated areas refused (FileFault)" in (disk.reason or "")
    assert disk.bytes_read == 8 * MiB
    exp = hashlib.sha256(hv.vms[uuid].disks[2000].data).hexdigest()
    assert restore_sha(objects, provider, state, run, 2000, tmp_path) == exp


def test_foreign_snapshot_is_refused_before_anything_changes(env):
    hv, objects, _provider, _state, rep = env
    uuid = hv.add_vm("app", [4 * MiB])
    hv.create_snapshot(uuid, "before-upgrade", "")
    with pytest.raises(UnsupportedSourceError, match="already has snapshots"):
        rep.replicate(uuid)
    assert objects.objects == {}
    assert [s[0] for s in hv.vms[uuid].snapshots.values()] == ["before-upgrade"]


def test_leftover_snapshot_of_ours_is_swept(env):
    hv, _objects, _provider, _state, rep = env
    uuid = hv.add_vm("app", [4 * MiB])
    hv.create_snapshot(uuid, "connector-r-old", "")
    run = rep.replicate(uuid)
    assert run.state == "COMPLETED"
    assert hv.vms[uuid].snapshots == {}


def test_failure_removes_the_snapshot_and_records_the_reason(env):
    hv, objects, _provider, state, rep = env
    uuid = hv.add_vm("app", [4 * MiB])
    hv.write(uuid, 2000, 0, b"z" * 100)

    class Boom(Exception):
        pass

    def broken_put(key: str, data: bytes) -> None:
        if key.startswith("packs/"):
            raise Boom("store is gone")
        objects.objects[key] = data

    objects.put = broken_put
    with pytest.raises(Boom):
        rep.replicate(uuid)
    assert hv.vms[uuid].snapshots == {}
    (run,) = state.runs()
    assert run.state == "FAILED" and "store is gone" in (run.error or "")
    assert not any(k.startswith("runs/") for k in objects.objects)


@pytest.mark.parametrize("reads_in_flight", [1, 4])
def test_a_stop_between_reads_rolls_the_run_back_with_its_reason(env, tmp_path, reads_in_flight):
    hv, objects, provider, state, rep = env
    uuid = hv.add_vm("app", [8 * MiB])
    hv.write(uuid, 2000, 0, random.Random(4).randbytes(6 * MiB))
    reads = 0
    real_open = rep.ctx.source.open

    def counting_open(*args):
        reader = real_open(*args)
        read = reader.read

        def counted(offset: int, length: int) -> bytes:
            nonlocal reads
            reads += 1
            data: bytes = read(offset, length)
            return data

        reader.read = counted
        return reader

    rep.ctx.source.open = counting_open
    rep.ctx.settings.max_read = MiB
    rep.ctx.settings.reads_in_flight = reads_in_flight
    rep.ctx.should_stop = lambda: reads >= 2
    rep.ctx.stop_reason = lambda: "stopped by SIGTERM"
    with pytest.raises(RunStopped) as stopped:
        rep.replicate(uuid)
    # The stop is seen when the read that asked for it is packed; the reads already in
    # flight by then are dropped, and no more are made.
    if reads_in_flight == 1:
        assert reads == 2
    else:
        assert 2 <= reads <= 2 + reads_in_flight
    assert stopped.value.run.state == "FAILED"
    assert stopped.value.run.error == "stopped by SIGTERM"
    assert hv.vms[uuid].snapshots == {}
    assert not any(k.startswith("runs/") for k in objects.objects)
    rep.ctx.should_stop = lambda: False
    run = rep.replicate(uuid)
    assert run.state == "COMPLETED"
    expected = hashlib.sha256(hv.vms[uuid].disks[2000].data).hexdigest()
    assert restore_sha(objects, provider, state, run, 2000, tmp_path) == expected


def test_flipped_byte_in_a_pack_is_refused_on_restore(env, tmp_path):
    hv, objects, provider, state, rep = env
    uuid = hv.add_vm("app", [4 * MiB])
    hv.write(uuid, 2000, 0, b"secret data " * 1000)
    run = rep.replicate(uuid)
    (pack,) = [k for k in objects.objects if k.startswith("packs/")]
    data = bytearray(objects.objects[pack])
    data[40] ^= 1
    objects.objects[pack] = bytes(data)
    with pytest.raises(IntegrityError, match="block 0 of run"):
        restore_sha(objects, provider, state, run, 2000, tmp_path)
    assert not (tmp_path / f"{run.id}-2000.img").exists()


def test_no_plaintext_in_the_store(env):
    hv, objects, _provider, _state, rep = env
    uuid = hv.add_vm("payroll-server", [4 * MiB])
    hv.write(uuid, 2000, 12345, b"DISTINCTIVE-PLAINTEXT-MARKER" * 10)
    rep.replicate(uuid)
    for key, data in objects.objects.items():
        assert b"DISTINCTIVE-PLAINTEXT-MARKER" not in data
        assert b"payroll-server" not in data
        assert "payroll" not in key
