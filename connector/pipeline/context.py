"""What every stage of a run is handed: the ports it may use, the settings, and
the few helpers several stages share (the replica store, run locks, audit).

The composition root (`connector.app`) builds one `StageContext` per pipeline;
a stage takes only what it needs from it.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from connector.domain.jobs import RUN_FAILED
from connector.domain.landing import LandingSpec
from connector.domain.model import SnapshotInfo, VmInfo
from connector.domain.records import NO_DISK, SNAPSHOT
from connector.domain.times import iso
from connector.errors import ConnectorError, NotFoundError, PermanentError
from connector.logging import get_logger, scrub
from connector.ports import (
    Auditor,
    BlockStore,
    Catalog,
    DiskSource,
    DiskStates,
    Hypervisor,
    Landings,
    Ledger,
    Runs,
    SnapshotTarget,
)
from connector.store.repository import DEFAULT_PACK_SIZE, Repository, RunLock

log = get_logger(__name__)


class Reporter(Protocol):
    """Receives progress events of a run (the CLI draws them; the daemon records them).

    `disk_progress` counts bytes: `done` of the `total` bytes the disk's transfer
    reads (the changed extents widened to whole blocks), so that a display can
    show a rate and a time left. It may be called from several threads at once
    (one per disk in flight).
    """

    def stage(self, run_id: str, stage: str, detail: str = "") -> None: ...

    def disk_progress(self, run_id: str, disk_key: int, done: int, total: int) -> None: ...


class NullReporter:
    """Logs stages; ignores progress."""

    def stage(self, run_id: str, stage: str, detail: str = "") -> None:
        log.info("stage", run=run_id, stage=stage, detail=detail)

    def disk_progress(self, run_id: str, disk_key: int, done: int, total: int) -> None:
        return None


class StageInterrupted(Exception):
    """The connector is stopping: the stage stopped at a safe point and resumes later."""


@dataclass
class PipelineSettings:
    """How runs read and pack disks (from the config's transport and daemon sections)."""

    enable_cbt: bool = True
    max_read: int = 8 * 1024 * 1024
    pack_size: int = DEFAULT_PACK_SIZE
    needs_no_foreign_snapshots: bool = True
    max_disks_per_vm: int = 1
    # The transfer pipeline ([pipeline] in the config; docs/architecture.md):
    workers: int = 2  # threads that hash, compress and encrypt, shared by a run's disks
    reads_in_flight: int = 4  # per disk: reads held between the reader and the packs
    uploads_in_flight: int = 2  # per run: packs uploading at once


@dataclass(frozen=True)
class LandSettings:
    """How landing talks to AWS (from the config's [landing] section)."""

    concurrency: int = 8
    snapshot_timeout_minutes: int = 60
    wait_timeout: float = 3600.0
    ena_support: bool = True
    poll_interval: float = 0.2
    poll_interval_max: float = 5.0


@dataclass
class Lander:
    """What the land stage needs besides the stage context."""

    landings: Landings
    target: Callable[[LandingSpec], SnapshotTarget]
    spec_for: Callable[[str], LandingSpec]  # server id -> the job's landing settings
    settings: LandSettings
    release_staging: Callable[[str, str], None] | None = None  # (server id, run id)


@dataclass(frozen=True)
class RunRef:
    """The run a stage works on."""

    run_id: str
    server_id: str
    vm_uuid: str


@dataclass
class StageContext:
    hv: Hypervisor
    source: DiskSource
    open_repo: Callable[[], Repository]
    catalog: Catalog
    disks: DiskStates
    runs: Runs
    blocks: BlockStore
    ledger: Ledger
    settings: PipelineSettings = field(default_factory=PipelineSettings)
    reporter: Reporter = field(default_factory=NullReporter)
    should_stop: Callable[[], bool] = lambda: False
    # What a stop is called in the run's reason ("stopped by SIGTERM" in the foreground).
    stop_reason: Callable[[], str] = lambda: "the connector is stopping"
    audit: Auditor | None = None
    # Whether releasing a run's lock may open the store first: the daemon's runs may
    # hold locks written by an earlier process; a foreground run's only by itself.
    locks_need_store: bool = True
    # Landing in AWS (`connector.pipeline.land.Lander`); None: runs are not landed.
    lander: Lander | None = None
    _repo: Repository | None = field(default=None, repr=False)
    _repo_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- the replica store -------------------------------------------------------------

    def repo(self) -> Repository:
        """The replica store, opened once (S3 access is checked when it opens)."""
        with self._repo_lock:
            if self._repo is None:
                self._repo = self.open_repo()
            return self._repo

    def reopen_repo(self) -> Repository:
        """Open the replica store again: S3 must answer now (validate, before a snapshot)."""
        with self._repo_lock:
            self._repo = self.open_repo()
            return self._repo

    # -- helpers of several stages ---------------------------------------------------------

    def check_stop(self) -> None:
        if self.should_stop():
            raise StageInterrupted(self.stop_reason())

    def run_snapshot(self, run_id: str) -> SnapshotInfo:
        """The snapshot the snapshot stage recorded for this run."""
        for effect in self.ledger.pending(SNAPSHOT, run_id):
            if effect.ref:
                return effect.snapshot()
        raise PermanentError(f"run {run_id} has no recorded snapshot; it cannot go on")

    def committed(self, run_id: str) -> bool:
        return self.ledger.step(run_id, "commit") is not None

    # -- run locks: purge keeps what a run in flight may reference (docs/format.md) -------

    def write_lock(self, ref: RunRef, vm: VmInfo) -> None:
        bases = set()
        for disk in vm.disks:
            row = self.disks.disk_state(ref.server_id, disk.key)
            if row is not None:
                bases.add(row.last_run_id)
        self.repo().write_lock(
            RunLock(
                run_id=ref.run_id,
                server_id=ref.server_id,
                started_at=iso(),
                host=socket.gethostname(),
                pid=os.getpid(),
                base_runs=tuple(sorted(bases)),
            )
        )

    def release_lock(self, run_id: str) -> None:
        """Remove the run's lock from the store; one left behind purge reports as stale."""
        if self._repo is None and not self.locks_need_store:
            return
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

    # -- audit -----------------------------------------------------------------------------

    def audit_start(self, ref: RunRef) -> None:
        if self.audit is None or self.ledger.step(ref.run_id, "audit") is not None:
            return
        run = self.runs.run(ref.run_id)
        self.audit.record(
            "run.start", f"vm {ref.vm_uuid}", "started", run=ref.run_id, type=run.type
        )
        self.ledger.step_done(ref.run_id, "audit", NO_DISK, {"started": True})

    def audit_finish(self, run_id: str, vm_uuid: str | None, error: str | None = None) -> None:
        if self.audit is None:
            return
        run = self.runs.run(run_id)
        if vm_uuid is None:
            try:
                vm_uuid = self.catalog.server(run.server_id).vm_uuid
            except NotFoundError:
                vm_uuid = run.server_id
        what = f"vm {vm_uuid}"
        if run.state == RUN_FAILED:
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


def release_lock(repo: Repository, run_id: str) -> None:
    """Remove a run's lock; a failure is logged (purge reports the lock as stale)."""
    try:
        repo.remove_lock(run_id)
    except ConnectorError as exc:
        log.warning(
            "the run's lock could not be removed; purge reports it as stale",
            run=run_id,
            error=scrub(str(exc)),
        )
