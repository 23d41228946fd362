"""The narrow interfaces the pipeline and the daemon need. Adapters implement them.

Each stage asks for the few it uses (see docs/architecture.md). The state the
connector keeps is split by what it is about: the catalog of servers, the
per-disk CBT state, runs, the run ledger (finished steps and side effects to
undo), the block index and pack records, retention settings. The SQL adapters
(`connector.adapters.state`, `.runs`, `.ledger`) and the in-memory fakes
(`connector.fakestate`) implement them, and one contract suite runs over both.

No SDK type (pyvmomi, boto3, SQLAlchemy) crosses these boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from connector.domain.jobs import RUN_ACTIVE
from connector.domain.landing import LandedDisk, LandingRow
from connector.domain.manifest import BlockRef
from connector.domain.model import ChangedAreas, DiskInfo, Extent, SnapshotInfo, VmInfo
from connector.domain.records import (
    Control,
    DiskResult,
    DiskStateRow,
    Effect,
    RunRow,
    ServerRow,
)


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


# -- the state the connector keeps ----------------------------------------------------


class Catalog(Protocol):
    """The servers (VMs) the connector knows, keyed by instance UUID."""

    def upsert_server(self, vm: VmInfo) -> ServerRow:
        """Add or refresh a VM; a new VM gets a new opaque server id."""
        ...

    def server(self, server_id: str) -> ServerRow:
        """NotFoundError when there is no such server."""
        ...

    def servers(self) -> list[ServerRow]:
        """Every server, by name."""
        ...

    def find_servers(self, name_or_uuid: str) -> list[ServerRow]:
        """Servers whose instance UUID, name or id is `name_or_uuid`."""
        ...

    def mark_removed(self, present_uuids: set[str]) -> None:
        """Servers not in `present_uuids` are marked removed from the inventory."""
        ...

    def add_server(self, server_id: str, vm_uuid: str, name: str) -> ServerRow:
        """A server with a known id (rebuilt from the replica store), not yet seen in the
        inventory: discovery later fills in its other fields and keeps its id.

        Adding a server that is there already with that id and UUID is not an error (it
        is returned as it is); ValueError when the id or the UUID belongs to another one.
        """
        ...


class DiskStates(Protocol):
    """Per disk of a server: where its next run starts (changeId, last run)."""

    def disk_state(self, server_id: str, disk_key: int) -> DiskStateRow | None: ...

    def disk_states(self, server_id: str) -> list[DiskStateRow]:
        """By disk key."""
        ...

    def forget_disks(self, server_id: str) -> None:
        """The server's next run reads its disks without a base run."""
        ...

    def put_disk_state(self, row: DiskStateRow) -> None:
        """Set a disk's state (rebuilt from the replica store), replacing its earlier one."""
        ...


class Runs(Protocol):
    """Runs and their per-disk results; the one writer of run records."""

    def create_run(
        self,
        run_id: str,
        server_id: str,
        run_type: str,
        *,
        state: str = RUN_ACTIVE,
        stage: str = "validate",
        error: str | None = None,
    ) -> None:
        """A new run. A terminal `state` (MISSED, FAILED) also records its end."""
        ...

    def run(self, run_id: str) -> RunRow:
        """NotFoundError when there is no such run."""
        ...

    def runs(self, server_id: str | None = None) -> list[RunRow]:
        """Oldest first."""
        ...

    def set_stage(
        self,
        run_id: str,
        stage: str,
        *,
        snapshot_name: str | None = None,
        snapshot_ref: str | None = None,
    ) -> None: ...

    def record_disk(self, run_id: str, result: DiskResult) -> None:
        """The result of one disk (replacing an earlier one of the same disk)."""
        ...

    def record_commit(self, run_id: str, disks: list[DiskStateRow], stats: dict[str, Any]) -> None:
        """Once the run's commit object is durable: the disks' next changeIds and the
        run's stats, in one transaction. The run stays ACTIVE until `finish_run`."""
        ...

    def finish_run(self, run_id: str, note: str | None = None) -> None:
        """COMPLETED (with an optional note, such as a cleanup warning)."""
        ...

    def fail_run(self, run_id: str, error: str) -> None:
        """FAILED, with the reason."""
        ...

    def end_run(self, run_id: str, state: str, error: str | None) -> None:
        """End a run that never started (MISSED, or FAILED before admission)."""
        ...

    def mark_runs_deleted(self, run_ids: set[str]) -> None:
        """Runs whose commit was deleted from the store by retention or purge."""
        ...

    def import_run(self, run: RunRow) -> bool:
        """Add a run as given, with its disks (a committed run rebuilt from the replica
        store). False, changing nothing, when a run of that id is there already."""
        ...


