"""Stage `changes`: which extents of each disk must be read in this run."""

from __future__ import annotations

from dataclasses import dataclass

from connector.adapters.state import DiskStateRow
from connector.domain.extents import clip, merge
from connector.domain.model import DiskInfo, Extent
from connector.errors import ChangeIdRefused, PermanentError
from connector.ports import Hypervisor


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


def _uuid_part(change_id: str) -> str:
    return change_id.split("/", 1)[0]


def plan_disk(
    hv: Hypervisor,
    vm_uuid: str,
    snapshot_ref: str,
    disk: DiskInfo,
    previous: DiskStateRow | None,
) -> DiskPlan:
    """Decide how to read `disk` (the snapshot's view of it) and list the extents."""
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
    elif _uuid_part(previous.change_id) != _uuid_part(disk.change_id):
        reason = "the changeId's tracking identity changed (CBT was reset)"
    if reason is not None:
        if previous is None:
            try:
                areas = query_all(hv, vm_uuid, snapshot_ref, disk, "*")
            except ChangeIdRefused as exc:
                return DiskPlan(
                    disk,
                    "full",
                    f"{reason}; allocated areas refused ({exc.fault})",
                    whole,
                    None,
                    None,
                )
            return DiskPlan(disk, "allocated", reason, tuple(areas), "*", None)
        return DiskPlan(disk, "full", reason, whole, None, None)
    assert previous is not None and previous.change_id is not None
    try:
        areas = query_all(hv, vm_uuid, snapshot_ref, disk, previous.change_id)
    except ChangeIdRefused as exc:
        return DiskPlan(
            disk,
            "full",
            f"vCenter refused the stored changeId ({exc.fault}): {exc}",
            whole,
            previous.change_id,
            previous.last_run_id,
        )
    return DiskPlan(
        disk,
        "incremental",
        "changed blocks since the last run",
        tuple(areas),
        previous.change_id,
        previous.last_run_id,
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
