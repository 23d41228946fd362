"""Stage `changes`: which extents of each disk must be read in this run.

Per disk of the run's snapshot, QueryChangedDiskAreas against that snapshot
with the stored changeId, paged by startOffset over the whole capacity; a
refused changeId, a new, replaced or resized disk, or a CBT reset make a full
read, recorded with its reason. So does a previous run whose manifest of the
disk cannot be read (deleted or damaged): the next map is built on that run's
map, so without it the disk is read in full. Each disk's plan is kept in the
ledger, so a resumed run does not ask again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from connector.domain.extents import clip, merge
from connector.domain.model import DiskInfo, Extent
from connector.domain.records import DiskStateRow
from connector.errors import ChangeIdRefused, PermanentError
from connector.faults import crash_point
from connector.logging import get_logger
from connector.pipeline.commit import read_base_map, unreadable_base_reason
from connector.pipeline.context import RunRef, StageContext
from connector.ports import Hypervisor

log = get_logger(__name__)


def run(ctx: StageContext, ref: RunRef) -> None:
    snap = ctx.run_snapshot(ref.run_id)
    done = ctx.ledger.steps(ref.run_id, "changes")
    for disk in sorted(snap.disks, key=lambda d: d.key):
        if disk.key in done:
            continue
        ctx.check_stop()
        ctx.reporter.stage(ref.run_id, "changes", f"disk {disk.key}")
        previous = ctx.disks.disk_state(ref.server_id, disk.key)
        plan = plan_disk(ctx.hv, ref.vm_uuid, snap.ref, disk, previous)
        if plan.base_run is not None:
            base_map, why = read_base_map(ctx.repo(), ref.server_id, plan.base_run, disk.key)
            if base_map is None:
                plan = without_base(plan, why)
        log.info(
            "disk plan",
            run=ref.run_id,
            disk=disk.key,
            mode=plan.mode,
            reason=plan.reason,
            changed=plan.bytes_changed,
        )
        crash_point("changes")
        ctx.ledger.step_done(
            ref.run_id,
            "changes",
            disk.key,
            plan.to_json(previous.chain_length if previous else 0),
        )


@dataclass(frozen=True)
class DiskPlan:
    disk: DiskInfo
    # "incremental": changed areas; "allocated": '*' areas; "full": whole disk;
    # "compare": no CBT, the whole disk is read and compared with the previous run's map
    mode: str
    reason: str
    extents: tuple[Extent, ...]
    change_id_from: str | None
    base_run: str | None  # previous run whose map this run's map changes

    @property
    def bytes_changed(self) -> int:
        return sum(e.length for e in self.extents)

    def to_json(self, previous_chain: int) -> dict[str, Any]:
        """The plan as the ledger keeps it, with the chain length of the base run."""
        return {
            "mode": self.mode,
            "reason": self.reason,
            "extents": [[e.offset, e.length] for e in self.extents],
            "change_id_from": self.change_id_from,
            "base_run": self.base_run,
            "previous_chain": previous_chain,
        }

    @classmethod
    def from_json(cls, disk: DiskInfo, doc: dict[str, Any]) -> DiskPlan:
        return cls(
            disk=disk,
            mode=doc["mode"],
            reason=doc["reason"],
            extents=tuple(Extent(int(o), int(n)) for o, n in doc["extents"]),
            change_id_from=doc["change_id_from"],
            base_run=doc["base_run"],
        )


def query_all(
    hv: Hypervisor, vm_uuid: str, snapshot_ref: str, disk: DiskInfo, change_id: str
) -> list[Extent]:
    """QueryChangedDiskAreas, paged by startOffset until the disk's capacity is covered."""
    extents: list[Extent] = []
    offset = 0
    while offset < disk.capacity:
        page = hv.query_changed_areas(vm_uuid, snapshot_ref, disk.key, offset, change_id)
        if page.length <= 0:
            raise PermanentError(
                f"vCenter answered QueryChangedDiskAreas for disk {disk.key} at offset {offset} "
                "with an empty range; the changed areas cannot be trusted, so the run stops"
            )
        if page.start_offset != offset:
            raise PermanentError(
                f"vCenter answered QueryChangedDiskAreas for disk {disk.key} at offset {offset} "
                f"with a range starting at {page.start_offset}; the run stops"
            )
        extents.extend(page.extents)
        offset = page.start_offset + page.length
    return merge(clip(extents, disk.capacity))


_VSPHERE_CHANGE_ID = re.compile(r"^[^/]+/[0-9]+$")


def vsphere_form(change_id: str) -> bool:
    """Whether a changeId has vSphere's form: the tracking epoch's UUID, '/', a sequence."""
    return _VSPHERE_CHANGE_ID.match(change_id) is not None