class RunSteps(Protocol):
    """Results of finished steps, keyed by (run, stage, disk): a resumed run skips them."""

    def step(self, run_id: str, stage: str, disk_key: int = -1) -> dict[str, Any] | None: ...

    def steps(self, run_id: str, stage: str) -> dict[int, dict[str, Any]]:
        """Disk key -> result, for every finished step of the stage."""
        ...

    def step_done(self, run_id: str, stage: str, disk_key: int, result: dict[str, Any]) -> None: ...


class SideEffects(Protocol):
    """What must be undone if a run dies, recorded BEFORE the side effect happens."""

    def snapshot_intent(self, run_id: str, vm_uuid: str, name: str) -> Effect:
        """Record (once) that the run is about to create snapshot `name`."""
        ...

    def snapshot_created(self, effect_id: int, snap: SnapshotInfo) -> None: ...

    def undone(self, effect_id: int, state: str = "undone") -> None: ...

    def snapshots_removed(self, vm_uuid: str, names: list[str]) -> None:
        """Snapshots removed by a sweep: their pending entries are settled."""
        ...

    def pending(self, kind: str | None = None, run_id: str | None = None) -> list[Effect]:
        """Effects not yet undone, oldest first."""
        ...


class Ledger(RunSteps, SideEffects, Protocol):
    """The run ledger as the pipeline's stages use it."""


class RunControls(Protocol):
    """The daemon's queue tokens, attempts and progress of runs."""

    def ensure_control(self, run_id: str, job_id: str | None = None) -> Control: ...

    def control(self, run_id: str) -> Control | None: ...

    def controls(self, run_ids: list[str]) -> dict[str, Control]: ...

    def advance(
        self,
        run_id: str,
        stage: str | None = None,
        attempts: int | None = None,
        state: str | None = None,
        host: str | None = None,
        due_in: float = 0.0,
    ) -> int:
        """Move the run's token on (and its stage or state); return the new token.

        Moving the token ends any claim on the run's current stage; `due_in` says
        when the task of the new token is due (seconds from now)."""
        ...

    def set_failure(self, run_id: str, failed_stage: str, reason: str) -> None: ...

    def set_progress(self, run_id: str, done: int, total: int, detail: str) -> None: ...


class BlockIndex(Protocol):
    """Where each stored block lives: what deduplication looks up."""

    def lookup(self, block_id: bytes) -> BlockRef | None: ...

    def lookup_many(self, block_ids: Sequence[bytes]) -> dict[bytes, BlockRef]:
        """The refs of those blocks that are known, by block id, asked in one go (the
        transfer stage deduplicates a batch of blocks at once). Unknown ones are left
        out; an id given twice is not an error; no ids give an empty dict."""
        ...

    def add(self, refs: list[BlockRef]) -> None:
        """The first ref of a block wins; adding a known block is not an error."""
        ...


