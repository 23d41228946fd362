"""What the connector keeps about servers, disks, runs and their side effects.

Plain values, shared by the state ports (`connector.ports`), their SQL
adapters and in-memory fakes, the pipeline and the daemon. No I/O.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from connector.domain.model import DiskInfo, SnapshotInfo
from connector.domain.times import compact

# -- side effects recorded in the ledger -----------------------------------------------
SNAPSHOT = "snapshot"  # a VM snapshot `connector-<run id>`
MULTIPART = "multipart"  # a multipart upload to the object store
EFFECT_PENDING = "pending"  # to be undone if the run does not finish
EFFECT_UNDONE = "undone"  # removed or aborted
EFFECT_DONE = "done"  # finished normally (an upload completed)

NO_DISK = -1  # the disk key of a step that is not per disk


def new_run_id() -> str:
    """Time-ordered and unique: r-YYYYMMDDTHHMMSSmmmZ-<8 hex> (mmm: milliseconds)."""
    return f"r-{compact()}-{os.urandom(4).hex()}"


@dataclass
class ServerRow:
    """A VM in the catalog. `id` is opaque and names the VM in object keys."""

    id: str
    vm_uuid: str
    name: str
    ref: str
    datacenter: str
    power_state: str
    cbt_enabled: bool
    disks: list[dict[str, Any]]
    snapshots: list[dict[str, Any]]
    seen_at: str
    removed_at: str | None


def server_conflict(server_id: str, vm_uuid: str, have_id: str, have_uuid: str) -> str:
    """Why server `server_id` of VM `vm_uuid` cannot be added beside (have_id, have_uuid)."""
    if have_id == server_id:
        return f"server {server_id} is VM {have_uuid} in the catalog, not VM {vm_uuid}"
    return f"VM {vm_uuid} is server {have_id} in the catalog, not server {server_id}"


@dataclass
class DiskStateRow:
    """Where the next run of a disk starts: its identity, capacity and changeId."""

    server_id: str
    disk_key: int
    disk_uuid: str | None
    capacity: int
    change_id: str | None
    last_run_id: str
    chain_length: int


@dataclass
class DiskResult:
    """What one run did with one disk: the one shape of a per-disk result.

    The transfer stage makes it once the disk's manifest is written; the ledger
    keeps it (`to_json`) so that commit and a resumed run find it, and the runs
    store shows it with the run.
    """

    disk_key: int
    mode: str  # incremental | allocated | full | compare
    reason: str | None
    capacity: int
    change_id_from: str | None
    change_id_to: str | None
    disk_uuid: str | None = None
    bytes_changed: int = 0
    bytes_read: int = 0
    bytes_uploaded: int = 0  # sealed bytes of this disk's new blocks
    pack_bytes: int = 0  # bytes of the whole packs this disk's writer uploaded
    blocks_new: int = 0
    blocks_dedup: int = 0
    blocks_zero: int = 0
    packs: int = 0
    chain: int = 0  # change manifests since the last full one
    merkle_root: str | None = None
    manifest_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> DiskResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


@dataclass
class RunRow:
    """One replication run of one server, with its per-disk results."""

    id: str
    server_id: str
    type: str
    state: str
    stage: str
    started_at: str
    finished_at: str | None
    error: str | None
    snapshot_name: str | None
    snapshot_ref: str | None
    stats: dict[str, Any] = field(default_factory=dict)
    disks: list[DiskResult] = field(default_factory=list)


@dataclass(frozen=True)
class Control:
    """The daemon's hold on a run: queue token, attempts, host, failure, progress."""

    run_id: str
    job_id: str | None
    seq: int
    attempts: int
    host: str | None
    failed_stage: str | None
    failure: str | None
    progress_done: int
    progress_total: int
    detail: str
    updated_at: str
    owner: str | None = None  # the member executing its current stage (fleet)
    owner_since: float | None = None
    due_at: float | None = None  # when its next queue task is due (the database's clock)


@dataclass(frozen=True)
class Effect:
    """A side effect to undo if its run does not finish (a snapshot, an upload)."""

    id: int
    run_id: str | None
    kind: str
    target: str  # VM instance UUID | object key
    name: str | None  # snapshot name
    ref: str | None  # snapshot ref | multipart upload id
    detail: dict[str, Any]
    state: str
    created_at: str
    owner: str | None = None  # the member whose multipart upload it is

    def snapshot(self) -> SnapshotInfo:
        """The recorded snapshot with its frozen disks (once it was created)."""
        disks = tuple(DiskInfo(**d) for d in self.detail.get("disks", []))
        return SnapshotInfo(ref=self.ref or "", name=self.name or "", disks=disks)
