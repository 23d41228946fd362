"""The changed-areas stage: paging, the fallbacks, and answers that cannot be trusted."""

from __future__ import annotations

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
        plan = plan_disk(hv, uuid, snap.ref, disk, prev)
        assert plan.mode == "full", what
        assert plan.extents == (Extent(0, disk.capacity),)
    first = plan_disk(hv, uuid, snap.ref, disk, None)
    assert first.mode == "allocated" and first.change_id_from == "*"
    same = plan_disk(hv, uuid, snap.ref, disk, _prev(disk.uuid, disk.capacity, f"{disk.uuid}/0"))
    assert same.mode == "incremental" and same.base_run == "r-prev"
