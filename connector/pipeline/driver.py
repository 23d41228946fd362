"""One replication run as resumable, idempotent stages, driven from one table.

    validate -> snapshot -> changes -> transfer -> commit -> land -> cleanup

`land` lands the committed run in AWS when its job lands every run (`pipeline/land.py`);
otherwise it does nothing.

Each stage's body is the `run(ctx, ref)` function of the module named after
it (`connector/pipeline/<stage>.py`). Each persists what it did in the run
ledger, keyed by (run, stage, disk), so that running a stage again (a retry,
or a resume after the process died) skips the work already done and repeats
no side effect. The foreground `Replicator` (`pipeline/replicate.py`) and the
daemon's queue (`daemon/runner.py`) drive the same table; `abort`
(`pipeline/cleanup.py`) rolls a failed run back.

A new stage is a module with a `run` function and a row in `STAGES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from connector.pipeline import changes, cleanup, commit, land, snapshot, transfer, validate
from connector.pipeline.context import RunRef, StageContext


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext, RunRef], None]


STAGES: tuple[Stage, ...] = (
    Stage("validate", validate.run),
    Stage("snapshot", snapshot.run),
    Stage("changes", changes.run),
    Stage("transfer", transfer.run),
    Stage("commit", commit.run),
    Stage("land", land.run),
    Stage("cleanup", cleanup.run),
)
DONE = "done"
FIRST = STAGES[0].name

_BY_NAME = {s.name: s for s in STAGES}
_NEXT = dict(zip(_BY_NAME, (*list(_BY_NAME)[1:], DONE), strict=True))


def next_stage(stage: str) -> str:
    return _NEXT[stage]


class RunPipeline:
    """Runs one stage of a run at a time, over the ports of its `StageContext`."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def execute(self, run_id: str, stage: str) -> str:
        """Run one stage of the run (again, if it ran before); return the next stage."""
        step = _BY_NAME[stage]
        found = self.ctx.runs.run(run_id)
        ref = RunRef(run_id, found.server_id, self.ctx.catalog.server(found.server_id).vm_uuid)
        self.ctx.runs.set_stage(run_id, stage)
        step.run(self.ctx, ref)
        return next_stage(stage)

    def abort(self, run_id: str, reason: str, best_effort: bool = False) -> None:
        cleanup.abort(self.ctx, run_id, reason, best_effort)

    def committed(self, run_id: str) -> bool:
        return self.ctx.committed(run_id)

    def release_lock(self, run_id: str) -> None:
        self.ctx.release_lock(run_id)
