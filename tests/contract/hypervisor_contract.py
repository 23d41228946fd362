"""The Hypervisor contract: every implementation, fake included, must pass this one suite.

Each implementation comes with a `HypervisorWorld`: a small adapter that knows how to
make the scenario on that backend (add a VM with disks, write bytes to a disk so that
change tracking records them, make the server refuse change ids) and gives the
`Hypervisor` under test. Subclass `ChangeTrackingContract`, or `NoChangeTrackingContract`
for an implementation without changed block tracking (its queries must all be refused,
so the pipeline falls back to comparing block hashes), and provide the `world` fixture.
"""

from __future__ import annotations

import random
import uuid as uuidlib
from typing import ClassVar, Protocol

import pytest

from connector.domain.extents import merge
from connector.domain.model import ChangedAreas, Extent, SnapshotInfo
from connector.errors import ChangeIdRefused, NotFoundError
from connector.ports import Hypervisor

KiB = 1024
MiB = 1024 * KiB
CHANGE_ID_FAULTS = ("InvalidArgument", "FileFault")
SIZES = [4 * MiB, 1 * MiB]
MAX_PAGES = 10_000


class HypervisorWorld(Protocol):
    """What the contract needs to set its scenario up on one implementation."""

    @property
    def hv(self) -> Hypervisor:
        """The implementation under test, seeing every VM added so far."""
        ...

    def add_vm(self, name: str, sizes: list[int], *, cbt: bool = True) -> str:
        """A VM with zeroed disks of these byte sizes; its instance UUID.

        With `cbt`, changed block tracking is on (where the backend has it).
        """
        ...

    def disk_keys(self, uuid: str) -> list[int]:
        """The VM's disk keys, in the order the hypervisor lists its disks."""
        ...

    def write(self, uuid: str, disk_key: int, offset: int, data: bytes) -> None:
        """Write into the live disk, as the guest would (change tracking sees it)."""
        ...

    def refuse_change_ids(self, uuid: str, disk_key: int, fault: str) -> None:
        """From now on the server refuses every change id but "*" with `fault`."""
        ...


def vm_name() -> str:
    return f"contract-{uuidlib.uuid4().hex[:8]}"


def data(length: int, seed: int) -> bytes:
    """Bytes with no zero among them (a write of zeros could pass for allocated space)."""
    rng = random.Random(seed)
    return bytes(rng.randrange(1, 256) for _ in range(length))


def all_areas(
    hv: Hypervisor, uuid: str, snapshot_ref: str, disk_key: int, capacity: int, change_id: str
) -> tuple[list[Extent], int]:
    """Every changed area, paged by startOffset as the pipeline does; and the page count.

    Checks on the way that the pages tile [0, capacity): each starts where the last
    one ended, none is empty, and each page's areas lie inside it, in order.
    """
    areas: list[Extent] = []
    position, pages = 0, 0
    while position < capacity:
        page: ChangedAreas = hv.query_changed_areas(
            uuid, snapshot_ref, disk_key, position, change_id
        )
        pages += 1
        assert pages < MAX_PAGES, "the pages do not advance"
        assert page.start_offset == position
        assert page.length > 0
        end = page.start_offset + page.length
        assert end <= capacity
        last = position
        for extent in page.extents:
            assert extent.length > 0
            assert last <= extent.offset and extent.end <= end, (extent, page)
            last = extent.end
        areas.extend(page.extents)
        position = end
    assert position == capacity
    return areas, pages


def covers(areas: list[Extent], extent: Extent) -> bool:
    return any(a.offset <= extent.offset and extent.end <= a.end for a in merge(areas))


