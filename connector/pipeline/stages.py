"""One replication run as resumable, idempotent stages.

validate -> snapshot -> changes -> transfer -> commit -> cleanup

Each stage persists what it did in the run ledger, keyed by (run, stage, disk),
so that running a stage again (a retry, or a resume after the process died)
skips the work already done and repeats no side effect:

- validate: the VM is there and can be replicated, CBT is on, S3 answers.
- snapshot: `connector-<run id>` is recorded in the ledger BEFORE it is created;
  a retry adopts the snapshot of that name instead of taking a second one.
- changes: per disk, the extents to read (QueryChangedDiskAreas, paged), stored.
- transfer: per disk, read, pack, upload, then the disk's manifest (written after
  every pack it names). A disk is redone from its start after a crash; blocks
  already uploaded are found in the block index and not uploaded again.
- commit: the run record, written once, after every manifest; then the disks'
  next changeIds are stored. A run without its commit object does not exist.
- cleanup: the snapshot is removed; only then is the run COMPLETED.

`abort` rolls a failed run back: its snapshot is removed and the run is FAILED
with the reason (or COMPLETED with a note when the failure came after commit).
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from connector.adapters.ledger import NO_DISK, SNAPSHOT, Effect, RunLedger
from connector.adapters.state import DiskStateRow, RunDiskRow, StateStore
from connector.domain.model import DiskInfo, Extent, SnapshotInfo, VmInfo
from connector.errors import ConnectorError, NotFoundError, PermanentError
from connector.faults import crash_point
from connector.logging import get_logger, scrub
from connector.pipeline.changes import DiskPlan, plan_disk, skip_unallocated
from connector.pipeline.commit import DiskCommit, build_manifest
from connector.pipeline.snapshot import SNAPSHOT_PREFIX, snapshot_name, sweep_leftovers, validate
from connector.pipeline.transfer import allocated_extents, transfer_disk
from connector.ports import Auditor, DiskSource, Hypervisor
from connector.store.repository import DEFAULT_PACK_SIZE, Repository, RunLock, commit_key

log = get_logger(__name__)

STAGES = ("validate", "snapshot", "changes", "transfer", "commit", "cleanup")
DONE = "done"
_NEXT = dict(zip(STAGES, (*STAGES[1:], DONE), strict=True))

INTERRUPTED = (
    "interrupted: the connector stopped during this run; its snapshot was removed and "
    "nothing of the run was committed"
)


class Reporter(Protocol):
    """Receives progress events of a run (the CLI draws them; the daemon records them)."""

    def stage(self, run_id: str, stage: str, detail: str = "") -> None: ...

    def disk_progress(self, run_id: str, disk_key: int, done: int, total: int) -> None: ...


class StageInterrupted(Exception):
    """The connector is stopping: the stage stopped at a safe point and resumes later."""


@dataclass
class PipelineSettings:
    enable_cbt: bool = True
    max_read: int = 8 * 1024 * 1024
    pack_size: int = DEFAULT_PACK_SIZE
    needs_no_foreign_snapshots: bool = True
    max_disks_per_vm: int = 1


def next_stage(stage: str) -> str:
    return _NEXT[stage]


class RunPipeline:
    def __init__(
        self,
        hv: Hypervisor,
        source: DiskSource,
        open_repo: Callable[[], Repository],
        state: StateStore,
        ledger: RunLedger,
        settings: PipelineSettings,
        reporter: Reporter,
        should_stop: Callable[[], bool] = lambda: False,
        audit: Auditor | None = None,
    ) -> None:
        self.hv = hv
        self.source = source
        self.open_repo = open_repo
        self.state = state
        self.ledger = ledger
        self.settings = settings
        self.reporter = reporter
        self.should_stop = should_stop
        self.audit = audit
        self._repo: Repository | None = None
        self._repo_lock = threading.Lock()

    # -- driving -------------------------------------------------------------------

    def execute(self, run_id: str, stage: str) -> str:
        """Run one stage of the run (again, if it ran before); return the next stage."""
        run = self.state.run(run_id)
        vm_uuid = self.state.server(run.server_id).vm_uuid
        step: Callable[[str, str, str], None] = getattr(self, f"_{stage}")
        self.state.set_stage(run_id, stage)
        step(run_id, run.server_id, vm_uuid)
        return next_stage(stage)

    def repo(self) -> Repository:
        with self._repo_lock:
            if self._repo is None:
                self._repo = self.open_repo()
            return self._repo

    # -- stages --------------------------------------------------------------------

    def _validate(self, run_id: str, server_id: str, vm_uuid: str) -> None:
        rep = self.reporter
        rep.stage(run_id, "validate", "")
        vm = self.hv.get_vm(vm_uuid)
        self.state.upsert_server(vm)
        own = snapshot_name(run_id)
        if any(s.name != own and s.name.startswith(SNAPSHOT_PREFIX) for s in vm.snapshots):
            swept = sweep_leftovers(self.hv, vm)
            self.ledger.snapshots_removed(vm_uuid, swept)
            fail_interrupted(self.state, swept, keep=run_id)
            vm = self.hv.get_vm(vm_uuid)
        else:
            swept = []
        validate(vm, self.settings.needs_no_foreign_snapshots)
        if not vm.cbt_enabled and self.settings.enable_cbt:
            rep.stage(run_id, "validate", "enabling Changed Block Tracking")
            self.hv.enable_cbt(vm.uuid)
        # S3 must answer before a snapshot is taken.
        with self._repo_lock:
            self._repo = self.open_repo()
        for name in swept:  # the run that left it behind is dead: so is its lock
            release_lock(self._repo, name.removeprefix(SNAPSHOT_PREFIX))
        self._audit_start(run_id, vm_uuid)
        # Before any dedup lookup: purge keeps what this run may reference (docs/format.md).
        self._write_lock(run_id, server_id, vm)

    def _snapshot(self, run_id: str, server_id: str, vm_uuid: str) -> None:
        name = snapshot_name(run_id)
        self.reporter.stage(run_id, "snapshot", name)
        effect = self.ledger.snapshot_intent(run_id, vm_uuid, name)
        if effect.ref:
            return  # created and recorded by an earlier attempt
        vm = self.hv.get_vm(vm_uuid)
        existing = [s for s in vm.snapshots if s.name == name]
        if existing:
            # The process died after creating it but before recording it: adopt it.
            log.info("adopting the snapshot of an interrupted attempt", run=run_id, snapshot=name)
            snap = self.hv.get_snapshot(vm_uuid, existing[0].ref)
            for extra in existing[1:]:
                self.hv.remove_snapshot(vm_uuid, extra.ref)
        else:
            crash_point("snapshot-create")
            snap = self.hv.create_snapshot(vm_uuid, name, f"replication run {run_id}")
            crash_point("snapshot-created")
        self.ledger.snapshot_created(effect.id, snap)
        self.state.set_stage(run_id, "snapshot", snapshot_name=name, snapshot_ref=snap.ref)

    def _changes(self, run_id: str, server_id: str, vm_uuid: str) -> None:
        snap = self._run_snapshot(run_id)
        done = self.ledger.steps(run_id, "changes")
        for disk in sorted(snap.disks, key=lambda d: d.key):
            if disk.key in done:
                continue
            self._check_stop()
            self.reporter.stage(run_id, "changes", f"disk {disk.key}")
            previous = self.state.disk_state(server_id, disk.key)
            plan = plan_disk(self.hv, vm_uuid, snap.ref, disk, previous)
            log.info(
                "disk plan",
                run=run_id,
                disk=disk.key,
                mode=plan.mode,
                reason=plan.reason,
                changed=plan.bytes_changed,
            )
            crash_point("changes")
            self.ledger.step_done(
                run_id,
                "changes",
                disk.key,
                plan_to_json(plan, previous.chain_length if previous else 0),
            )

    def _transfer(self, run_id: str, server_id: str, vm_uuid: str) -> None:
        snap = self._run_snapshot(run_id)
        plans = self.ledger.steps(run_id, "changes")
        done = self.ledger.steps(run_id, "transfer")
        todo = [d for d in sorted(snap.disks, key=lambda d: d.key) if d.key not in done]
        if not todo:
            return
        vm = self.hv.get_vm(vm_uuid)
        repo = self.repo()
        # Again (it is idempotent): a resumed run may come from a process that has ended.
        self._write_lock(run_id, server_id, vm)
        workers = min(self.settings.max_disks_per_vm, len(todo))
        if workers <= 1:
            for disk in todo:
                self._transfer_disk(run_id, server_id, vm, snap, disk, plans[disk.key], repo)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"disk-{run_id}") as pool:
            futures = [
                pool.submit(self._transfer_disk, run_id, server_id, vm, snap, d, plans[d.key], repo)
                for d in todo
            ]
            errors = [f.exception() for f in futures]
        for exc in errors:
            if exc is not None:
                raise exc

    def _transfer_disk(
        self,
        run_id: str,
        server_id: str,
        vm: VmInfo,
        snap: SnapshotInfo,
        disk: DiskInfo,
        plan_json: dict[str, Any],
        repo: Repository,
    ) -> None:
        plan = plan_from_json(disk, plan_json)
        self.reporter.stage(run_id, "transfer", f"disk {disk.key}: {plan.mode} ({plan.reason})")

        def on_pack(pack_id: str, size: int, _refs: object) -> None:
            self.state.record_pack(pack_id, size, run_id)
            crash_point("pack-uploaded")

        writer = repo.pack_writer(self.state, self.settings.pack_size, on_pack=on_pack)
        report = functools.partial(self.reporter.disk_progress, run_id, disk.key)

        def progress(done: int, total: int) -> None:
            report(done, total)
            self._check_stop()

        reader = self.source.open(vm, snap, disk)
        try:
            plan = skip_unallocated(plan, allocated_extents(reader))
            compare_with = None
            if plan.mode == "compare" and plan.base_run is not None:
                base = repo.read_manifest(server_id, plan.base_run, disk.key)
                compare_with = repo.resolve_map(base)
            result = transfer_disk(
                reader,
                writer,
                plan.extents,
                disk.capacity,
                repo.block_size,
                self.settings.max_read,
                progress,
                compare_with=compare_with,
            )
        finally:
            reader.close()
        bytes_changed = result.bytes_changed if compare_with is not None else plan.bytes_changed
        writer.flush()
        crash_point("before-manifest")
        row = RunDiskRow(
            run_id=run_id,
            disk_key=disk.key,
            mode=plan.mode,
            reason=plan.reason,
            capacity=disk.capacity,
            change_id_from=plan.change_id_from,
            change_id_to=disk.change_id,
            bytes_changed=bytes_changed,
            bytes_read=result.bytes_read,
            bytes_uploaded=writer.bytes_stored,
            blocks_new=writer.blocks_new,
            blocks_dedup=writer.blocks_dedup,
            blocks_zero=result.blocks_zero,
        )
        dc = DiskCommit(
            disk_key=disk.key,
            disk_uuid=disk.uuid,
            capacity=disk.capacity,
            change_id=disk.change_id,
            base_run=plan.base_run,
            changes=result.changes,
            previous_chain=int(plan_json["previous_chain"]),
            stats={"mode": plan.mode, "reason": plan.reason},
        )
        manifest, chain = build_manifest(repo, server_id, run_id, snap.name, snap.ref, dc)
        row.manifest_key = repo.write_manifest(manifest)
        self.state.record_run_disk(row)
        self.ledger.step_done(
            run_id,
            "transfer",
            disk.key,
            {
                "chain": chain,
                "merkle_root": manifest.merkle_root.hex(),
                "capacity": disk.capacity,
                "disk_uuid": disk.uuid,
                "change_id": disk.change_id,
                "bytes_read": result.bytes_read,
                "bytes_changed": bytes_changed,
                "bytes_uploaded": writer.bytes_uploaded,
                "blocks_new": writer.blocks_new,
                "blocks_dedup": writer.blocks_dedup,
                "packs": len(writer.packs_written),
            },
        )
        crash_point("manifest-written")

    def _commit(self, run_id: str, server_id: str, vm_uuid: str) -> None:
        crash_point("before-commit")
        self.reporter.stage(run_id, "commit", "writing the run record")
        snap = self._run_snapshot(run_id)
        results = self.ledger.steps(run_id, "transfer")
        keys = sorted(d.key for d in snap.disks)
        missing = [k for k in keys if k not in results]
        if missing:
            raise PermanentError(
                f"run {run_id} reached commit without the manifests of disks {missing}"
            )
        stats = {
            name: sum(int(results[k][name]) for k in keys)
            for name in (
                "bytes_read",
                "bytes_changed",
                "bytes_uploaded",
                "blocks_new",
                "blocks_dedup",
                "packs",
            )
        }
        repo = self.repo()
        if repo.objects.stat(commit_key(server_id, run_id)) is None:
            repo.write_commit(
                server_id,
                run_id,
                {
                    "run_id": run_id,
                    "server_id": server_id,
                    "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "snapshot": {"name": snap.name, "ref": snap.ref},
                    "disks": [
                        {
                            "disk_key": k,
                            "capacity": results[k]["capacity"],
                            "merkle_root": results[k]["merkle_root"],
                        }
                        for k in keys
                    ],
                    "stats": stats,
                },
            )
        crash_point("after-commit")
        next_states = [
            DiskStateRow(
                server_id=server_id,
                disk_key=k,
                disk_uuid=results[k]["disk_uuid"],
                capacity=int(results[k]["capacity"]),
                change_id=results[k]["change_id"],
                last_run_id=run_id,
                chain_length=int(results[k]["chain"]),
            )
            for k in keys
        ]
        self.state.record_commit(run_id, server_id, next_states, stats)
        self.ledger.step_done(run_id, "commit", NO_DISK, {"committed": True})
        self.reporter.stage(run_id, "commit", "committed")

    def _cleanup(self, run_id: str, server_id: str, vm_uuid: str) -> None:
        self.reporter.stage(run_id, "cleanup", snapshot_name(run_id))
        self.remove_run_snapshots(run_id)
        self.release_lock(run_id)
        self.state.finish_run(run_id)
        self._audit_finish(run_id, vm_uuid)

    # -- rollback ------------------------------------------------------------------

    def committed(self, run_id: str) -> bool:
        return self.ledger.step(run_id, "commit") is not None

    def abort(self, run_id: str, reason: str, best_effort: bool = False) -> None:
        """Remove the run's snapshot, then mark it FAILED with `reason` (COMPLETED with
        a note when its commit was already recorded).

        A failure to remove the snapshot is raised (the caller retries) unless
        `best_effort`, which records the run's end anyway and leaves the snapshot
        to startup recovery.
        """
        note = ""
        try:
            self.remove_run_snapshots(run_id)
        except ConnectorError as exc:
            if not best_effort:
                raise
            note = f"; its snapshot could not be removed ({exc}) and is removed at the next start"
        self.release_lock(run_id)
        if self.committed(run_id):
            self.state.finish_run(run_id, note=f"replica committed; then: {reason}{note}")
        else:
            self.state.fail_run(run_id, f"{reason}{note}")
        self._audit_finish(run_id, None, reason)

    def remove_run_snapshots(self, run_id: str) -> None:
        for effect in self.ledger.pending(SNAPSHOT, run_id):
            crash_point("snapshot-remove")
            remove_snapshot_effect(self.hv, effect)
            crash_point("snapshot-removed")
            self.ledger.undone(effect.id)

    # -- run locks and audit ----------------------------------------------------------

    def _write_lock(self, run_id: str, server_id: str, vm: VmInfo) -> None:
        bases = set()
        for disk in vm.disks:
            row = self.state.disk_state(server_id, disk.key)
            if row is not None:
                bases.add(row.last_run_id)
        self.repo().write_lock(
            RunLock(
                run_id=run_id,
                server_id=server_id,
                started_at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                host=socket.gethostname(),
                pid=os.getpid(),
                base_runs=tuple(sorted(bases)),
            )
        )

    def release_lock(self, run_id: str) -> None:
        """Remove the run's lock from the store; one left behind purge reports as stale."""
        try:
            repo = self.repo()
        except ConnectorError as exc:
            log.warning(
                "the run's lock could not be removed; purge reports it as stale",
                run=run_id,
                error=scrub(str(exc)),
            )
            return
        release_lock(repo, run_id)

    def _audit_start(self, run_id: str, vm_uuid: str) -> None:
        if self.audit is None or self.ledger.step(run_id, "audit") is not None:
            return
        run = self.state.run(run_id)
        self.audit.record("run.start", f"vm {vm_uuid}", "started", run=run_id, type=run.type)
        self.ledger.step_done(run_id, "audit", NO_DISK, {"started": True})

    def _audit_finish(self, run_id: str, vm_uuid: str | None, error: str | None = None) -> None:
        if self.audit is None:
            return
        run = self.state.run(run_id)
        if vm_uuid is None:
            try:
                vm_uuid = self.state.server(run.server_id).vm_uuid
            except NotFoundError:
                vm_uuid = run.server_id
        what = f"vm {vm_uuid}"
        if run.state == "FAILED":
            self.audit.record(
                "run.finish", what, "failure", run=run_id, error=error or run.error or ""
            )
            return
        self.audit.record(
            "run.finish",
            what,
            "success",
            run=run_id,
            state=run.state,
            bytes_read=sum(d.bytes_read for d in run.disks),
        )

    # -- helpers -------------------------------------------------------------------

    def _run_snapshot(self, run_id: str) -> SnapshotInfo:
        for effect in self.ledger.pending(SNAPSHOT, run_id):
            if effect.ref:
                return effect.snapshot()
        raise PermanentError(f"run {run_id} has no recorded snapshot; it cannot go on")

    def _check_stop(self) -> None:
        if self.should_stop():
            raise StageInterrupted("the connector is stopping")


