"""Whole runs through the nbd and local transports: real nbdkit and qemu-nbd processes,
real files, the replication pipeline, restores checked byte for byte."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from connector.adapters.local import (
    LocalDiskSource,
    LocalDiskSpec,
    LocalHypervisor,
    LocalVmSpec,
    local_vm_uuid,
)
from connector.adapters.nbd import NbdReader, parse_nbd_uri
from connector.domain.model import DiskInfo, SnapshotInfo, VmInfo
from connector.errors import NotFoundError, PermanentError, TransientError
from connector.retry import RetryPolicy
from tests.harness.nbd import (
    NbdServer,
    need,
    start_nbdkit,
    start_qemu_nbd,
    write_sparse_image,
)
from tests.harness.pipeline import Pipeline, file_sha, make_pipeline

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
GiB = 1024 * MiB
FAST = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.005)


class RecordingSource(LocalDiskSource):
    """The local source, keeping its readers so a test can look at their counters."""

    def __init__(self, hv: LocalHypervisor, **kwargs) -> None:
        super().__init__(hv, **kwargs)
        self.readers: list[object] = []

    def open(self, vm: VmInfo, snapshot: SnapshotInfo, disk: DiskInfo):
        reader = super().open(vm, snapshot, disk)
        self.readers.append(reader)
        return reader


def local_vm(name: str, disk: LocalDiskSpec, **kwargs) -> LocalVmSpec:
    return LocalVmSpec(name=name, uuid=local_vm_uuid(name), disks=(disk,), **kwargs)


def nbd_pipeline(
    tmp_path: Path,
    name: str,
    uri: str,
    retry: RetryPolicy = FAST,
    max_request: int = 8 * MiB,
) -> tuple[Pipeline, RecordingSource, str]:
    spec = local_vm(name, LocalDiskSpec(2000, "disk", nbd=parse_nbd_uri(uri)), quiescent=True)
    hv = LocalHypervisor([spec], tmp_path / "state", retry=FAST)
    source = RecordingSource(hv, retry=retry, max_request=max_request, in_flight=4)
    return make_pipeline(tmp_path / "pipeline", hv, source), source, spec.uuid


def overwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- nbd


@pytest.mark.parametrize("server_kind", ["nbdkit", "qemu-nbd"])
def test_nbd_disk_replicates_and_restores_exactly_reading_only_allocated_data(
    server_kind: str, tmp_path: Path, nbd_servers: list[NbdServer]
) -> None:
    need("nbdkit", "qemu-nbd")
    image = tmp_path / "disk.img"
    # 1 GiB disk holding 64 MiB of data in 16 regions of 4 MiB
    regions = [(i * 61 * MiB + 5 * MiB, 4 * MiB) for i in range(16)]
    write_sparse_image(image, GiB, regions, seed=3)
    start = start_nbdkit if server_kind == "nbdkit" else start_qemu_nbd
    server = start(image, tmp_path / "srv")
    nbd_servers.append(server)
    p, _source, uuid = nbd_pipeline(tmp_path, f"nbd-{server_kind}", server.uri)

    run1 = p.replicator.replicate(uuid)
    assert run1.state == "COMPLETED"
    (d1,) = run1.disks
    assert d1.mode == "full" and d1.capacity == GiB
    assert d1.bytes_read == 64 * MiB  # block status: the 960 MiB of holes are not read
    assert run1.stats["bytes_read"] == 64 * MiB
    assert d1.blocks_new == 64
    expected1 = file_sha(image)
    assert p.restore_sha(run1, 2000, "run1.img") == expected1

    # changes in place: three blocks rewritten, one block of new data in a hole
    rng = random.Random(4)
    for offset in (5 * MiB + 100, 66 * MiB, 860 * MiB + 3):
        overwrite(image, offset, rng.randbytes(1000))
    overwrite(image, 500 * MiB, rng.randbytes(MiB))
    run2 = p.replicator.replicate(uuid)
    (d2,) = run2.disks
    assert d2.mode == "compare"
    assert d2.bytes_read == 65 * MiB  # everything allocated is read and hashed...
    assert d2.blocks_new == 4  # ...and only the changed blocks are stored
    assert d2.bytes_changed == 4 * MiB
    assert p.restore_sha(run2, 2000, "run2.img") == file_sha(image)


def test_nbd_run_retries_injected_eio_and_restores_exactly(
    tmp_path: Path, nbd_servers: list[NbdServer]
) -> None:
    need("nbdkit")
    image = tmp_path / "disk.img"
    write_sparse_image(image, 64 * MiB, [(0, 24 * MiB), (40 * MiB, 8 * MiB)], seed=5)
    server = start_nbdkit(
        image, tmp_path / "srv", filters=["error"], filter_params=["error=EIO", "error-rate=25%"]
    )
    nbd_servers.append(server)
    # 32 reads of 1 MiB: some fail (all but certainly), none fails 10 times (all but certainly)
    retry = RetryPolicy(attempts=10, base_delay=0.001, max_delay=0.005)
    p, source, uuid = nbd_pipeline(tmp_path, "nbd-flaky", server.uri, retry, max_request=MiB)
    run = p.replicator.replicate(uuid)
    assert run.state == "COMPLETED"
    assert run.disks[0].bytes_read == 32 * MiB
    (reader,) = source.readers
    assert isinstance(reader, NbdReader) and reader.retries > 0
    assert p.restore_sha(run, 2000, "r.img") == file_sha(image)


def test_nbd_run_with_eio_on_every_read_fails_naming_disk_and_offset_and_leaves_nothing(
    tmp_path: Path, nbd_servers: list[NbdServer]
) -> None:
    need("nbdkit")
    image = tmp_path / "disk.img"
    write_sparse_image(image, 32 * MiB, [(8 * MiB, 4 * MiB)], seed=6)
    good = start_nbdkit(image, tmp_path / "srv")
    nbd_servers.append(good)
    p, _source, uuid = nbd_pipeline(tmp_path, "nbd-broken", good.uri)
    first = p.replicator.replicate(uuid)
    overwrite(image, 9 * MiB, b"changed")
    # the same export now fails every read
    good.stop()
    assert good.socket_path is not None
    good.socket_path.unlink()
    bad = start_nbdkit(
        image,
        tmp_path / "srv",
        filters=["error"],
        filter_params=["error=EIO", "error-pread-rate=100%"],
    )
    nbd_servers.append(bad)
    assert bad.socket_path is not None
    bad.socket_path.rename(good.socket_path)
    with pytest.raises(TransientError) as info:
        p.replicator.replicate(uuid)
    message = str(info.value)
    assert "disk 2000 of VM 'nbd-broken'" in message
    assert f"at offset {8 * MiB}" in message and "EIO" in message
    failed = p.state.runs()[-1]
    assert failed.state == "FAILED" and f"at offset {8 * MiB}" in (failed.error or "")
    # nothing of the failed run is visible: no manifest, no commit, the state unchanged
    server_id = failed.server_id
    assert p.object_keys(f"runs/{server_id}/{failed.id}") == []
    assert list(p.repo().committed_runs(server_id)) == [first.id]
    disk_state = p.state.disk_state(server_id, 2000)
    assert disk_state is not None and disk_state.last_run_id == first.id
    with pytest.raises(NotFoundError, match="was not committed"):
        p.restore_sha(failed, 2000, "never.img")
    assert not (tmp_path / "state" / "local-snapshots" / f"{uuid}.json").exists()


# --------------------------------------------------------------------------- local


def test_local_image_three_runs_restore_exactly_and_upload_only_changes(tmp_path: Path) -> None:
    image = tmp_path / "kvm-web.img"
    write_sparse_image(image, 48 * MiB + 8192, [(2 * MiB, 6 * MiB), (30 * MiB, 2 * MiB)], seed=7)
    spec = local_vm("kvm-web", LocalDiskSpec(2000, "vda", path=image), quiescent=True)
    hv = LocalHypervisor([spec], tmp_path / "state", retry=FAST)
    p = make_pipeline(tmp_path / "pipeline", hv, LocalDiskSource(hv, retry=FAST))
    rng = random.Random(8)
    runs, expected = [], []

    runs.append(p.replicator.replicate(spec.uuid))
    expected.append(file_sha(image))
    # run 2: three blocks change, one block is zeroed
    overwrite(image, 2 * MiB + 17, rng.randbytes(300))
    overwrite(image, 5 * MiB, rng.randbytes(MiB))
    overwrite(image, 31 * MiB + 5, rng.randbytes(10))
    overwrite(image, 7 * MiB, bytes(MiB))
    runs.append(p.replicator.replicate(spec.uuid))
    expected.append(file_sha(image))
    # run 3: data in a former hole, and in the short last block
    overwrite(image, 20 * MiB, rng.randbytes(2 * MiB))
    overwrite(image, 48 * MiB + 100, rng.randbytes(50))
    runs.append(p.replicator.replicate(spec.uuid))
    expected.append(file_sha(image))

    d1, d2, d3 = (r.disks[0] for r in runs)
    assert (d1.mode, d2.mode, d3.mode) == ("full", "compare", "compare")
    assert d1.bytes_read == 8 * MiB and d1.blocks_new == 8  # SEEK_DATA: holes are not read
    assert d2.bytes_read == 8 * MiB
    assert d2.blocks_new == 3 and d2.bytes_changed == 4 * MiB  # 3 changed + 1 now zero
    assert d3.blocks_new == 3 and d3.bytes_changed == 2 * MiB + 8192
    for d in (d2, d3):
        assert d.bytes_uploaded < 4 * MiB  # only the changed blocks (random: incompressible)
    repo = p.repo()
    m2 = repo.read_manifest(runs[1].server_id, runs[1].id, 2000)
    assert m2.base_run == runs[0].id and sorted(m2.entries) == [2, 5, 7, 31]
    assert m2.entries[7] is None
    for i, (run, exp) in enumerate(zip(runs, expected, strict=True)):
        assert p.restore_sha(run, 2000, f"run{i}.img") == exp


def test_block_device_is_read_without_allocation_map(tmp_path: Path) -> None:
    """A loop device needs root; the reader's block-device path is the same as a file's
    except for SEEK_DATA, which it does not use. Checked on /dev/zero's size rules."""
    image = tmp_path / "img"
    write_sparse_image(image, 4 * MiB, [(MiB, MiB)])
    from connector.adapters.local import LocalFileReader

    with pytest.raises(PermanentError, match="neither a file nor a block device"):
        LocalFileReader(Path("/dev/null"), description="disk 2000", retry=FAST)
    r = LocalFileReader(image, description="disk 2000", capacity=4 * MiB, retry=FAST)
    try:
        assert r.allocated_extents() is not None
        assert r.read(MiB, 10) == image.read_bytes()[MiB : MiB + 10]
    finally:
        r.close()
    with pytest.raises(PermanentError, match="fewer than the disk's"):
        LocalFileReader(image, description="disk 2000", capacity=5 * MiB, retry=FAST)
    with pytest.raises(NotFoundError, match="does not exist"):
        LocalFileReader(tmp_path / "absent", description="disk 2000", retry=FAST)


