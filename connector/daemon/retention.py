"""The retention hook the daemon calls after a run of a job completed.

`keep_recent_runs` is the default: the N most recent COMPLETED runs of the VM
stay COMPLETED, older ones are marked DELETING in the state database, which
means "due for deletion": removing their data from the store is the purge's
job. A retention that also deletes store data plugs in through the same
signature, `(server_id, keep) -> object`.
"""

from __future__ import annotations

from collections.abc import Callable

from connector.adapters.jobstore import JobStore
from connector.adapters.state import StateStore
from connector.domain.jobs import RUN_COMPLETED, RUN_DELETING
from connector.logging import get_logger

log = get_logger(__name__)


def keep_recent_runs(state: StateStore, jobs: JobStore) -> Callable[[str, int], list[str]]:
    def apply(server_id: str, keep: int) -> list[str]:
        completed = [r for r in state.runs(server_id) if r.state == RUN_COMPLETED]
        expired = [r.id for r in completed[: max(0, len(completed) - keep)]]
        for run_id in expired:
            jobs.set_run_state(run_id, RUN_DELETING)
        if expired:
            log.info("runs beyond retention", server=server_id, keep=keep, runs=expired)
        return expired

    return apply
