"""Startup recovery: every run the last process left unfinished is resumed or rolled back.

Before the queue's workers start:
1. Every PENDING run is queued again; every ACTIVE run is resumed at the stage
   it was in (its finished steps are skipped), unless it started more than
   `resume_within` seconds ago: then it is rolled back and marked FAILED with
   the reason. Queue tokens are moved on first, so a task of the dead process
   still in the queue does nothing.
2. Snapshots recorded in the ledger for runs that are no longer ACTIVE are
   removed (found by ref, or by their name `connector-<run id>` when the
   process died before the ref came back).
3. Multipart uploads recorded in the ledger are aborted (no upload is in flight
   at startup), and, belt and braces, any incomplete upload under the store's
   prefix (one whose id never reached the ledger).

`sweep` (steps 2 and 3) also runs periodically while the daemon runs, so
leftovers that could not be removed at startup (vCenter or S3 down) go later,
and so do those of the running process: a recorded multipart upload that no
put owns any more (its abort failed) is aborted, and so is an incomplete
upload under the prefix older than `stale_upload_age` that no put owns (one
whose CreateMultipartUpload reply was lost, so its id never reached the
ledger). What a put owns comes from the S3 adapter (`uploads_in_use`): an
upload is owned from the moment its id is known until its put is over and its
record is settled, so the ledger is read first and the owned set after it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from connector.adapters.ledger import MULTIPART, SNAPSHOT, RunLedger
from connector.adapters.state import StateStore
from connector.daemon.runner import Enqueue
from connector.domain.jobs import RUN_ACTIVE, RUN_PENDING
from connector.domain.times import parse as parse_time
from connector.errors import ConnectorError, NotFoundError
from connector.logging import get_logger, scrub
from connector.pipeline.snapshot import remove_snapshot_effect
from connector.ports import Hypervisor

log = get_logger(__name__)


class UploadAborter(Protocol):
    def abort_upload(self, key: str, upload_id: str) -> bool: ...

    def uploads_in_use(self) -> frozenset[str]: ...

    def abort_incomplete_uploads(
        self, older_than: dt.timedelta, keep: frozenset[str] = frozenset()
    ) -> int: ...


class OthersUploads(Protocol):
    """In a fleet: which recorded uploads belong to other members, alive."""

    def is_others_upload(self, owner: str | None) -> bool: ...

    def live_uploads_of_others(self) -> frozenset[str]: ...


@dataclass
class RecoveryReport:
    resumed: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    snapshots_removed: int = 0
    uploads_aborted: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.resumed)} run(s) resumed, {len(self.rolled_back)} rolled back, "
            f"{len(self.requeued)} requeued, {self.snapshots_removed} snapshot(s) removed, "
            f"{self.uploads_aborted} upload(s) aborted"
            + (f", {len(self.problems)} problem(s) left for later" if self.problems else "")
        )


def recover(
    state: StateStore,
    ledger: RunLedger,
    queue: Enqueue,
    hv: Hypervisor,
    uploads: UploadAborter,
    resume_within: float,
    now: dt.datetime | None = None,
    release_lock: Callable[[str], None] | None = None,
) -> RecoveryReport:
    now = now or dt.datetime.now(dt.UTC)
    report = RecoveryReport()
    live = [r for r in state.runs() if r.state in (RUN_PENDING, RUN_ACTIVE)]
    for run in live:
        ctl = ledger.ensure_control(run.id)
        if run.state == RUN_ACTIVE and ctl.failure is None:
            started = parse_time(run.started_at)
            age = (now - started).total_seconds()
            if age > resume_within:
                reason = (
                    f"{run.stage}: interrupted: the connector stopped during this run and it "
                    f"was not resumed within {resume_within:.0f} s; it was rolled back"
                )
                ledger.set_failure(run.id, run.stage, reason)
                report.rolled_back.append(run.id)
                log.warning("rolling back an interrupted run", run=run.id, stage=run.stage)
            else:
                report.resumed.append(run.id)
                log.info("resuming an interrupted run", run=run.id, stage=run.stage)
        else:
            report.requeued.append(run.id)
        seq = ledger.advance(run.id, attempts=0 if run.state == RUN_ACTIVE else None)
        queue.enqueue(run.id, seq)
    keep = {r.id for r in live}
    sweep(state, ledger, hv, uploads, report, keep, release_lock=release_lock)
    try:
        report.uploads_aborted += uploads.abort_incomplete_uploads(dt.timedelta(0))
    except ConnectorError as exc:
        report.problems.append(f"listing incomplete uploads: {scrub(str(exc))}")
    log.info("recovery done", summary=report.summary())
    for problem in report.problems:
        log.warning("recovery left a problem for later", problem=problem)
    return report


def sweep(
    state: StateStore,
    ledger: RunLedger,
    hv: Hypervisor,
    uploads: UploadAborter,
    report: RecoveryReport | None = None,
    keep: set[str] | None = None,
    release_lock: Callable[[str], None] | None = None,
    stale_upload_age: dt.timedelta | None = None,
    others_uploads: OthersUploads | None = None,
) -> RecoveryReport:
    """Undo the recorded side effects of runs that are over (or unknown), and the
    multipart uploads no put owns any more.

    With `stale_upload_age`, also abort the incomplete uploads under the store's
    prefix that are older and that no put owns (their id may never have been
    recorded).

    In a fleet (`others_uploads`), the store has many writers: an upload recorded
    by another member that is alive is its own (no put of this process owns it,
    yet it is in flight), so neither the recorded sweep nor the prefix-wide one
    touches it; a dead member's uploads are aborted by the takeover of its runs.
    """
    report = report or RecoveryReport()
    if keep is None:
        keep = {r.id for r in state.runs() if r.state in (RUN_PENDING, RUN_ACTIVE)}
    for effect in ledger.pending(SNAPSHOT):
        if effect.run_id in keep:
            continue
        try:
            remove_snapshot_effect(hv, effect)
        except ConnectorError as exc:
            report.problems.append(f"snapshot {effect.name}: {scrub(str(exc))}")
            continue
        ledger.undone(effect.id)
        report.snapshots_removed += 1
        if effect.run_id is not None:
            _fail_if_active(state, effect.run_id)
            if release_lock is not None:  # the run is over: so is its hold on the packs
                release_lock(effect.run_id)
    recorded = ledger.pending(MULTIPART)
    in_use = uploads.uploads_in_use()  # after the ledger: see the module's docstring
    for effect in recorded:
        if effect.ref is None or effect.ref in in_use:
            continue
        if others_uploads is not None and (
            effect.owner is None or others_uploads.is_others_upload(effect.owner)
        ):
            continue
        if uploads.abort_upload(effect.target, effect.ref):
            ledger.undone(effect.id)
            report.uploads_aborted += 1
        else:
            report.problems.append(f"multipart upload of {effect.target} could not be aborted")
    if stale_upload_age is not None:
        keep_ids = others_uploads.live_uploads_of_others() if others_uploads else frozenset()
        try:
            report.uploads_aborted += uploads.abort_incomplete_uploads(stale_upload_age, keep_ids)
        except ConnectorError as exc:
            report.problems.append(f"listing incomplete uploads: {scrub(str(exc))}")
    if report.uploads_aborted:
        log.info("multipart uploads aborted", count=report.uploads_aborted)
    return report


def _fail_if_active(state: StateStore, run_id: str) -> None:
    try:
        run = state.run(run_id)
    except NotFoundError:
        return
    if run.state == RUN_ACTIVE:
        state.fail_run(run_id, "interrupted: the connector stopped during this run")
