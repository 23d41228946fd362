"""Landing a committed run in AWS: the pure rules (no I/O, no SDK).

A run's disks become EBS snapshots written through the EBS direct APIs, in
512 KiB blocks, each on top of the previous landed snapshot of the same disk;
then one AMI names them. These functions decide which blocks to send, how
resources are named and tokened, and which AMIs retention removes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connector.domain.manifest import BlockMap, BlockRef
from connector.errors import InvalidInputError

EBS_BLOCK = 512 * 1024  # the EBS direct APIs' block size
GiB = 1024**3
MAX_VOLUME_GIB = 64 * 1024  # the EBS snapshot limit (64 TiB)
DEVICE_NAMES = tuple(f"/dev/xvd{c}" for c in "abcdefghijklmnopqrstuvwxyz")
ROOT_DEVICE = DEVICE_NAMES[0]

# When a job lands its runs.
LAND_EVERY = "every"  # after every committed run
LAND_ON_DEMAND = "on-demand"  # only with `connector land`
LAND_NEVER = "never"
LAND_MODES = (LAND_EVERY, LAND_ON_DEMAND, LAND_NEVER)

# What the staging bucket keeps once a run is landed.
STAGING_TEMPORARY = "temporary"  # only what the next incremental needs
STAGING_REPLICA = "replica"  # every run, as the point-in-time replica store
STAGING_MODES = (STAGING_TEMPORARY, STAGING_REPLICA)

LICENSE_TYPES = ("AWS", "BYOL")
DEFAULT_KEEP_AMIS = 3
MAX_KEEP_AMIS = 100

# Landing states (the landings table) and snapshot states (per disk).
LANDING_ACTIVE = "ACTIVE"
LANDING_LANDED = "LANDED"
LANDING_FAILED = "FAILED"
LANDING_DELETED = "DELETED"  # its AMI was deregistered by retention
SNAP_STARTED = "started"  # StartSnapshot answered; blocks may be in flight
SNAP_SENT = "sent"  # CompleteSnapshot answered; AWS completes it
SNAP_COMPLETED = "completed"
SNAP_ABANDONED = "abandoned"  # to be deleted (a new attempt replaces it)
SNAP_DELETED = "deleted"


@dataclass(frozen=True)
class LandingSpec:
    """What a job says about landing, the fields AWS SMS had."""

    mode: str = LAND_NEVER
    license_type: str = "BYOL"
    encrypted: bool = True
    kms_key_id: str | None = None  # None: the account's default EBS key
    role_name: str | None = None  # STS AssumeRole of this role when set
    keep_amis: int = DEFAULT_KEEP_AMIS
    staging: str = STAGING_TEMPORARY

    def __post_init__(self) -> None:
        if self.mode not in LAND_MODES:
            raise InvalidInputError(f"landing {self.mode!r} is not one of {', '.join(LAND_MODES)}")
        if self.staging not in STAGING_MODES:
            raise InvalidInputError(
                f"staging {self.staging!r} is not one of {', '.join(STAGING_MODES)}"
            )
        if self.license_type not in LICENSE_TYPES:
            raise InvalidInputError(
                f"license type {self.license_type!r} is not one of {', '.join(LICENSE_TYPES)}"
            )
        if not 1 <= self.keep_amis <= MAX_KEEP_AMIS:
            raise InvalidInputError(
                f"keep {self.keep_amis} AMIs is out of range: keep from 1 to {MAX_KEEP_AMIS}"
            )
        if self.kms_key_id is not None and not self.encrypted:
            raise InvalidInputError("a KMS key id needs encrypted snapshots; drop --no-encrypted")
        if self.role_name is not None and not _role_ok(self.role_name):
            raise InvalidInputError(
                f"role name {self.role_name!r} is not an IAM role name (letters, digits, +=,.@_-)"
            )

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "license_type": self.license_type,
            "encrypted": self.encrypted,
            "kms_key_id": self.kms_key_id,
            "role_name": self.role_name,
            "keep_amis": self.keep_amis,
            "staging": self.staging,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> LandingSpec:
        if not doc:
            return cls()
        return cls(**{k: doc[k] for k in cls().to_json() if k in doc})


def _role_ok(name: str) -> bool:
    return 1 <= len(name) <= 64 and all(c.isalnum() or c in "+=,.@_-" for c in name)


@dataclass
class LandedDisk:
    """One disk of a landing: its snapshot and where that snapshot stands."""

    run_id: str
    disk_key: int
    snapshot_id: str | None
    state: str
    client_token: str
    parent_snapshot_id: str | None
    capacity: int
    blocks_sent: int = 0


@dataclass
class LandingRow:
    """The landing of one run: its disks' snapshots and its AMI."""

    run_id: str
    server_id: str
    state: str
    image_name: str
    image_id: str | None
    attempt: int
    started_at: str
    finished_at: str | None
    error: str | None
    disks: list[LandedDisk] = field(default_factory=list)

    def disk(self, key: int) -> LandedDisk | None:
        for d in self.disks:
            if d.disk_key == key:
                return d
        return None

    def snapshot_ids(self) -> list[str]:
        return [d.snapshot_id for d in self.disks if d.snapshot_id]


