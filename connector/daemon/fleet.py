"""A connector's duties as a member of a fleet, done every heartbeat.

- heartbeat, so the others know it is alive;
- hold (or try to take) the scheduler's lease: only the leader fires schedules;
  a member that has just become the leader catches up the slots nobody fired;
- take over the runs nobody works on (`Fleet.orphans`): a claim held by a dead
  member is ended, the dead member's multipart uploads are aborted (through the
  same ledger records the dead member wrote), and the run's token is moved on and
  queued, so any member resumes it at its stage (finished steps are skipped, the
  VM snapshot recorded in the ledger is reused or removed by the stage's rules).

A member whose heartbeat has not been written for the lease timeout stops its
stages at their next safe point (`fenced`): by then the others may have taken
its runs over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from connector.adapters.fleet import SCHEDULER, Fleet
from connector.adapters.ledger import RunLedger
from connector.daemon.runner import Enqueue
from connector.domain.jobs import RUN_ACTIVE
from connector.errors import ConnectorError
from connector.logging import get_logger, scrub

log = get_logger(__name__)

STAGE_LOG_DAYS = 30  # the stage log keeps this many days
PRUNE_EVERY = 3600.0  # seconds between two prunings of it, by the leader


class Aborter(Protocol):
    def abort_upload(self, key: str, upload_id: str) -> bool: ...


class FleetDuty:
    def __init__(
        self,
        fleet: Fleet,
        ledger: RunLedger,
        queue: Enqueue,
        uploads: Aborter,
        executing: Callable[[], set[str]],
        heartbeat_interval: float,
        run_state: Callable[[str], str],
    ) -> None:
        self.fleet = fleet
        self.ledger = ledger
        self.queue = queue
        self.uploads = uploads
        self.executing = executing
        self.heartbeat_interval = heartbeat_interval
        self.run_state = run_state
        self._leader = False
        self._last_beat = time.monotonic()
        self._last_prune = 0.0
        self._lock = threading.Lock()

    @property
    def leader(self) -> bool:
        return self._leader and not self.fenced

    @property
    def fenced(self) -> bool:
        """No heartbeat written for the lease timeout: the fleet may count us dead."""
        return time.monotonic() - self._last_beat > self.fleet.lease_timeout

    def tick(self) -> bool:
        """One round of duties; True when this member has just become the leader."""
        with self._lock:
            try:
                self.fleet.heartbeat()
                self._last_beat = time.monotonic()
                was = self._leader
                self._leader = self.fleet.hold_lease(SCHEDULER)
                if self._leader and not was:
                    log.info("this connector now schedules the fleet's jobs")
                elif was and not self._leader:
                    log.warning("this connector no longer schedules: another one leads")
                self.take_over()
                if self._leader and time.monotonic() - self._last_prune > PRUNE_EVERY:
                    self._last_prune = time.monotonic()
                    self.fleet.prune_stage_log(STAGE_LOG_DAYS * 86400.0)
            except Exception as exc:  # the database is away: try again next round
                log.warning("fleet duties failed; trying again", error=scrub(str(exc)))
                self._leader = self._leader and not self.fenced
                return False
            return self._leader and not was

    def take_over(self) -> list[str]:
        taken: list[str] = []
        grace = max(self.fleet.lease_timeout, 2 * self.heartbeat_interval)
        orphans = self.fleet.orphans(self.executing(), grace)
        if any(o.owner not in (None, self.fleet.member_id) for o in orphans):
            self.abort_dead_uploads()
        for orphan in orphans:
            if orphan.owner is None:
                # An overdue task: queue another copy of the same token (a duplicate is
                # a no-op), and take the run over only if it stays overdue.
                ctl = self.ledger.control(orphan.run_id)
                if ctl is None or not self.fleet.release_if(orphan.run_id, None):
                    continue
                self.queue.enqueue(orphan.run_id, ctl.seq)
                continue
            if orphan.owner == self.fleet.member_id and orphan.run_id in self.executing():
                continue  # its task is running here after all
            if not self.fleet.release_if(orphan.run_id, orphan.owner):
                continue  # another member was quicker
            active = self.run_state(orphan.run_id) == RUN_ACTIVE
            seq = self.ledger.advance(orphan.run_id, attempts=0 if active else None)
            self.queue.enqueue(orphan.run_id, seq)
            taken.append(orphan.run_id)
            log.warning("run taken over", run=orphan.run_id, why=orphan.why)
        return taken

    def abort_dead_uploads(self) -> int:
        aborted = 0
        for effect_id, key, upload_id in self.fleet.dead_uploads():
            try:
                if self.uploads.abort_upload(key, upload_id):
                    self.ledger.undone(effect_id)
                    aborted += 1
            except ConnectorError as exc:
                log.warning("aborting a dead member's upload failed", error=scrub(str(exc)))
        if aborted:
            log.info("multipart uploads of stopped connectors aborted", count=aborted)
        return aborted
