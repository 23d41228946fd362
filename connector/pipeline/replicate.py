"""One replication run of one VM, in the foreground, stage by stage.

The stages of `connector.pipeline.driver.STAGES`, run here one after the other
without retries (the daemon drives the same table from its queue). The
snapshot is removed after every run, failed ones included. The next changeIds
are stored only after the run's commit object is durable.

A stop request (the context's `should_stop`, set by the CLI on SIGTERM, SIGINT
or SIGHUP) is honoured between stages and between reads of the transfer: the run
is rolled back (snapshot removed, FAILED with the stop's reason) and `RunStopped`
raised. Once the run is committed, its landing (when its job lands every run)
and its cleanup still run and it completes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from connector.domain.jobs import ON_DEMAND
from connector.domain.records import RunRow, new_run_id
from connector.errors import ConnectorError
from connector.logging import get_logger, scrub
from connector.pipeline.context import StageContext, StageInterrupted
from connector.pipeline.driver import DONE, FIRST, RunPipeline

log = get_logger(__name__)

__all__ = ["Replicator", "RunStopped", "new_run_id"]

# The stage that runs even when a stop is requested: it only removes the snapshot.
_FINAL = "cleanup"


class RunStopped(Exception):
    """A stop request ended the run: it is rolled back, with the stop as its reason."""

    def __init__(self, reason: str, run: RunRow) -> None:
        super().__init__(reason)
        self.reason = reason
        self.run = run  # as it ended: FAILED with the reason


@dataclass
class Replicator:
    """Runs whole runs in this process over the ports of `ctx`."""

    ctx: StageContext

    def replicate(self, vm_uuid: str, run_type: str = ON_DEMAND) -> RunRow:
        ctx = self.ctx
        vm = ctx.hv.get_vm(vm_uuid)
        server = ctx.catalog.upsert_server(vm)
        run_id = new_run_id()
        ctx.runs.create_run(run_id, server.id, run_type)
        log.info("run started", run=run_id, server=server.id, vm=vm.uuid)
        # A run of this process writes its lock only once it opened the store itself.
        pipeline = RunPipeline(replace(ctx, _repo=None, locks_need_store=False))
        stage = FIRST
        try:
            while stage != DONE:
                # Once the run is committed, a stop lets it complete (land, cleanup).
                if stage != _FINAL and not pipeline.committed(run_id):
                    ctx.check_stop()
                stage = pipeline.execute(run_id, stage)
        except BaseException as exc:
            message = scrub(str(exc)) if isinstance(exc, ConnectorError) else _describe(exc)
            try:
                pipeline.abort(run_id, message, best_effort=True)
            except Exception as cleanup_exc:  # the run's own failure is what the caller sees
                log.error("rollback failed", run=run_id, error=_describe(cleanup_exc))
                ctx.runs.fail_run(run_id, message)
                if ctx.audit is not None:
                    what = f"vm {vm.uuid}"
                    ctx.audit.record("run.finish", what, "failure", run=run_id, error=message)
            log.error("run failed", run=run_id, error=message)
            if isinstance(exc, StageInterrupted):
                raise RunStopped(message, ctx.runs.run(run_id)) from exc
            raise
        finally:
            pipeline.release_lock(run_id)
        return ctx.runs.run(run_id)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, StageInterrupted):
        return scrub(str(exc))
    return scrub(f"unexpected {type(exc).__name__}: {exc}")