class HypervisorContract:
    """What every hypervisor does; a test class takes one of the two subclasses below."""

    #: the implementation has changed block tracking (set by the subclasses)
    tracks_changes: ClassVar[bool]

    @pytest.fixture
    def world(self) -> HypervisorWorld:
        raise NotImplementedError("a contract subclass must provide the `world` fixture")

    # -- inventory

    def test_list_vms_contains_a_known_vm(self, world: HypervisorWorld) -> None:
        name = vm_name()
        uuid = world.add_vm(name, SIZES)
        hv = world.hv
        vm = next(v for v in hv.list_vms() if v.uuid == uuid)
        assert vm.name == name
        assert [d.key for d in vm.disks] == world.disk_keys(uuid)
        assert [d.capacity for d in vm.disks] == SIZES
        assert vm.snapshots == ()
        assert vm.cbt_enabled is self.tracks_changes
        assert hv.get_vm(uuid) == vm

    def test_get_vm_of_an_unknown_uuid_raises_not_found(self, world: HypervisorWorld) -> None:
        world.add_vm(vm_name(), SIZES)
        with pytest.raises(NotFoundError):
            world.hv.get_vm(str(uuidlib.uuid4()))

    def test_snapshot_operations_on_an_unknown_vm_raise_not_found(
        self, world: HypervisorWorld
    ) -> None:
        uuid = world.add_vm(vm_name(), SIZES)
        hv = world.hv
        snap = hv.create_snapshot(uuid, "connector-known", "")
        unknown = str(uuidlib.uuid4())
        with pytest.raises(NotFoundError):
            hv.create_snapshot(unknown, "connector-x", "")
        with pytest.raises(NotFoundError):
            hv.get_snapshot(unknown, snap.ref)
        with pytest.raises(NotFoundError):
            hv.remove_snapshot(unknown, snap.ref)  # unlike a snapshot that is gone
        hv.remove_snapshot(uuid, snap.ref)

    # -- snapshots

    def test_create_snapshot_then_get_snapshot_gives_the_frozen_disks(
        self, world: HypervisorWorld
    ) -> None:
        uuid = world.add_vm(vm_name(), SIZES)
        hv = world.hv
        snap = hv.create_snapshot(uuid, "connector-run1", "first run")
        assert snap.name == "connector-run1"
        assert [d.key for d in snap.disks] == world.disk_keys(uuid)
        assert [d.capacity for d in snap.disks] == SIZES
        for disk in snap.disks:
            if self.tracks_changes:
                assert disk.change_id, disk  # the point to ask for changes since, next time
                assert disk.change_id != "*"
            else:
                assert disk.change_id is None
        assert hv.get_snapshot(uuid, snap.ref) == snap
        assert [(s.ref, s.name) for s in hv.get_vm(uuid).snapshots] == [(snap.ref, snap.name)]
        hv.remove_snapshot(uuid, snap.ref)

    def test_remove_snapshot_removes_it_and_again_is_not_an_error(
        self, world: HypervisorWorld
    ) -> None:
        uuid = world.add_vm(vm_name(), SIZES)
        hv = world.hv
        keep = hv.create_snapshot(uuid, "connector-keep", "")
        gone = hv.create_snapshot(uuid, "connector-gone", "")
        hv.remove_snapshot(uuid, gone.ref)
        assert [s.ref for s in hv.get_vm(uuid).snapshots] == [keep.ref]
        with pytest.raises(NotFoundError):
            hv.get_snapshot(uuid, gone.ref)
        hv.remove_snapshot(uuid, gone.ref)  # already gone: not an error
        assert hv.get_snapshot(uuid, keep.ref) == keep
        hv.remove_snapshot(uuid, keep.ref)
        assert hv.get_vm(uuid).snapshots == ()

    def test_get_snapshot_of_an_unknown_ref_raises_not_found(self, world: HypervisorWorld) -> None:
        uuid = world.add_vm(vm_name(), SIZES)
        with pytest.raises(NotFoundError):
            world.hv.get_snapshot(uuid, "snapshot-999999")