def release_lock(repo: Repository, run_id: str) -> None:
    try:
        repo.remove_lock(run_id)
    except ConnectorError as exc:
        log.warning(
            "the run's lock could not be removed; purge reports it as stale",
            run=run_id,
            error=scrub(str(exc)),
        )


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


def fail_interrupted(state: StateStore, snapshot_names: list[str], keep: str = "") -> None:
    """Runs whose snapshot was left behind died with their process: record why."""
    for name in snapshot_names:
        run_id = name.removeprefix(SNAPSHOT_PREFIX)
        if run_id == keep:
            continue
        try:
            run = state.run(run_id)
        except NotFoundError:
            continue
        if run.state == "ACTIVE":
            state.fail_run(run_id, INTERRUPTED)


def plan_to_json(plan: DiskPlan, previous_chain: int) -> dict[str, Any]:
    return {
        "mode": plan.mode,
        "reason": plan.reason,
        "extents": [[e.offset, e.length] for e in plan.extents],
        "change_id_from": plan.change_id_from,
        "base_run": plan.base_run,
        "previous_chain": previous_chain,
    }


def plan_from_json(disk: DiskInfo, doc: dict[str, Any]) -> DiskPlan:
    return DiskPlan(
        disk=disk,
        mode=doc["mode"],
        reason=doc["reason"],
        extents=tuple(Extent(int(o), int(n)) for o, n in doc["extents"]),
        change_id_from=doc["change_id_from"],
        base_run=doc["base_run"],
    )
