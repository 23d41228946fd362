"""One replication run of one VM, stage by stage.

validate -> snapshot -> changes -> read/pack/upload -> commit -> cleanup.
The snapshot is removed after every run, failed ones included. The next
changeIds are stored only after the run's commit object is durable.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from connector.adapters.state import DiskStateRow, RunDiskRow, RunRow, StateStore
from connector.domain.model import SnapshotInfo, VmInfo
from connector.errors import ConnectorError, NotFoundError
from connector.logging import get_logger, scrub
from connector.pipeline.changes import DiskPlan, plan_disk, skip_unallocated
from connector.pipeline.commit import DiskCommit, build_manifest
from connector.pipeline.snapshot import SNAPSHOT_PREFIX, snapshot_name, sweep_leftovers, validate
from connector.pipeline.transfer import allocated_extents, transfer_disk
from connector.ports import Auditor, DiskSource, Hypervisor
from connector.store.repository import DEFAULT_PACK_SIZE, Repository, RunLock

log = get_logger(__name__)


class Reporter(Protocol):
    """Receives progress events of a run (the CLI draws them; the daemon records them)."""

    def stage(self, run_id: str, stage: str, detail: str = "") -> None: ...

    def disk_progress(self, run_id: str, disk_key: int, done: int, total: int) -> None: ...


class NullReporter:
    def stage(self, run_id: str, stage: str, detail: str = "") -> None:
        log.info("stage", run=run_id, stage=stage, detail=detail)

    def disk_progress(self, run_id: str, disk_key: int, done: int, total: int) -> None:
        return None


@dataclass
class ReplicationSettings:
    enable_cbt: bool = True
    max_read: int = 8 * 1024 * 1024
    pack_size: int = DEFAULT_PACK_SIZE
    needs_no_foreign_snapshots: bool = True


@dataclass
class Replicator:
    hv: Hypervisor
    source: DiskSource
    open_repo: Callable[[], Repository]
    state: StateStore
    settings: ReplicationSettings = field(default_factory=ReplicationSettings)
    reporter: Reporter = field(default_factory=NullReporter)
    audit: Auditor | None = None

    def replicate(self, vm_uuid: str, run_type: str = "ON_DEMAND") -> RunRow:
        vm = self.hv.get_vm(vm_uuid)
        server = self.state.upsert_server(vm)
        swept = sweep_leftovers(self.hv, vm)
        if swept:
            self._fail_interrupted(swept)
            vm = self.hv.get_vm(vm_uuid)
        validate(vm, self.settings.needs_no_foreign_snapshots)
        repo = self.open_repo()
        for name in swept:  # the run that left it behind is dead: so is its lock
            _release_lock(repo, name.removeprefix(SNAPSHOT_PREFIX))
        run_id = new_run_id()
        self.state.create_run(run_id, server.id, run_type)
        log.info("run started", run=run_id, server=server.id, vm=vm.uuid)
        what = f"vm {vm.uuid}"
        if self.audit is not None:
            self.audit.record("run.start", what, "started", run=run_id, type=run_type)
        try:
            # Before any dedup lookup: purge keeps what this run may reference (docs/format.md).
            repo.write_lock(self._lock(server.id, run_id, vm))
            self._run(repo, vm, server.id, run_id)
        except BaseException as exc:
            message = scrub(str(exc)) if isinstance(exc, ConnectorError) else _describe(exc)
            self.state.fail_run(run_id, message)
            log.error("run failed", run=run_id, error=message)
            if self.audit is not None:
                self.audit.record("run.finish", what, "failure", run=run_id, error=message)
            raise
        finally:
            _release_lock(repo, run_id)
        run = self.state.run(run_id)
        if self.audit is not None:
            self.audit.record(
                "run.finish",
                what,
                "success",
                run=run_id,
                state=run.state,
                bytes_read=sum(d.bytes_read for d in run.disks),
            )
        return run

    def _lock(self, server_id: str, run_id: str, vm: VmInfo) -> RunLock:
        bases = set()
        for disk in vm.disks:
            row = self.state.disk_state(server_id, disk.key)
            if row is not None:
                bases.add(row.last_run_id)
        return RunLock(
            run_id=run_id,
            server_id=server_id,
            started_at=_now(),
            host=socket.gethostname(),
            pid=os.getpid(),
            base_runs=tuple(sorted(bases)),
        )

    def _fail_interrupted(self, snapshot_names: list[str]) -> None:
        """Runs whose snapshot was left behind died with their process: record why."""
        for name in snapshot_names:
            run_id = name.removeprefix(SNAPSHOT_PREFIX)
            try:
                run = self.state.run(run_id)
            except NotFoundError:
                continue
            if run.state == "ACTIVE":
                self.state.fail_run(
                    run_id,
                    "interrupted: the connector stopped during this run; its snapshot was "
                    "removed at the next start and nothing of the run was committed",
                )

    def _run(self, repo: Repository, vm: VmInfo, server_id: str, run_id: str) -> None:
        rep = self.reporter
        if not vm.cbt_enabled and self.settings.enable_cbt:
            rep.stage(run_id, "validate", "enabling Changed Block Tracking")
            self.hv.enable_cbt(vm.uuid)
            vm = self.hv.get_vm(vm.uuid)
        name = snapshot_name(run_id)
        rep.stage(run_id, "snapshot", name)
        self.state.set_stage(run_id, "snapshot", snapshot_name=name)
        snap = self.hv.create_snapshot(vm.uuid, name, f"replication run {run_id}")
        self.state.set_stage(run_id, "snapshot", snapshot_ref=snap.ref)
        try:
            self._copy(repo, vm, snap, server_id, run_id)
        finally:
            rep.stage(run_id, "cleanup", name)
            self.state.set_stage(run_id, "cleanup")
            self.hv.remove_snapshot(vm.uuid, snap.ref)
        self.state.set_stage(run_id, "done")

    def _copy(
        self, repo: Repository, vm: VmInfo, snap: SnapshotInfo, server_id: str, run_id: str
    ) -> None:
        rep = self.reporter
        writer = repo.pack_writer(
            self.state,
            self.settings.pack_size,
            on_pack=lambda pack_id, size, _refs: self.state.record_pack(pack_id, size, run_id),
        )
        commits: list[tuple[DiskCommit, RunDiskRow]] = []
        for disk in sorted(snap.disks, key=lambda d: d.key):
            rep.stage(run_id, "changes", f"disk {disk.key}")
            self.state.set_stage(run_id, "changes")
            previous = self.state.disk_state(server_id, disk.key)
            plan = plan_disk(self.hv, vm.uuid, snap.ref, disk, previous)
            log.info(
                "disk plan",
                run=run_id,
                disk=disk.key,
                mode=plan.mode,
                reason=plan.reason,
                changed=plan.bytes_changed,
            )
            rep.stage(run_id, "read", f"disk {disk.key}: {plan.mode} ({plan.reason})")
            self.state.set_stage(run_id, "read")
            stored_before = writer.bytes_stored
            new_before, dedup_before = writer.blocks_new, writer.blocks_dedup
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
                    functools.partial(rep.disk_progress, run_id, disk.key),
                    compare_with=compare_with,
                )
            finally:
                reader.close()
            row = _run_disk_row(run_id, plan, result.bytes_read, result.blocks_zero)
            if compare_with is not None:
                row.bytes_changed = result.bytes_changed
            row.blocks_new = writer.blocks_new - new_before
            row.blocks_dedup = writer.blocks_dedup - dedup_before
            row.bytes_uploaded = writer.bytes_stored - stored_before
            self.state.record_run_disk(row)
            commits.append(
                (
                    DiskCommit(
                        disk_key=disk.key,
                        disk_uuid=disk.uuid,
                        capacity=disk.capacity,
                        change_id=disk.change_id,
                        base_run=plan.base_run,
                        changes=result.changes,
                        previous_chain=previous.chain_length if previous else 0,
                        stats={"mode": plan.mode, "reason": plan.reason},
                    ),
                    row,
                )
            )
        rep.stage(run_id, "upload", "flushing packs")
        self.state.set_stage(run_id, "upload")
        writer.flush()
        rep.stage(run_id, "commit", "writing manifests")
        self.state.set_stage(run_id, "commit")
        next_states: list[DiskStateRow] = []
        disks_record = []
        for dc, row in commits:
            manifest, chain = build_manifest(repo, server_id, run_id, snap.name, snap.ref, dc)
            row.manifest_key = repo.write_manifest(manifest)
            self.state.record_run_disk(row)
            disks_record.append(
                {
                    "disk_key": dc.disk_key,
                    "capacity": dc.capacity,
                    "merkle_root": manifest.merkle_root.hex(),
                }
            )
            next_states.append(
                DiskStateRow(
                    server_id=server_id,
                    disk_key=dc.disk_key,
                    disk_uuid=dc.disk_uuid,
                    capacity=dc.capacity,
                    change_id=dc.change_id,
                    last_run_id=run_id,
                    chain_length=chain,
                )
            )
        stats = {
            "bytes_read": sum(r.bytes_read for _, r in commits),
            "bytes_changed": sum(r.bytes_changed for _, r in commits),
            "bytes_uploaded": writer.bytes_uploaded,
            "blocks_new": writer.blocks_new,
            "blocks_dedup": writer.blocks_dedup,
            "packs": len(writer.packs_written),
        }
        repo.write_commit(
            server_id,
            run_id,
            {
                "run_id": run_id,
                "server_id": server_id,
                "created_at": _now(),
                "snapshot": {"name": snap.name, "ref": snap.ref},
                "disks": disks_record,
                "stats": stats,
            },
        )
        self.state.complete_run(run_id, server_id, next_states, stats)
        rep.stage(run_id, "commit", "committed")


def _run_disk_row(run_id: str, plan: DiskPlan, bytes_read: int, zero: int) -> RunDiskRow:
    return RunDiskRow(
        run_id=run_id,
        disk_key=plan.disk.key,
        mode=plan.mode,
        reason=plan.reason,
        capacity=plan.disk.capacity,
        change_id_from=plan.change_id_from,
        change_id_to=plan.disk.change_id,
        bytes_changed=plan.bytes_changed,
        bytes_read=bytes_read,
        blocks_zero=zero,
    )


def _release_lock(repo: Repository, run_id: str) -> None:
    try:
        repo.remove_lock(run_id)
    except ConnectorError as exc:
        log.warning(
            "the run's lock could not be removed; purge reports it as stale",
            run=run_id,
            error=scrub(str(exc)),
        )


def new_run_id() -> str:
    """Time-ordered and unique: r-YYYYMMDDTHHMMSSmmmZ-<8 hex> (mmm: milliseconds)."""
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"
    return f"r-{stamp}-{os.urandom(4).hex()}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return scrub(f"unexpected {type(exc).__name__}: {exc}")
