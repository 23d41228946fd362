"""One replication run of one VM, in the foreground, stage by stage.

validate -> snapshot -> changes -> read/pack/upload -> commit -> cleanup.
The stages are the resumable ones of `connector.pipeline.stages`, run here one
after the other without retries (the daemon drives the same stages from its
queue). The snapshot is removed after every run, failed ones included. The
next changeIds are stored only after the run's commit object is durable.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from connector.adapters.ledger import RunLedger
from connector.adapters.state import RunRow, StateStore
from connector.errors import ConnectorError
from connector.logging import get_logger, scrub
from connector.pipeline.snapshot import SNAPSHOT_PREFIX, sweep_leftovers, validate
from connector.pipeline.stages import (
    DONE,
    PipelineSettings,
    Reporter,
    RunPipeline,
    fail_interrupted,
    release_lock,
)
from connector.ports import Auditor, DiskSource, Hypervisor
from connector.store.repository import DEFAULT_PACK_SIZE, Repository

log = get_logger(__name__)

__all__ = ["NullReporter", "ReplicationSettings", "Replicator", "Reporter", "new_run_id"]


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
    max_disks_per_vm: int = 1

    def pipeline(self) -> PipelineSettings:
        return PipelineSettings(
            enable_cbt=self.enable_cbt,
            max_read=self.max_read,
            pack_size=self.pack_size,
            needs_no_foreign_snapshots=self.needs_no_foreign_snapshots,
            max_disks_per_vm=self.max_disks_per_vm,
        )


@dataclass
class Replicator:
    hv: Hypervisor
    source: DiskSource
    open_repo: Callable[[], Repository]
    state: StateStore
    settings: ReplicationSettings = field(default_factory=ReplicationSettings)
    reporter: Reporter = field(default_factory=NullReporter)
    ledger: RunLedger | None = None
    audit: Auditor | None = None

    def replicate(self, vm_uuid: str, run_type: str = "ON_DEMAND") -> RunRow:
        vm = self.hv.get_vm(vm_uuid)
        server = self.state.upsert_server(vm)
        ledger = self.ledger or RunLedger(self.state)
        swept = sweep_leftovers(self.hv, vm)
        if swept:
            ledger.snapshots_removed(vm.uuid, swept)
            fail_interrupted(self.state, swept)
            vm = self.hv.get_vm(vm_uuid)
        validate(vm, self.settings.needs_no_foreign_snapshots)
        repo = self.open_repo()
        for name in swept:  # the run that left it behind is dead: so is its lock
            release_lock(repo, name.removeprefix(SNAPSHOT_PREFIX))
        run_id = new_run_id()
        self.state.create_run(run_id, server.id, run_type)
        log.info("run started", run=run_id, server=server.id, vm=vm.uuid)
        pipeline = RunPipeline(
            hv=self.hv,
            source=self.source,
            open_repo=lambda: repo,
            state=self.state,
            ledger=ledger,
            settings=self.settings.pipeline(),
            reporter=self.reporter,
            audit=self.audit,
        )
        stage = "validate"
        try:
            while stage != DONE:
                stage = pipeline.execute(run_id, stage)
        except BaseException as exc:
            message = scrub(str(exc)) if isinstance(exc, ConnectorError) else _describe(exc)
            try:
                pipeline.abort(run_id, message, best_effort=True)
            except Exception as cleanup_exc:  # the run's own failure is what the caller sees
                log.error("rollback failed", run=run_id, error=_describe(cleanup_exc))
                self.state.fail_run(run_id, message)
                if self.audit is not None:
                    what = f"vm {vm.uuid}"
                    self.audit.record("run.finish", what, "failure", run=run_id, error=message)
            log.error("run failed", run=run_id, error=message)
            raise
        finally:
            release_lock(repo, run_id)
        return self.state.run(run_id)


def new_run_id() -> str:
    """Time-ordered and unique: r-YYYYMMDDTHHMMSSmmmZ-<8 hex> (mmm: milliseconds)."""
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"
    return f"r-{stamp}-{os.urandom(4).hex()}"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return scrub(f"unexpected {type(exc).__name__}: {exc}")