def _uuid_part(change_id: str) -> str:
    return change_id.split("/", 1)[0]


def plan_disk(
    hv: Hypervisor,
    vm_uuid: str,
    snapshot_ref: str,
    disk: DiskInfo,
    previous: DiskStateRow | None,
) -> DiskPlan:
    """Decide how to read `disk` (the snapshot's view of it) and list the extents.

    A disk that must be read in full (first run, replaced, resized, CBT reset, a
    refused changeId) is read in its allocated areas (changeId '*') when vCenter
    gives them, and whole only when it refuses those too. A stored changeId in
    vSphere's `uuid/seq` form whose UUID differs from the snapshot's is a CBT
    reset; one of another form is opaque: it is tried, and only a refusal makes a
    full read.
    """
    whole = (Extent(0, disk.capacity),)
    if disk.change_id is None:
        if (
            previous is not None
            and previous.disk_uuid == disk.uuid
            and previous.capacity == disk.capacity
        ):
            return DiskPlan(
                disk,
                "compare",
                "CBT is off for this disk: every block is read and compared with the "
                f"previous run ({previous.last_run_id}); only changed blocks are stored",
                whole,
                None,
                previous.last_run_id,
            )
        return DiskPlan(disk, "full", "CBT is off for this disk", whole, None, None)
    reason: str | None = None
    if previous is None:
        reason = "first run of this disk"
    elif previous.disk_uuid != disk.uuid:
        reason = "the disk was replaced (its backing identity changed)"
    elif previous.capacity != disk.capacity:
        reason = f"the disk was resized from {previous.capacity} to {disk.capacity} bytes"
    elif previous.change_id is None:
        reason = "no changeId was stored for this disk"
    elif (
        vsphere_form(previous.change_id)
        and vsphere_form(disk.change_id)
        and _uuid_part(previous.change_id) != _uuid_part(disk.change_id)
    ):
        reason = "the changeId's tracking identity changed (CBT was reset)"
    if reason is not None:
        return _read_allocated(hv, vm_uuid, snapshot_ref, disk, reason)
    assert previous is not None and previous.change_id is not None
    try:
        areas = query_all(hv, vm_uuid, snapshot_ref, disk, previous.change_id)
    except ChangeIdRefused as exc:
        return _read_allocated(
            hv,
            vm_uuid,
            snapshot_ref,
            disk,
            f"vCenter refused the stored changeId ({exc.fault}): {exc}",
        )
    return DiskPlan(
        disk,
        "incremental",
        "changed blocks since the last run",
        tuple(areas),
        previous.change_id,
        previous.last_run_id,
    )


def _read_allocated(
    hv: Hypervisor, vm_uuid: str, snapshot_ref: str, disk: DiskInfo, reason: str
) -> DiskPlan:
    """A full read without a base run: the allocated areas ('*'), or the whole disk when
    vCenter refuses those. Either builds a full manifest (blocks outside are zero)."""
    try:
        areas = query_all(hv, vm_uuid, snapshot_ref, disk, "*")
    except ChangeIdRefused as exc:
        return DiskPlan(
            disk,
            "full",
            f"{reason}; allocated areas refused ({exc.fault})",
            (Extent(0, disk.capacity),),
            None,
            None,
        )
    return DiskPlan(disk, "allocated", reason, tuple(areas), "*", None)


def without_base(plan: DiskPlan, why: str) -> DiskPlan:
    """The plan for a disk whose base run's manifest cannot be read: a full read that
    builds a full manifest, recorded with the reason."""
    assert plan.base_run is not None
    log.warning(
        "the previous run's manifest cannot be read; the disk is read in full",
        base_run=plan.base_run,
        disk=plan.disk.key,
        error=why,
    )
    return DiskPlan(
        plan.disk,
        "full",
        unreadable_base_reason(plan.base_run, why),
        (Extent(0, plan.disk.capacity),),
        None,
        None,
    )


def skip_unallocated(plan: DiskPlan, allocated: list[Extent] | None) -> DiskPlan:
    """A plan that reads the whole disk narrowed to the ranges that may hold data.

    `allocated` comes from the reader (NBD block status, SEEK_DATA); None when
    it cannot tell. Plans driven by changed block tracking are left as they are.
    """
    if allocated is None or plan.mode not in ("full", "compare"):
        return plan
    areas = tuple(merge(clip(allocated, plan.disk.capacity)))
    skipped = plan.disk.capacity - sum(e.length for e in areas)
    return DiskPlan(
        plan.disk,
        plan.mode,
        f"{plan.reason}; {skipped} unallocated bytes skipped",
        areas,
        plan.change_id_from,
        plan.base_run,
    )