def volume_size_gib(capacity: int) -> int:
    """The snapshot's VolumeSize: the disk's capacity in GiB, rounded up (at least 1)."""
    if capacity <= 0:
        raise InvalidInputError(f"a disk of {capacity} bytes cannot be landed")
    size = max(1, -(-capacity // GiB))
    if size > MAX_VOLUME_GIB:
        raise InvalidInputError(
            f"a disk of {capacity} bytes is larger than an EBS snapshot can be (64 TiB)"
        )
    return size


def client_token(run_id: str, disk_key: int, attempt: int = 0) -> str:
    """StartSnapshot's ClientToken: the same run, disk and attempt always give the same
    token (a retry or a restart finds its snapshot); opaque, at most 64 characters."""
    return hashlib.sha256(f"land:{run_id}:{disk_key}:{attempt}".encode()).hexdigest()


def image_name(server_id: str, run_id: str) -> str:
    """The AMI's name: opaque ids only, never the VM's name."""
    return f"connector-{server_id}-{run_id}"


def architecture(guest_id: str | None) -> str:
    """EC2's architecture from vSphere's guest id (arm64 guests say so: `arm-...`)."""
    if guest_id and ("arm" in guest_id.lower() or "aarch64" in guest_id.lower()):
        return "arm64"
    return "x86_64"


def boot_mode(firmware: str | None) -> str:
    """EC2's boot mode from the VM's firmware (vSphere: "bios" or "efi")."""
    return "uefi" if (firmware or "").lower() in ("efi", "uefi") else "legacy-bios"


def device_names(count: int) -> tuple[str, ...]:
    """Device names of the AMI's mappings, the boot disk first."""
    if not 1 <= count <= len(DEVICE_NAMES):
        raise InvalidInputError(
            f"a VM of {count} disks cannot be one AMI (from 1 to {len(DEVICE_NAMES)} disks)"
        )
    return DEVICE_NAMES[:count]


def ebs_block_count(capacity: int) -> int:
    """The 512 KiB blocks that hold the disk's bytes."""
    return -(-capacity // EBS_BLOCK)


def _check_sizes(block_size: int) -> None:
    if block_size % EBS_BLOCK and EBS_BLOCK % block_size:
        raise InvalidInputError(
            f"a store block size of {block_size} bytes does not divide into, or fill, "
            f"the EBS block of {EBS_BLOCK} bytes; such a store cannot be landed"
        )


def covering(ebs_index: int, block_size: int) -> list[tuple[int, int, int]]:
    """The store blocks an EBS block is made of: (store index, start, end) within each."""
    _check_sizes(block_size)
    start = ebs_index * EBS_BLOCK
    if block_size >= EBS_BLOCK:
        index, offset = divmod(start, block_size)
        return [(index, offset, offset + EBS_BLOCK)]
    per = EBS_BLOCK // block_size
    first = start // block_size
    return [(first + i, 0, block_size) for i in range(per)]


def changed_ebs_blocks(
    parent: Mapping[int, BlockRef | None] | None,
    current: Mapping[int, BlockRef | None],
    block_size: int,
    capacity: int,
) -> list[int]:
    """The EBS blocks that may differ from the parent snapshot, in order.

    `parent` is the full block map of the run the parent snapshot holds (None: no
    parent, the snapshot starts as zeros), `current` this run's. A store block whose
    id changed touches the EBS blocks it overlaps; a block that became zero is among
    them (it must be written as zeros). Without a parent only non-zero blocks count.
    The caller still skips an EBS block whose bytes equal the parent's (or are zero
    with no parent), which `must_send` decides.
    """
    _check_sizes(block_size)
    base: Mapping[int, BlockRef | None] = parent or {}
    changed: set[int] = set()
    for index in set(base) | set(current):
        old, new = base.get(index), current.get(index)
        if (old.block_id if old else None) != (new.block_id if new else None):
            changed.add(index)
    limit = ebs_block_count(capacity)
    out: set[int] = set()
    for index in changed:
        if block_size >= EBS_BLOCK:
            per = block_size // EBS_BLOCK
            out.update(range(index * per, index * per + per))
        else:
            out.add(index * block_size // EBS_BLOCK)
    return sorted(i for i in out if 0 <= i < limit)


def must_send(current: bytes, parent: bytes | None) -> bool:
    """Whether an EBS block's bytes are sent: they differ from the parent's (`parent`
    None: the parent's are not known, so they are sent)."""
    return parent is None or current != parent


def is_zero(data: bytes) -> bool:
    return not data or data.count(0) == len(data)


@dataclass(frozen=True)
class Removal:
    """What AMI retention removes: AMIs to deregister, then snapshots to delete."""

    runs: tuple[str, ...]
    images: tuple[str, ...]
    snapshots: tuple[str, ...]


def ami_retention(landed: Sequence[LandingRow], keep: int) -> Removal:
    """The landed runs beyond the `keep` most recent: their AMIs are deregistered and
    their snapshots deleted, except a snapshot that a retained landing uses."""
    if keep < 1:
        raise InvalidInputError(f"keep {keep} AMIs: at least 1 is kept")
    ordered = sorted(
        (r for r in landed if r.state == LANDING_LANDED), key=lambda r: r.run_id, reverse=True
    )
    kept, dropped = ordered[:keep], ordered[keep:]
    in_use = {s for r in kept for s in r.snapshot_ids()}
    snapshots: list[str] = []
    for r in dropped:
        snapshots.extend(s for s in r.snapshot_ids() if s not in in_use)
    return Removal(
        runs=tuple(r.run_id for r in dropped),
        images=tuple(r.image_id for r in dropped if r.image_id),
        snapshots=tuple(dict.fromkeys(snapshots)),
    )


def parent_of(landed: Sequence[LandingRow], disk_key: int, capacity: int) -> LandedDisk | None:
    """The newest completed snapshot of the disk from an earlier landing, when its
    capacity is the same (a resized disk starts a new chain)."""
    for row in sorted(landed, key=lambda r: r.run_id, reverse=True):
        if row.state != LANDING_LANDED:
            continue
        disk = row.disk(disk_key)
        if disk is None or disk.state != SNAP_COMPLETED or not disk.snapshot_id:
            continue
        return disk if disk.capacity == capacity else None
    return None


def full_map_of(changes: BlockMap) -> BlockMap:
    """A block map without zero markers."""
    return {i: r for i, r in changes.items() if r is not None}
