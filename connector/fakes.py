"""In-memory implementations of the ports, for fast tests of the core.

Every real adapter passes the same contract tests; these fakes keep the
semantics that matter to the pipeline (CBT change ids per snapshot, paging,
refused change ids, write-once objects).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from connector.domain.extents import merge
from connector.domain.model import ChangedAreas, DiskInfo, Extent, SnapshotInfo, VmInfo
from connector.domain.objectkeys import check_range, validate_key
from connector.errors import ChangeIdRefused, NotFoundError


class MemoryObjectStore:
    """An ObjectStore in a dict; refuses the keys and ranges every real store refuses."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: bytes) -> None:
        self.objects[validate_key(key)] = bytes(data)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        check_range(offset, length)
        try:
            data = self.objects[validate_key(key)]
        except KeyError:
            raise NotFoundError(f"no object {key}") from None
        end = len(data) if length is None else offset + length
        return data[offset:end]

    def stat(self, key: str) -> int | None:
        data = self.objects.get(validate_key(key))
        return None if data is None else len(data)

    def list(self, prefix: str) -> Iterator[str]:
        return iter(sorted(k for k in self.objects if k.startswith(prefix)))

    def delete(self, key: str) -> None:
        self.objects.pop(validate_key(key), None)


@dataclass
class FakeDisk:
    key: int
    capacity: int
    data: bytearray
    uuid: str = field(default_factory=lambda: os.urandom(8).hex())
    log: list[Extent] = field(default_factory=list)
    cbt: bool = True
    refuse: str | None = None  # fault name returned for any non-'*' change id
    refuse_all: str | None = None  # fault name returned for every change id, '*' too


@dataclass
class FakeVm:
    uuid: str
    name: str
    disks: dict[int, FakeDisk]
    cbt_enabled: bool = True
    snapshots: dict[str, tuple[str, dict[int, bytes], dict[int, int | None]]] = field(
        default_factory=dict
    )  # ref -> (name, frozen disk data, change log length per disk; None: CBT was off)


