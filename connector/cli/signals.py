"""Stop a foreground command cleanly on SIGTERM, SIGINT or SIGHUP.

systemd stopping a unit sends SIGTERM, a closed terminal SIGHUP, Ctrl-C SIGINT.
`StopOnSignals` turns the first of them into a stop request that the run's
stages see at their next safe point (`StageContext.should_stop`); the run is
then rolled back before the process exits with 128 + the signal's number. A
signal that arrives while the run is rolled back is reported on stderr and the
rollback goes on (it only removes the snapshot and marks the run); what a
SIGKILL would leave behind, the next run of the VM or `connector run` removes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopOnSignals:
    """A stop flag set by SIGTERM, SIGINT or SIGHUP while the `with` block runs."""

    def __init__(self, what: str = "the run") -> None:
        self.what = what
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __call__(self) -> bool:
        """Whether a stop was asked (the `should_stop` of a StageContext)."""
        return self.received is not None

    @property
    def reason(self) -> str:
        """The stop as a run's reason: `stopped by SIGTERM`."""
        return f"stopped by {self.received.name}" if self.received else "stopped"

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process ended by it."""
        return 128 + int(self.received) if self.received else 1

    def __enter__(self) -> StopOnSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig
            _say(
                f"connector: {sig.name} received; stopping {self.what} at a safe point and "
                "rolling it back (snapshot removed, uploads aborted)"
            )
            return
        _say(
            f"connector: {sig.name} received; still rolling back {self.what} after "
            f"{self.received.name}; it ends in a moment (if this process is killed now, "
            "the next run of the VM or `connector run` removes its snapshot)"
        )


def _say(line: str) -> None:
    """One line on stderr, written at once (safe inside a signal handler)."""
    with contextlib.suppress(OSError, ValueError):  # no stderr to tell: the stop goes on
        os.write(sys.stderr.fileno(), (line + "\n").encode())
