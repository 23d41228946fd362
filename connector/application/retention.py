"""Retention and purge as a user or a job asks for them: one purge at a time per
state database, the per-server settings with the configured default."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from connector.errors import PermanentError
from connector.pipeline.purge import PurgeReport, PurgeSettings, PurgeState, purge
from connector.store.repository import Repository


@dataclass
class Retention:
    open_repo: Callable[[], Repository]
    state: PurgeState
    default_keep: int  # [retention] keep: runs to keep per server by default (0: all)
    stale_lock_age: dt.timedelta
    guard_path: Path  # the advisory lock file beside the state database
    # In a fleet: one purge at a time across every connector (a lock in the database
    # that goes with its holder); yields whether it was taken.
    shared_guard: Callable[[], AbstractContextManager[bool]] = lambda: nullcontext(True)

    def policies(self, server_ids: set[str]) -> dict[str, int]:
        """Runs to keep per server: its own setting, else the default.

        The one rule of the connector: a server's own setting (`connector retention
        VM N`, or its job's `--retention N`, which set the same value), else
        `[retention] keep` (default 0: all). `purge`, `retention` and the daemon's
        retention after a job's run all keep what it says.
        """
        settings = self.state.retention_settings()
        return {sid: settings.get(sid, self.default_keep) for sid in sorted(server_ids)}

    def keep_for(self, server_id: str) -> tuple[int, str]:
        """Runs one server keeps, and where that number comes from ("vm" or "default")."""
        settings = self.state.retention_settings()
        if server_id in settings:
            return settings[server_id], "vm"
        return self.default_keep, "default"

    def apply_policy(self, server_id: str) -> PurgeReport:
        """Apply the server's retention by the one rule (`policies`): what a job's run owes."""
        return self.apply(server_id, self.keep_for(server_id)[0])

    def settings(self, dry_run: bool = False, break_stale_locks: bool = False) -> PurgeSettings:
        return PurgeSettings(
            stale_lock_age=self.stale_lock_age,
            dry_run=dry_run,
            break_stale_locks=break_stale_locks,
        )

    def apply(self, server_id: str, keep: int, dry_run: bool = False) -> PurgeReport:
        """Keep a server's `keep` most recent runs (0: all), then purge unused packs.

        What a job's retention calls after a run; safe beside runs in flight.
        """
        with self.guard():
            return purge(self.open_repo(), self.state, {server_id: keep}, self.settings(dry_run))

    @contextmanager
    def guard(self) -> Iterator[None]:
        """One purge at a time on this state database (an advisory lock beside it)."""
        path = self.guard_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PermanentError(
                    "another purge is running against this state database; wait for it to end"
                ) from None
            with self.shared_guard() as taken:
                if not taken:
                    raise PermanentError(
                        "another connector of the fleet is purging this store; wait for it to end"
                    )
                yield
        finally:
            os.close(fd)