# --------------------------------------------------------------------------- hooks


def hook_script(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "hook.sh"
    script.write_text("#!/bin/sh\nset -e\n" + body)
    script.chmod(0o755)
    return [str(script)]


def test_snapshot_hook_freezes_what_is_read_and_release_hook_cleans_up(tmp_path: Path) -> None:
    live = tmp_path / "live.img"
    snap = tmp_path / "snap.img"
    calls = tmp_path / "calls.log"
    write_sparse_image(live, 8 * MiB, [(0, 3 * MiB)], seed=9)
    # the "snapshot": a copy of the live image, as an LVM or ZFS snapshot would be
    snapshot_cmd = hook_script(
        tmp_path,
        f'echo "$CONNECTOR_ACTION $CONNECTOR_VM $CONNECTOR_SNAPSHOT" >> {calls}\n'
        f'if [ "$CONNECTOR_ACTION" = snapshot ]; then cp --sparse=always {live} {snap}; '
        f"else rm -f {snap}; fi\n",
    )
    spec = local_vm(
        "db-01",
        LocalDiskSpec(2000, "vda", path=live, snapshot_path=snap),
        snapshot_command=tuple(snapshot_cmd),
        release_command=tuple(snapshot_cmd),
    )
    hv = LocalHypervisor([spec], tmp_path / "state", retry=FAST)
    p = make_pipeline(tmp_path / "pipeline", hv, LocalDiskSource(hv, retry=FAST))
    expected = file_sha(live)
    run = p.replicator.replicate(spec.uuid)
    assert run.state == "COMPLETED"
    assert not snap.exists()
    lines = calls.read_text().splitlines()
    assert lines == [
        f"snapshot db-01 connector-{run.id}",
        f"release db-01 connector-{run.id}",
    ]
    assert hv.get_vm(spec.uuid).snapshots == ()
    assert p.restore_sha(run, 2000, "r.img") == expected


def test_failing_snapshot_hook_fails_the_run_with_its_message(tmp_path: Path) -> None:
    live = tmp_path / "live.img"
    write_sparse_image(live, 4 * MiB, [(0, MiB)])
    released = tmp_path / "released"
    spec = local_vm(
        "db-02",
        LocalDiskSpec(2000, "vda", path=live),
        snapshot_command=tuple(hook_script(tmp_path, "echo 'lvcreate: no space' >&2\nexit 3\n")),
        release_command=("touch", str(released)),
    )
    hv = LocalHypervisor([spec], tmp_path / "state", retry=FAST)
    p = make_pipeline(tmp_path / "pipeline", hv, LocalDiskSource(hv, retry=FAST))
    with pytest.raises(PermanentError, match="exit code 3: lvcreate: no space"):
        p.replicator.replicate(spec.uuid)
    assert released.exists()  # a half-made snapshot is released at once
    assert hv.get_vm(spec.uuid).snapshots == ()
    (run,) = p.state.runs()
    assert run.state == "FAILED" and "snapshot command of local VM 'db-02'" in (run.error or "")


def test_snapshot_left_by_a_killed_run_is_released_at_the_next_run(tmp_path: Path) -> None:
    live = tmp_path / "live.img"
    write_sparse_image(live, 4 * MiB, [(0, MiB)])
    calls = tmp_path / "calls.log"
    hook = hook_script(tmp_path, f'echo "$CONNECTOR_ACTION $CONNECTOR_SNAPSHOT" >> {calls}\n')
    spec = local_vm(
        "db-03",
        LocalDiskSpec(2000, "vda", path=live),
        snapshot_command=tuple(hook),
        release_command=tuple(hook),
    )
    hv = LocalHypervisor([spec], tmp_path / "state", retry=FAST)
    hv.create_snapshot(spec.uuid, "connector-r-killed", "")  # the process died here
    marker = json.loads((tmp_path / "state" / "local-snapshots" / f"{spec.uuid}.json").read_text())
    assert marker["snapshots"] == ["connector-r-killed"]
    p = make_pipeline(tmp_path / "pipeline", hv, LocalDiskSource(hv, retry=FAST))
    run = p.replicator.replicate(spec.uuid)
    assert run.state == "COMPLETED"
    assert calls.read_text().splitlines() == [
        "snapshot connector-r-killed",
        "release connector-r-killed",
        f"snapshot connector-{run.id}",
        f"release connector-{run.id}",
    ]
