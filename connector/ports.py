"""The narrow interfaces the pipeline needs. Adapters implement them.

No SDK type (pyvmomi, boto3) crosses these boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from connector.domain.model import ChangedAreas, DiskInfo, Extent, SnapshotInfo, VmInfo


class Hypervisor(Protocol):
    """The source of VMs, snapshots and changed-block information."""

    def list_vms(self) -> list[VmInfo]: ...

    def get_vm(self, uuid: str) -> VmInfo:
        """Raise NotFoundError when no VM has that instance UUID."""
        ...

    def get_snapshot(self, uuid: str, snapshot_ref: str) -> SnapshotInfo:
        """One snapshot of the VM with its frozen disks; NotFoundError when it is gone."""
        ...

    def enable_cbt(self, uuid: str) -> None: ...

    def create_snapshot(self, uuid: str, name: str, description: str) -> SnapshotInfo:
        """Create a snapshot (memory off, quiesced with a fallback) and wait for it."""
        ...

    def remove_snapshot(self, uuid: str, snapshot_ref: str) -> None:
        """Remove one snapshot with consolidation and wait for the task.

        Removing a snapshot that no longer exists is not an error.
        """
        ...

    def query_changed_areas(
        self, uuid: str, snapshot_ref: str, disk_key: int, start_offset: int, change_id: str
    ) -> ChangedAreas:
        """One page of QueryChangedDiskAreas.

        Raise ChangeIdRefused when the server refuses the changeId (FileFault,
        InvalidArgument), so the caller can fall back to a full read.
        """
        ...

    def close(self) -> None: ...


class DiskReader(Protocol):
    """Random read access to one disk of one snapshot.

    The disk ends at its capacity, even where the file or export behind it is
    longer: nothing past the capacity is readable.
    """

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (short reads are errors).

        A zero `length` gives b"" (at the very end too). ValueError for a
        negative offset or length, a range that ends past the capacity, or a
        read after close.
        """
        ...

    def close(self) -> None:
        """Release the reader; closing it again is not an error."""
        ...


@runtime_checkable
class AllocationAware(Protocol):
    """Optional for a DiskReader: which ranges of the disk may hold data."""

    def allocated_extents(self) -> list[Extent] | None:
        """Ranges that may hold data, sorted and merged; everything else reads as zeros.

        None when the reader cannot tell (then every range may hold data).
        """
        ...


@runtime_checkable
class StreamingReader(Protocol):
    """Optional for a DiskReader: many reads in order, several in flight at once."""

    def read_extents(self, extents: Iterable[Extent]) -> Iterator[tuple[Extent, bytes]]:
        """Each extent with its bytes, in the order given; memory stays bounded.

        The same checks as `read`: ValueError for an extent past the capacity.
        """
        ...


class DiskSource(Protocol):
    """Opens readers on the frozen data of a snapshot's disks (one per transport)."""

    def open(self, vm: VmInfo, snapshot: SnapshotInfo, disk: DiskInfo) -> DiskReader:
        """Raise UnsupportedSourceError when the disk cannot be read correctly."""
        ...


class ObjectStore(Protocol):
    """Write-once object storage: five verbs."""

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """The object's bytes (a range when `length` is given). NotFoundError if absent."""
        ...

    def stat(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under `prefix`, in lexical order."""
        ...

    def delete(self, key: str) -> None:
        """Delete; deleting an absent key is not an error."""
        ...


class UploadJournal(Protocol):
    """Told about multipart uploads as they start and end, so that an upload left
    open by a killed process can be found and aborted at the next start."""

    def upload_started(self, key: str, upload_id: str) -> None: ...

    def upload_ended(self, key: str, upload_id: str) -> None: ...


class Auditor(Protocol):
    """The append-only audit log (connector.audit.AuditLog)."""

    def record(
        self,
        action: str,
        object: str,
        outcome: str,
        *,
        actor: str | None = None,
        **details: Any,
    ) -> dict[str, Any]: ...
