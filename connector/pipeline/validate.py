"""Stage `validate`: before anything is changed, the VM can be replicated
correctly, CBT is on (where policy allows turning it on), and S3 answers.

Leftover `connector-*` snapshots of dead runs are swept first (their runs are
recorded FAILED, their locks removed). The run's lock is written before any
deduplication lookup, so that purge keeps what this run may reference.
"""

from __future__ import annotations

from connector.domain.model import VmInfo
from connector.errors import UnsupportedSourceError
from connector.logging import get_logger
from connector.pipeline.context import RunRef, StageContext, release_lock
from connector.pipeline.snapshot import (
    SNAPSHOT_PREFIX,
    fail_interrupted,
    is_ours,
    snapshot_name,
    sweep_leftovers,
)

log = get_logger(__name__)


def run(ctx: StageContext, ref: RunRef) -> None:
    ctx.reporter.stage(ref.run_id, "validate", "")
    vm = ctx.hv.get_vm(ref.vm_uuid)
    ctx.catalog.upsert_server(vm)
    own = snapshot_name(ref.run_id)
    swept: list[str] = []
    if any(s.name != own and is_ours(s) for s in vm.snapshots):
        swept = sweep_leftovers(ctx.hv, vm)
        ctx.ledger.snapshots_removed(ref.vm_uuid, swept)
        fail_interrupted(ctx.runs, swept, keep=ref.run_id)
        vm = ctx.hv.get_vm(ref.vm_uuid)
    check_vm(vm, ctx.settings.needs_no_foreign_snapshots)
    if not vm.cbt_enabled and ctx.settings.enable_cbt:
        ctx.reporter.stage(ref.run_id, "validate", "enabling Changed Block Tracking")
        ctx.hv.enable_cbt(vm.uuid)
    repo = ctx.reopen_repo()  # S3 must answer before a snapshot is taken
    for name in swept:  # the run that left it behind is dead: so is its lock
        release_lock(repo, name.removeprefix(SNAPSHOT_PREFIX))
    ctx.audit_start(ref)
    ctx.write_lock(ref, vm)


def check_vm(vm: VmInfo, needs_no_foreign_snapshots: bool) -> None:
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
