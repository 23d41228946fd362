"""Stage `snapshot`: the VM snapshot `connector-<run id>` the run reads from.

The snapshot's name is in the ledger BEFORE it is created, so a retry (or a
resume after the process died) adopts the snapshot of that name instead of
taking a second one. Also here: what finds and removes the connector's
snapshots afterwards (cleanup, rollback, startup recovery, the leftover sweep).
"""

from __future__ import annotations

from connector.domain.jobs import RUN_ACTIVE
from connector.domain.model import SnapshotInfo, VmInfo
from connector.domain.records import SNAPSHOT, Effect
from connector.errors import NotFoundError
from connector.faults import crash_point
from connector.logging import get_logger
from connector.pipeline.context import RunRef, StageContext
from connector.ports import Hypervisor, Runs, SideEffects

SNAPSHOT_PREFIX = "connector-"
INTERRUPTED = (
    "interrupted: the connector stopped during this run; its snapshot was removed and "
    "nothing of the run was committed"
)
log = get_logger(__name__)


def run(ctx: StageContext, ref: RunRef) -> None:
    name = snapshot_name(ref.run_id)
    ctx.reporter.stage(ref.run_id, "snapshot", name)
    effect = ctx.ledger.snapshot_intent(ref.run_id, ref.vm_uuid, name)
    if effect.ref:
        return  # created and recorded by an earlier attempt
    vm = ctx.hv.get_vm(ref.vm_uuid)
    existing = [s for s in vm.snapshots if s.name == name]
    if existing:
        # The process died after creating it but before recording it: adopt it.
        log.info("adopting the snapshot of an interrupted attempt", run=ref.run_id, snapshot=name)
        snap = ctx.hv.get_snapshot(ref.vm_uuid, existing[0].ref)
        for extra in existing[1:]:
            ctx.hv.remove_snapshot(ref.vm_uuid, extra.ref)
    else:
        crash_point("snapshot-create")
        snap = ctx.hv.create_snapshot(ref.vm_uuid, name, f"replication run {ref.run_id}")
        crash_point("snapshot-created")
    ctx.ledger.snapshot_created(effect.id, snap)
    ctx.runs.set_stage(ref.run_id, "snapshot", snapshot_name=name, snapshot_ref=snap.ref)


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


def remove_run_snapshots(hv: Hypervisor, effects: SideEffects, run_id: str) -> None:
    """Remove every snapshot the ledger records for the run, and settle the entries."""
    for effect in effects.pending(SNAPSHOT, run_id):
        crash_point("snapshot-remove")
        remove_snapshot_effect(hv, effect)
        crash_point("snapshot-removed")
        effects.undone(effect.id)


def remove_snapshot_effect(hv: Hypervisor, effect: Effect) -> None:
    """Remove the snapshot a ledger entry stands for, found by ref or by name."""
    try:
        vm = hv.get_vm(effect.target)
    except NotFoundError:
        log.warning("the VM of a recorded snapshot is gone", vm=effect.target, name=effect.name)
        return
    for snap in vm.snapshots:
        if snap.ref == effect.ref or snap.name == effect.name:
            log.info("removing snapshot", vm=effect.target, snapshot=snap.name, ref=snap.ref)
            hv.remove_snapshot(effect.target, snap.ref)


def fail_interrupted(runs: Runs, snapshot_names: list[str], keep: str = "") -> None:
    """Runs whose snapshot was left behind died with their process: record why."""
    for name in snapshot_names:
        run_id = name.removeprefix(SNAPSHOT_PREFIX)
        if run_id == keep:
            continue
        try:
            found = runs.run(run_id)
        except NotFoundError:
            continue
        if found.state == RUN_ACTIVE:
            runs.fail_run(run_id, INTERRUPTED)
