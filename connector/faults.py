"""Fault injection for crash-safety tests: a process kill, or a pause, at a named point.

The crash-recovery tests set `CONNECTOR_TEST_CRASH_AT=<point>:<n>` in the
environment of a connector process; the n-th time that process reaches
`crash_point("<point>")`, it sends itself SIGKILL, exactly as a power cut or
the OOM killer would stop it.

With `CONNECTOR_TEST_PAUSE_AT=<point>:<n>[,<point>:<n>...]` and
`CONNECTOR_TEST_PAUSE_FILE=<path>` instead, the n-th time the process reaches
a named point it writes `<pid> <point>` to that file and waits there until the
test removes the file (at most two minutes): a test can then act on a run that
is known to be at that point (send it a signal, say) and let it go on.

Without the variables (always, in production) `crash_point` only looks them up
and returns.

The named points, in the order a run reaches them (see docs/operations.md):
snapshot-create, snapshot-created, changes, block-read, multipart-created,
multipart-part, pack-uploaded, before-manifest, manifest-written, before-commit,
after-commit, land-block, land-wait, land-before-image, snapshot-remove,
snapshot-removed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

ENV_VAR = "CONNECTOR_TEST_CRASH_AT"
PAUSE_VAR = "CONNECTOR_TEST_PAUSE_AT"
PAUSE_FILE_VAR = "CONNECTOR_TEST_PAUSE_FILE"
PAUSE_LIMIT = 120.0  # seconds a pause lasts at most, should the test never release it

_lock = threading.Lock()
_hits: dict[tuple[str, str], int] = {}


def _targets(var: str) -> dict[str, int]:
    """The points the variable names, each with the hit that triggers it."""
    raw = os.environ.get(var)
    if not raw:
        return {}
    targets = {}
    for item in raw.split(","):
        name, _, count = item.strip().partition(":")
        targets[name] = int(count) if count.isdigit() and int(count) > 0 else 1
    return targets


def _reached(var: str, name: str) -> bool:
    """Whether this is the hit of point `name` that the variable `var` names."""
    wanted = _targets(var).get(name)
    if wanted is None:
        return False
    with _lock:
        hits = _hits[var, name] = _hits.get((var, name), 0) + 1
    return hits == wanted


def crash_point(name: str) -> None:
    """Kill this process here, or pause it, when a test variable names this point."""
    if _reached(ENV_VAR, name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _reached(PAUSE_VAR, name):
        _pause(Path(os.environ[PAUSE_FILE_VAR]), name)


def _pause(marker: Path, name: str) -> None:
    """Write our pid and the point to `marker`, then wait until it is removed (or
    PAUSE_LIMIT passes)."""
    marker.write_text(f"{os.getpid()} {name}\n")
    deadline = time.monotonic() + PAUSE_LIMIT
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
