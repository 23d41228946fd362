"""Error paths of a run's validation and of restore targets, each with the message the
troubleshooting guide documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.adapters.vddk import VddkParams, VddkSource
from connector.domain.model import DiskInfo, SnapshotInfo, VmInfo
from connector.errors import InvalidInputError, NotFoundError, UnsupportedSourceError
from connector.pipeline.restore import _open_device, check_target
from connector.pipeline.validate import check_vm
from connector.retry import RetryPolicy


def vm_with(disk: DiskInfo) -> VmInfo:
    return VmInfo("4210-uuid", "db-01", "vm-7", "dc", "poweredOn", True, (disk,))


def disk(rdm: bool = False, independent: bool = False) -> DiskInfo:
    return DiskInfo(
        2001,
        "Hard disk 2",
        1 << 30,
        "[ds] db-01/db-01_1.vmdk",
        "flat",
        rdm=rdm,
        independent=independent,
    )


def test_a_raw_device_mapping_or_an_independent_disk_stops_the_run_before_a_snapshot() -> None:
    with pytest.raises(UnsupportedSourceError) as info:
        check_vm(vm_with(disk(rdm=True)), needs_no_foreign_snapshots=True)
    assert str(info.value) == (
        "VM 'db-01' (4210-uuid): disk 2001 (Hard disk 2) is a raw device mapping, which cannot "
        "be snapshotted or tracked; remove it from the VM or exclude the VM"
    )
    with pytest.raises(UnsupportedSourceError) as info:
        check_vm(vm_with(disk(independent=True)), needs_no_foreign_snapshots=True)
    assert str(info.value) == (
        "VM 'db-01' (4210-uuid): disk 2001 (Hard disk 2) is independent, so snapshots do not "
        "cover it; make it dependent to replicate this VM"
    )


def test_a_target_whose_path_cannot_be_examined_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(InvalidInputError) as info:
        check_target(afile / "disk.img", device=False)
    assert str(info.value) == (
        f"cannot use {afile / 'disk.img'} as the restore target: Not a directory; "
        "choose another path"
    )


def test_a_device_that_cannot_be_opened_for_writing_is_refused(tmp_path: Path) -> None:
    gone = tmp_path / "sdz"
    with pytest.raises(InvalidInputError) as info:
        _open_device(gone, 1 << 20)
    assert str(info.value).startswith(f"cannot open the block device {gone} for writing: ")


def test_vddk_refuses_a_disk_its_snapshot_lacks_or_does_not_cover(tmp_path: Path) -> None:
    def no_params() -> VddkParams:
        raise AssertionError("nothing may start for a refused disk")

    source = VddkSource(no_params, tmp_path / "pw", tmp_path / "run", retry=RetryPolicy())
    vm = vm_with(disk())
    empty = SnapshotInfo("snapshot-1", "connector-r-1", ())
    with pytest.raises(NotFoundError) as missing:
        source.open(vm, empty, disk())
    assert str(missing.value) == (
        "VM 'db-01' (4210-uuid): snapshot 'connector-r-1' has no disk 2001"
    )
    raw = SnapshotInfo("snapshot-1", "connector-r-1", (disk(rdm=True),))
    with pytest.raises(UnsupportedSourceError) as uncovered:
        source.open(vm, raw, disk())
    assert str(uncovered.value) == (
        "VM 'db-01' (4210-uuid), disk 2001: raw device mappings and independent disks are not "
        "covered by snapshots"
    )
    assert source.servers == []
