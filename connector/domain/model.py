"""Pure types of the source side: VMs, disks, snapshots, changed areas."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Extent:
    """A byte range [offset, offset + length) of a disk."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class DiskInfo:
    """One virtual disk as the hypervisor describes it."""

    key: int  # device key, stable for the life of the disk in its VM
    label: str
    capacity: int  # bytes
    file_name: str  # datastore path of the descriptor, "[ds] dir/vm.vmdk"
    backing: str  # "flat" for a flat VMDK; anything else cannot be read as a flat file
    uuid: str | None = None  # backing uuid, part of the disk's identity
    change_id: str | None = None  # backing.changeId; None when CBT is off for this disk
    datastore: str | None = None  # datastore name
    independent: bool = False
    rdm: bool = False


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot of a VM: its managed object id, its name, and its frozen disks."""

    ref: str  # managed object id, e.g. "snapshot-42"
    name: str
    disks: tuple[DiskInfo, ...] = ()


@dataclass(frozen=True)
class VmInfo:
    """A VM in the inventory, keyed by its instance UUID."""

    uuid: str  # instance UUID
    name: str
    ref: str  # managed object id, e.g. "vm-42"
    datacenter: str
    power_state: str
    cbt_enabled: bool
    disks: tuple[DiskInfo, ...] = ()
    snapshots: tuple[SnapshotInfo, ...] = field(default=())
    host: str | None = None
    guest_id: str | None = None  # vSphere's guest id (config.guestId), e.g. "ubuntu64Guest"
    firmware: str | None = None  # "bios" or "efi" (config.firmware)

    def disk(self, key: int) -> DiskInfo:
        for d in self.disks:
            if d.key == key:
                return d
        raise KeyError(key)


@dataclass(frozen=True)
class ChangedAreas:
    """One answer of QueryChangedDiskAreas: the areas within [start_offset, start_offset+length)."""

    start_offset: int
    length: int
    extents: tuple[Extent, ...]
