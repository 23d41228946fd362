"""Stages `validate`, `snapshot` and `cleanup`: what is checked before a run, and
the VM snapshot the run reads from."""

from __future__ import annotations

from connector.domain.model import SnapshotInfo, VmInfo
from connector.errors import UnsupportedSourceError
from connector.logging import get_logger
from connector.ports import Hypervisor

SNAPSHOT_PREFIX = "connector-"
log = get_logger(__name__)


def is_ours(snapshot: SnapshotInfo) -> bool:
    return snapshot.name.startswith(SNAPSHOT_PREFIX)


def snapshot_name(run_id: str) -> str:
    return f"{SNAPSHOT_PREFIX}{run_id}"


def sweep_leftovers(hv: Hypervisor, vm: VmInfo) -> list[str]:
    """Remove snapshots this connector left behind (a killed process). Others are untouched."""
    removed = []
    for snap in vm.snapshots:
        if is_ours(snap):
            log.warning("removing a leftover snapshot", vm=vm.uuid, snapshot=snap.name)
            hv.remove_snapshot(vm.uuid, snap.ref)
            removed.append(snap.name)
    return removed


def validate(vm: VmInfo, needs_no_foreign_snapshots: bool) -> None:
    """Refuse, before anything is changed, a VM that cannot be replicated correctly."""
    who = f"VM {vm.name!r} ({vm.uuid})"
    for disk in vm.disks:
        if disk.rdm:
            raise UnsupportedSourceError(
                f"{who}: disk {disk.key} ({disk.label}) is a raw device mapping, which cannot be "
                "snapshotted or tracked; remove it from the VM or exclude the VM"
            )
        if disk.independent:
            raise UnsupportedSourceError(
                f"{who}: disk {disk.key} ({disk.label}) is independent, so snapshots do not cover "
                "it; make it dependent to replicate this VM"
            )
    foreign = [s.name for s in vm.snapshots if not is_ours(s)]
    if foreign and needs_no_foreign_snapshots:
        raise UnsupportedSourceError(
            f"{who} already has snapshots ({', '.join(foreign)}); the datastore-https transport "
            "reads the base disk file, which is not the point in time of a new snapshot. "
            "Delete or consolidate those snapshots, or use the vddk transport"
        )
    if foreign:
        log.warning("VM already carries snapshots", vm=vm.uuid, count=len(foreign))