class PackRecords(Protocol):
    """Which run wrote which pack, and forgetting packs that purge deletes."""

    def record_pack(self, pack_id: str, size: int, run_id: str | None) -> None: ...

    def packs_of_runs(self, run_ids: set[str]) -> set[str]: ...

    def forget_blocks_in_packs(self, pack_ids: set[str]) -> None:
        """No new run deduplicates against these packs any more."""
        ...

    def forget_packs(self, pack_ids: set[str]) -> None:
        """Deleted packs: no index entry and no pack record refers to them."""
        ...


class BlockStore(BlockIndex, PackRecords, Protocol):
    """The block index with its pack records (what the transfer stage and purge use)."""


class RetentionSettings(Protocol):
    """Per-server retention: how many recent runs to keep."""

    def set_retention(self, server_id: str, keep: int | None) -> None:
        """0 keeps all; None: back to the default."""
        ...

    def retention_settings(self) -> dict[str, int]: ...


# -- landing in AWS -------------------------------------------------------------------


class SnapshotTarget(Protocol):
    """EBS snapshots written block by block (the EBS direct APIs) and AMIs (EC2).

    Missing resources are not errors where the verb says so; every other failure is
    a class of `connector.errors` (TransientError for throttling: the retry decorator
    tries it again).
    """

    def start_snapshot(
        self,
        *,
        volume_size: int,
        client_token: str,
        parent_snapshot_id: str | None,
        encrypted: bool,
        kms_key_id: str | None,
        tags: dict[str, str],
        description: str,
        timeout_minutes: int,
    ) -> tuple[str, str]:
        """(snapshot id, status); the same client token gives the same snapshot."""
        ...

    def put_block(self, snapshot_id: str, index: int, data: bytes) -> None:
        """Write one 512 KiB block (with its SHA-256 checksum)."""
        ...

    def complete_snapshot(self, snapshot_id: str, changed_blocks: int) -> str:
        """Seal the snapshot; AWS then completes it asynchronously."""
        ...

    def snapshot_state(self, snapshot_id: str) -> str | None:
        """pending | completed | error, or None when there is no such snapshot."""
        ...

    def snapshots_tagged(self, key: str, value: str) -> list[str]:
        """The ids of this account's snapshots that carry tag `key` = `value`."""
        ...

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Deleting an absent snapshot is not an error."""
        ...

    def list_blocks(self, snapshot_id: str) -> list[int]:
        """The indexes of the blocks that hold data."""
        ...

    def read_block(self, snapshot_id: str, index: int) -> bytes: ...

    def register_image(
        self,
        *,
        name: str,
        description: str,
        mappings: list[tuple[str, str]],
        architecture: str,
        boot_mode: str,
        ena_support: bool,
        tags: dict[str, str],
    ) -> str:
        """An AMI of (device name, snapshot id) mappings, the first one the root."""
        ...

    def find_image(self, name: str) -> str | None:
        """The id of this account's AMI of that name, if any."""
        ...

    def describe_image(self, image_id: str) -> dict[str, Any] | None: ...

    def deregister_image(self, image_id: str) -> None:
        """Deregistering an absent AMI is not an error."""
        ...


class Landings(Protocol):
    """The landings of runs: every AWS resource id, recorded before anything uses it."""

    def landing(self, run_id: str) -> LandingRow | None: ...

    def landings(self, server_id: str | None = None) -> list[LandingRow]:
        """Oldest run first."""
        ...

    def start_landing(self, run_id: str, server_id: str, image_name: str) -> LandingRow:
        """Record (once) that the run is being landed; an existing one is made ACTIVE again."""
        ...

    def record_snapshot(self, disk: LandedDisk) -> None:
        """A disk's snapshot (replacing an earlier record of the same disk)."""
        ...

    def set_snapshot_state(
        self, run_id: str, disk_key: int, state: str, blocks_sent: int | None = None
    ) -> None: ...

    def set_attempt(self, run_id: str, attempt: int) -> None: ...

    def record_image(self, run_id: str, image_id: str) -> None: ...

    def end_landing(self, run_id: str, state: str, error: str | None = None) -> None: ...
