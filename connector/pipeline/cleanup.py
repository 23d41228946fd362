"""Stage `cleanup`: the run's snapshot is removed, its lock released; only then
is the run COMPLETED. `abort` is the same for a run that failed: it always
runs, after failures too.
"""

from __future__ import annotations

from connector.errors import ConnectorError
from connector.pipeline import land
from connector.pipeline.context import RunRef, StageContext
from connector.pipeline.snapshot import remove_run_snapshots, snapshot_name


def run(ctx: StageContext, ref: RunRef) -> None:
    ctx.reporter.stage(ref.run_id, "cleanup", snapshot_name(ref.run_id))
    remove_run_snapshots(ctx.hv, ctx.ledger, ref.run_id)
    ctx.release_lock(ref.run_id)
    ctx.runs.finish_run(ref.run_id)
    ctx.audit_finish(ref.run_id, ref.vm_uuid)
    land.release_staging(ctx, ref)


def abort(ctx: StageContext, run_id: str, reason: str, best_effort: bool = False) -> None:
    """Remove the run's snapshot, then mark it FAILED with `reason` (COMPLETED with
    a note when its commit was already recorded).

    A failure to remove the snapshot is raised (the caller retries) unless
    `best_effort`, which records the run's end anyway and leaves the snapshot
    to startup recovery.
    """
    note = ""
    try:
        remove_run_snapshots(ctx.hv, ctx.ledger, run_id)
    except ConnectorError as exc:
        if not best_effort:
            raise
        note = f"; its snapshot could not be removed ({exc}) and is removed at the next start"
    ctx.release_lock(run_id)
    if ctx.committed(run_id):
        ctx.runs.finish_run(run_id, note=f"replica committed; then: {reason}{note}")
    else:
        ctx.runs.fail_run(run_id, f"{reason}{note}")
    ctx.audit_finish(run_id, None, reason)