class FakeHypervisor:
    """VMs whose disks are byte arrays; writes are logged for CBT.

    As on vSphere, a snapshot taken while the VM's CBT is off gives its disks no
    change id, and every query against it is refused with FileFault.
    """

    def __init__(self, page: int = 3) -> None:
        self.vms: dict[str, FakeVm] = {}
        self.page = page
        self._ids = itertools.count(1)
        self.closed = False

    # -- test controls -------------------------------------------------------------

    def add_vm(self, name: str, sizes: list[int]) -> str:
        uuid = f"5000{next(self._ids):04d}-0000-0000-0000-{os.urandom(6).hex()}"
        disks = {2000 + i: FakeDisk(2000 + i, s, bytearray(s)) for i, s in enumerate(sizes)}
        self.vms[uuid] = FakeVm(uuid, name, disks)
        return uuid

    def write(self, uuid: str, key: int, offset: int, data: bytes) -> None:
        disk = self.vms[uuid].disks[key]
        disk.data[offset : offset + len(data)] = data
        disk.log.append(Extent(offset, len(data)))

    # -- Hypervisor ----------------------------------------------------------------

    def _info(self, vm: FakeVm) -> VmInfo:
        return VmInfo(
            uuid=vm.uuid,
            name=vm.name,
            ref=f"vm-{vm.uuid[:8]}",
            datacenter="DC0",
            power_state="poweredOn",
            cbt_enabled=vm.cbt_enabled,
            disks=tuple(self._disk(d, None) for d in vm.disks.values()),
            snapshots=tuple(SnapshotInfo(ref, s[0]) for ref, s in vm.snapshots.items()),
        )

    def _vm(self, uuid: str) -> FakeVm:
        try:
            return self.vms[uuid]
        except KeyError:
            raise NotFoundError(f"no VM with instance UUID {uuid}") from None

    def _disk(self, d: FakeDisk, seq: int | None) -> DiskInfo:
        change_id = None if seq is None or not d.cbt else f"{d.uuid}/{seq}"
        return DiskInfo(
            key=d.key,
            label=f"Hard disk {d.key - 1999}",
            capacity=d.capacity,
            file_name=f"[ds] vm/disk{d.key}.vmdk",
            backing="flat",
            uuid=d.uuid,
            change_id=change_id,
            datastore="ds",
        )

    def list_vms(self) -> list[VmInfo]:
        return [self._info(vm) for vm in self.vms.values()]

    def get_vm(self, uuid: str) -> VmInfo:
        return self._info(self._vm(uuid))

    def enable_cbt(self, uuid: str) -> None:
        self._vm(uuid).cbt_enabled = True

    def create_snapshot(self, uuid: str, name: str, description: str) -> SnapshotInfo:
        vm = self._vm(uuid)
        ref = f"snapshot-{next(self._ids)}"
        frozen = {k: bytes(d.data) for k, d in vm.disks.items()}
        seqs = {k: len(d.log) if vm.cbt_enabled else None for k, d in vm.disks.items()}
        vm.snapshots[ref] = (name, frozen, seqs)
        disks = tuple(self._disk(d, seqs[k]) for k, d in vm.disks.items())
        return SnapshotInfo(ref, name, disks)

    def get_snapshot(self, uuid: str, snapshot_ref: str) -> SnapshotInfo:
        vm = self._vm(uuid)
        if snapshot_ref not in vm.snapshots:
            raise NotFoundError(f"VM {uuid} has no snapshot {snapshot_ref}")
        name, _frozen, seqs = vm.snapshots[snapshot_ref]
        disks = tuple(self._disk(d, seqs[k]) for k, d in vm.disks.items())
        return SnapshotInfo(snapshot_ref, name, disks)

    def remove_snapshot(self, uuid: str, snapshot_ref: str) -> None:
        self._vm(uuid).snapshots.pop(snapshot_ref, None)

    def query_changed_areas(
        self, uuid: str, snapshot_ref: str, disk_key: int, start_offset: int, change_id: str
    ) -> ChangedAreas:
        vm = self._vm(uuid)
        disk = vm.disks[disk_key]
        if snapshot_ref not in vm.snapshots:
            raise NotFoundError(f"VM {uuid} has no snapshot {snapshot_ref}")
        _name, frozen, seqs = vm.snapshots[snapshot_ref]
        end = seqs[disk_key]
        if not disk.cbt or end is None:
            raise ChangeIdRefused("CBT is off for this disk", "FileFault")
        if disk.refuse_all:
            raise ChangeIdRefused(f"change id {change_id} refused", disk.refuse_all)
        if change_id == "*":
            data = frozen[disk_key]
            step = 64 * 1024
            areas = [
                Extent(o, min(step, disk.capacity - o))
                for o in range(0, disk.capacity, step)
                if any(data[o : o + step])
            ]
        else:
            if disk.refuse:
                raise ChangeIdRefused(f"change id {change_id} refused", disk.refuse)
            uuid_part, _, seq = change_id.partition("/")
            if uuid_part != disk.uuid or not seq.isdigit() or int(seq) > end:
                raise ChangeIdRefused(f"unknown change id {change_id}", "InvalidArgument")
            areas = disk.log[int(seq) : end]
        merged = [e for e in merge(areas) if e.end > start_offset]
        merged = [
            replace(
                e, offset=max(e.offset, start_offset), length=e.end - max(e.offset, start_offset)
            )
            for e in merged
        ]
        page = merged[: self.page]
        if len(merged) > self.page:
            length = page[-1].end - start_offset
        else:
            length = disk.capacity - start_offset
        return ChangedAreas(start_offset, length, tuple(page))

    def close(self) -> None:
        self.closed = True


class FakeDiskReader:
    """Reads a byte string as a disk of its length; checks ranges as the real readers do."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.bytes_read = 0
        self.closed = False

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        if offset + length > len(self.data):
            raise ValueError(
                f"read [{offset}, {offset + length}) beyond the end of the disk "
                f"({len(self.data)} bytes)"
            )
        if self.closed:
            raise ValueError("read on a closed reader")
        self.bytes_read += length
        return self.data[offset : offset + length]

    def close(self) -> None:
        self.closed = True


class FakeDiskSource:
    """Reads the frozen data of a FakeHypervisor snapshot."""

    def __init__(self, hv: FakeHypervisor) -> None:
        self.hv = hv
        self.readers: list[FakeDiskReader] = []

    def open(self, vm: VmInfo, snapshot: SnapshotInfo, disk: DiskInfo) -> FakeDiskReader:
        frozen = self.hv.vms[vm.uuid].snapshots[snapshot.ref][1][disk.key]
        reader = FakeDiskReader(frozen)
        self.readers.append(reader)
        return reader
