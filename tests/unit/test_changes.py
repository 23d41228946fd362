"""The changed-areas stage: paging, the fallbacks, and answers that cannot be trusted."""

from __future__ import annotations

from dataclasses import replace

import pytest

from connector.adapters.state import DiskStateRow
from connector.domain.model import ChangedAreas, Extent
from connector.errors import PermanentError
from connector.fakes import FakeHypervisor
from connector.pipeline.changes import plan_disk, query_all

MiB = 1024 * 1024


def setup(page: int = 2) -> tuple[FakeHypervisor, str]:
    hv = FakeHypervisor(page=page)
    return hv, hv.add_vm("vm", [32 * MiB])


def test_paging_covers_the_whole_disk() -> None:
    hv, uuid = setup(page=1)
    for off in (0, 5 * MiB, 9 * MiB, 20 * MiB, 31 * MiB):
        hv.write(uuid, 2000, off, b"x" * 100)
    snap = hv.create_snapshot(uuid, "s", "")
    (disk,) = snap.disks
    extents = query_all(hv, uuid, snap.ref, disk, f"{disk.uuid}/0")
    assert [e.offset for e in extents] == [0, 5 * MiB, 9 * MiB, 20 * MiB, 31 * MiB]


class Answers:
    """A hypervisor whose QueryChangedDiskAreas answers are scripted."""

    def __init__(self, answers: list[ChangedAreas]) -> None:
        self.answers = answers

    def query_changed_areas(self, *_args: object) -> ChangedAreas:
        return self.answers.pop(0)


def test_zero_length_answer_is_an_error_not_the_end() -> None:
    hv, uuid = setup()
    snap = hv.create_snapshot(uuid, "s", "")
    (disk,) = snap.disks
    fake = Answers([ChangedAreas(0, MiB, (Extent(0, 10),)), ChangedAreas(MiB, 0, ())])
    with pytest.raises(PermanentError, match="empty range"):
        query_all(fake, uuid, snap.ref, disk, "x/1")  # type: ignore[arg-type]


def test_answer_for_another_offset_is_an_error() -> None:
    hv, uuid = setup()
    snap = hv.create_snapshot(uuid, "s", "")
    (disk,) = snap.disks
    fake = Answers([ChangedAreas(0, MiB, ()), ChangedAreas(0, 31 * MiB, ())])
    with pytest.raises(PermanentError, match="starting at 0"):
        query_all(fake, uuid, snap.ref, disk, "x/1")  # type: ignore[arg-type]


def _prev(disk_uuid: str | None, capacity: int, change_id: str | None) -> DiskStateRow:
    return DiskStateRow("s-1", 2000, disk_uuid, capacity, change_id, "r-prev", 0)


def test_fallbacks_to_a_full_read() -> None:
    hv, uuid = setup()
    hv.write(uuid, 2000, 0, b"a")
    snap = hv.create_snapshot(uuid, "s", "")
    (disk,) = snap.disks
    assert disk.change_id is not None and disk.uuid is not None
    cases = {
        "replaced": _prev("other-disk", disk.capacity, disk.change_id),
        "resized": _prev(disk.uuid, disk.capacity // 2, disk.change_id),
        "no changeId": _prev(disk.uuid, disk.capacity, None),
        "reset": _prev(disk.uuid, disk.capacity, "another-uuid/3"),
    }
    for what, prev in cases.items():
        # a full read, of the allocated areas only ('*'), building a full manifest
        plan = plan_disk(hv, uuid, snap.ref, disk, prev)
        assert plan.mode == "allocated", what
        assert plan.extents == (Extent(0, 64 * 1024),) and plan.change_id_from == "*"
        assert plan.base_run is None
    hv.vms[uuid].disks[2000].refuse_all = "FileFault"
    for what, prev in cases.items():
        # vCenter refuses '*' as well: the whole capacity
        plan = plan_disk(hv, uuid, snap.ref, disk, prev)
        assert plan.mode == "full", what
        assert plan.extents == (Extent(0, disk.capacity),) and plan.base_run is None
        assert "allocated areas refused (FileFault)" in plan.reason
    hv.vms[uuid].disks[2000].refuse_all = None
    first = plan_disk(hv, uuid, snap.ref, disk, None)
    assert first.mode == "allocated" and first.change_id_from == "*"
    same = plan_disk(hv, uuid, snap.ref, disk, _prev(disk.uuid, disk.capacity, f"{disk.uuid}/0"))
    assert same.mode == "incremental" and same.base_run == "r-prev"


class OpaqueIds(FakeHypervisor):
    """A hypervisor whose changeIds are opaque strings (not `uuid/seq`)."""

    def __init__(self, refuse: bool = False) -> None:
        super().__init__()
        self.asked: list[str] = []
        self.refuse = refuse

    def query_changed_areas(
        self, uuid: str, snapshot_ref: str, disk_key: int, start_offset: int, change_id: str
    ) -> ChangedAreas:
        from connector.errors import ChangeIdRefused

        self.asked.append(change_id)
        if change_id == "*":
            return ChangedAreas(start_offset, 32 * MiB - start_offset, (Extent(0, 2 * MiB),))
        if self.refuse:
            raise ChangeIdRefused(f"unknown change id {change_id}", "InvalidArgument")
        return ChangedAreas(start_offset, 32 * MiB - start_offset, (Extent(MiB, 4096),))


@pytest.mark.parametrize(("stored", "now"), [("token-7", "token-8"), ("a/b/c", "x y z")])
def test_a_change_id_of_another_form_is_tried_as_opaque(stored: str, now: str) -> None:
    hv, uuid = setup()
    snap = hv.create_snapshot(uuid, "s", "")
    disk = replace(snap.disks[0], change_id=now)
    opaque = OpaqueIds()
    plan = plan_disk(opaque, uuid, snap.ref, disk, _prev(disk.uuid, disk.capacity, stored))
    assert opaque.asked == [stored]  # asked as it is, not taken for a CBT reset
    assert plan.mode == "incremental" and plan.extents == (Extent(MiB, 4096),)
    assert plan.base_run == "r-prev"
    # only a refusal makes a full read (of the allocated areas)
    refusing = OpaqueIds(refuse=True)
    plan = plan_disk(refusing, uuid, snap.ref, disk, _prev(disk.uuid, disk.capacity, stored))
    assert refusing.asked == [stored, "*"]
    assert plan.mode == "allocated" and "InvalidArgument" in plan.reason
    assert plan.extents == (Extent(0, 2 * MiB),) and plan.base_run is None


def test_a_vsphere_change_id_with_another_uuid_is_a_reset_without_asking() -> None:
    hv, uuid = setup()
    snap = hv.create_snapshot(uuid, "s", "")
    disk = replace(snap.disks[0], change_id="52 de c0 11/9")
    opaque = OpaqueIds()
    plan = plan_disk(opaque, uuid, snap.ref, disk, _prev(disk.uuid, disk.capacity, "52 aa/4"))
    assert opaque.asked == ["*"]
    assert plan.mode == "allocated" and "CBT was reset" in plan.reason