class ChangeTrackingContract(HypervisorContract):
    """For a hypervisor with changed block tracking (vSphere and its fake)."""

    tracks_changes = True

    def test_a_snapshot_keeps_its_own_change_ids(self, world: HypervisorWorld) -> None:
        uuid = world.add_vm(vm_name(), SIZES)
        key = world.disk_keys(uuid)[0]
        hv = world.hv
        first = hv.create_snapshot(uuid, "connector-a", "")
        world.write(uuid, key, 0, data(4096, 1))
        second = hv.create_snapshot(uuid, "connector-b", "")
        assert first.disks[0].change_id != second.disks[0].change_id
        assert hv.get_snapshot(uuid, first.ref).disks == first.disks
        assert hv.get_snapshot(uuid, second.ref).disks == second.disks
        hv.remove_snapshot(uuid, second.ref)
        hv.remove_snapshot(uuid, first.ref)

    # -- changed areas

    def write_scattered(self, world: HypervisorWorld, uuid: str, key: int) -> list[Extent]:
        """Nine writes far apart (more areas than one page holds), unaligned."""
        writes = [Extent(0, 4096)] + [
            Extent(i * 448 * KiB + 1000 * i, 3000 + 17 * i) for i in range(1, 9)
        ]
        for i, e in enumerate(writes):
            world.write(uuid, key, e.offset, data(e.length, seed=i))
        return writes

    def test_all_areas_page_over_the_capacity_and_cover_what_was_written(
        self, world: HypervisorWorld
    ) -> None:
        uuid = world.add_vm(vm_name(), SIZES)
        key = world.disk_keys(uuid)[0]
        writes = self.write_scattered(world, uuid, key)
        hv = world.hv
        snap = hv.create_snapshot(uuid, "connector-full", "")
        areas, pages = all_areas(hv, uuid, snap.ref, key, SIZES[0], "*")
        assert pages > 1  # the areas did not fit one page: paging was exercised
        for e in writes:
            assert covers(areas, e), e
        # the untouched second disk: the pages still tile its capacity
        other = world.disk_keys(uuid)[1]
        none, _ = all_areas(hv, uuid, snap.ref, other, SIZES[1], "*")
        assert none == []
        hv.remove_snapshot(uuid, snap.ref)

    def test_changes_since_an_earlier_snapshot_are_exactly_the_writes_since(
        self, world: HypervisorWorld
    ) -> None:
        uuid = world.add_vm(vm_name(), SIZES)
        key = world.disk_keys(uuid)[0]
        hv = world.hv
        self.write_scattered(world, uuid, key)  # before the base: not a change since
        base = hv.create_snapshot(uuid, "connector-base", "")
        since = [
            Extent(100, 50),
            Extent(MiB - 10, 20),  # across a MiB boundary
            Extent(MiB, 8192),  # overlapping the one before
            Extent(2 * MiB + 4096, 4096),
            Extent(2 * MiB + 8192, 4096),  # touching the one before
            Extent(3 * MiB + 7, 1),
            Extent(SIZES[0] - 512, 512),  # the very end
        ]
        for i, e in enumerate(since):
            world.write(uuid, key, e.offset, data(e.length, seed=100 + i))
        # As the pipeline does: our previous snapshot goes before the next one is taken.
        hv.remove_snapshot(uuid, base.ref)
        snap = hv.create_snapshot(uuid, "connector-next", "")
        change_id = base.disks[0].change_id
        assert change_id
        areas, pages = all_areas(hv, uuid, snap.ref, key, SIZES[0], change_id)
        assert merge(areas) == merge(since)
        assert pages > 1
        # nothing changed since the snapshot itself
        own = snap.disks[0].change_id
        assert own
        assert all_areas(hv, uuid, snap.ref, key, SIZES[0], own)[0] == []
        # nor on the disk that was not written
        other_id = base.disks[1].change_id
        assert other_id
        assert all_areas(hv, uuid, snap.ref, snap.disks[1].key, SIZES[1], other_id)[0] == []
        hv.remove_snapshot(uuid, snap.ref)

    @pytest.mark.parametrize("fault", CHANGE_ID_FAULTS)
    def test_a_refused_change_id_raises_change_id_refused_with_the_fault(
        self, world: HypervisorWorld, fault: str
    ) -> None:
        uuid = world.add_vm(vm_name(), SIZES)
        key = world.disk_keys(uuid)[0]
        hv = world.hv
        snap = hv.create_snapshot(uuid, "connector-refused", "")
        change_id = snap.disks[0].change_id
        assert change_id
        world.refuse_change_ids(uuid, key, fault)
        with pytest.raises(ChangeIdRefused) as info:
            hv.query_changed_areas(uuid, snap.ref, key, 0, change_id)
        assert info.value.fault == fault
        # "*" still answers, so a full read can proceed
        all_areas(hv, uuid, snap.ref, key, SIZES[0], "*")
        hv.remove_snapshot(uuid, snap.ref)

    def test_an_unknown_change_id_is_refused(self, world: HypervisorWorld) -> None:
        uuid = world.add_vm(vm_name(), SIZES)
        key = world.disk_keys(uuid)[0]
        hv = world.hv
        snap = hv.create_snapshot(uuid, "connector-unknown", "")
        bogus = "52 de c0 aa bb cc dd ee-ff 00 11 22 33 44 55 66/99"
        with pytest.raises(ChangeIdRefused) as info:
            hv.query_changed_areas(uuid, snap.ref, key, 0, bogus)
        assert info.value.fault in CHANGE_ID_FAULTS
        hv.remove_snapshot(uuid, snap.ref)

    def test_a_query_on_a_removed_snapshot_raises_not_found(self, world: HypervisorWorld) -> None:
        uuid = world.add_vm(vm_name(), SIZES)
        key = world.disk_keys(uuid)[0]
        hv = world.hv
        snap = hv.create_snapshot(uuid, "connector-vanished", "")
        hv.remove_snapshot(uuid, snap.ref)
        with pytest.raises(NotFoundError):
            hv.query_changed_areas(uuid, snap.ref, key, 0, "*")

    def test_enable_cbt_turns_cbt_on(self, world: HypervisorWorld) -> None:
        uuid = world.add_vm(vm_name(), SIZES, cbt=False)
        hv = world.hv
        assert hv.get_vm(uuid).cbt_enabled is False
        untracked = hv.create_snapshot(uuid, "connector-before", "")
        assert [d.change_id for d in untracked.disks] == [None, None]
        hv.remove_snapshot(uuid, untracked.ref)
        hv.enable_cbt(uuid)
        assert hv.get_vm(uuid).cbt_enabled is True
        tracked = hv.create_snapshot(uuid, "connector-after", "")
        assert all(d.change_id for d in tracked.disks)
        hv.remove_snapshot(uuid, tracked.ref)


class NoChangeTrackingContract(HypervisorContract):
    """For a hypervisor without changed block tracking: the pipeline compares hashes."""

    tracks_changes = False

    def test_without_change_tracking_every_query_is_refused(self, world: HypervisorWorld) -> None:
        uuid = world.add_vm(vm_name(), SIZES)
        key = world.disk_keys(uuid)[0]
        hv = world.hv
        hv.enable_cbt(uuid)  # accepted, and changes nothing
        assert hv.get_vm(uuid).cbt_enabled is False
        snap: SnapshotInfo = hv.create_snapshot(uuid, "connector-local", "")
        for change_id in ("*", "52 de c0/4"):
            with pytest.raises(ChangeIdRefused) as info:
                hv.query_changed_areas(uuid, snap.ref, key, 0, change_id)
            assert info.value.fault
        hv.remove_snapshot(uuid, snap.ref)
