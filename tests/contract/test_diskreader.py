"""The DiskReader contract over the fake reader, the local file reader, the NBD reader (on
nbdkit's file plugin and on qemu-nbd) and the datastore HTTPS reader (on the simulator).

Every backing file below is longer than the disk: `DISK.tail` follows the capacity, so a
reader that stops at the end of the file rather than at the disk's end is caught.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.adapters.datastore_reader import DatastoreHttpsReader, DatastoreHttpsSource
from connector.adapters.local import LocalFileReader
from connector.adapters.nbd import NbdReader, parse_nbd_uri
from connector.adapters.vsphere import VSphereClient
from connector.domain.model import SnapshotInfo, VmInfo
from connector.fakes import FakeDiskReader
from connector.retry import RetryPolicy
from tests.contract.diskreader_contract import (
    DISK,
    AllocationAwareContract,
    DiskReaderContract,
    KiB,
    StreamingReaderContract,
)
from tests.harness.nbd import NbdServer, need, start_nbdkit, start_qemu_nbd
from tests.harness.vcsim import Simulator

FAST = RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.005)
# Small requests, so that the larger reads of the contract are cut into several.
REQUEST = 256 * KiB


def write_disk_file(path: Path) -> None:
    """`DISK` as a sparse file: its regions, holes elsewhere, then the tail."""
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(DISK.capacity)
        for region in DISK.regions:
            f.seek(region.offset)
            f.write(DISK.data[region.offset : region.end])
        f.seek(DISK.capacity)
        f.write(DISK.tail)


@pytest.fixture(scope="module")
def disk_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "disk.img"
    write_disk_file(path)
    return path


class TestFakeDiskReader(DiskReaderContract):
    @pytest.fixture
    def reader(self) -> Iterator[FakeDiskReader]:
        r = FakeDiskReader(DISK.data)
        try:
            yield r
        finally:
            r.close()


class TestLocalFileReader(AllocationAwareContract):
    @pytest.fixture
    def reader(self, disk_file: Path) -> Iterator[LocalFileReader]:
        r = LocalFileReader(disk_file, description="disk 2000", capacity=DISK.capacity, retry=FAST)
        try:
            yield r
        finally:
            r.close()

    def test_without_a_capacity_the_whole_file_is_the_disk(self, disk_file: Path) -> None:
        r = LocalFileReader(disk_file, description="disk 2000", retry=FAST)
        try:
            assert r.size == DISK.capacity + len(DISK.tail)
            assert r.read(DISK.capacity, len(DISK.tail)) == DISK.tail
        finally:
            r.close()


# ------------------------------------------------------------------------------ NBD


def _serve(kind: str, image: Path, workdir: Path) -> Iterator[NbdServer]:
    need("nbdkit" if kind == "nbdkit" else "qemu-nbd")
    server = start_nbdkit(image, workdir) if kind == "nbdkit" else start_qemu_nbd(image, workdir)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nbdkit_server(disk_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdServer]:
    yield from _serve("nbdkit", disk_file, tmp_path_factory.mktemp("nbdkit"))


@pytest.fixture(scope="module")
def qemu_nbd_server(
    disk_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NbdServer]:
    yield from _serve("qemu-nbd", disk_file, tmp_path_factory.mktemp("qemu-nbd"))


def _nbd_reader(server: NbdServer) -> Iterator[NbdReader]:
    r = NbdReader(
        parse_nbd_uri(server.uri),
        description="disk 2000",
        capacity=DISK.capacity,
        retry=FAST,
        max_request=REQUEST,
        in_flight=4,
    )
    try:
        yield r
    finally:
        r.close()


@pytest.mark.integration
class TestNbdReaderOnNbdkit(StreamingReaderContract, AllocationAwareContract):
    @pytest.fixture
    def reader(self, nbdkit_server: NbdServer) -> Iterator[NbdReader]:
        yield from _nbd_reader(nbdkit_server)


@pytest.mark.integration
class TestNbdReaderOnQemuNbd(StreamingReaderContract, AllocationAwareContract):
    @pytest.fixture
    def reader(self, qemu_nbd_server: NbdServer) -> Iterator[NbdReader]:
        yield from _nbd_reader(qemu_nbd_server)


# ------------------------------------------------------------------- datastore HTTPS


@pytest.fixture(scope="module")
def snapshotted_vm(
    vcsim: Simulator, vsphere: VSphereClient
) -> Iterator[tuple[VmInfo, SnapshotInfo]]:
    """A VM whose disk holds `DISK`, the tail after it in its -flat.vmdk, and our snapshot."""
    vm_uuid = vcsim.add_vm(f"reader-contract-{uuidlib.uuid4().hex[:8]}", [DISK.capacity])
    key = vcsim.disk_keys(vm_uuid)[0]
    for region in DISK.regions:
        vcsim.write(vm_uuid, key, region.offset, DISK.data[region.offset : region.end])
    with open(vcsim.disk_path(vm_uuid, key), "r+b") as f:  # past the disk: no change log
        f.seek(DISK.capacity)
        f.write(DISK.tail)
    snap = vsphere.create_snapshot(vm_uuid, "connector-reader-contract", "")
    try:
        yield vsphere.get_vm(vm_uuid), snap
    finally:
        vsphere.remove_snapshot(vm_uuid, snap.ref)


@pytest.mark.integration
class TestDatastoreHttpsReader(AllocationAwareContract):
    knows_allocation = False  # the datastore browser cannot tell

    @pytest.fixture
    def reader(
        self, vsphere: VSphereClient, snapshotted_vm: tuple[VmInfo, SnapshotInfo]
    ) -> Iterator[DatastoreHttpsReader]:
        vm, snap = snapshotted_vm
        source = DatastoreHttpsSource(vsphere, max_request=REQUEST, retry=FAST, timeout=10.0)
        r = source.open(vm, snap, vm.disks[0])
        try:
            assert r.size == DISK.capacity
            yield r
        finally:
            r.close()
