"""Fault injection for crash-safety tests: a process kill at a named point.

The crash-recovery tests set `CONNECTOR_TEST_CRASH_AT=<point>:<n>` in the
environment of a connector process; the n-th time that process reaches
`crash_point("<point>")`, it sends itself SIGKILL, exactly as a power cut or
the OOM killer would stop it. Without the variable (always, in production)
`crash_point` only compares a string and returns.

The named points, in the order a run reaches them (see docs/operations.md):
snapshot-create, snapshot-created, changes, multipart-created, multipart-part,
pack-uploaded, before-manifest, manifest-written, before-commit, after-commit,
snapshot-remove, snapshot-removed.
"""

from __future__ import annotations

import os
import signal
import threading

ENV_VAR = "CONNECTOR_TEST_CRASH_AT"

_lock = threading.Lock()
_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return None
    name, _, count = raw.partition(":")
    return name, int(count) if count.isdigit() and int(count) > 0 else 1


def crash_point(name: str) -> None:
    """Kill this process here when the test variable names this point (and hit count)."""
    target = _target()
    if target is None or target[0] != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        reached = _hits[name] == target[1]
    if reached:
        os.kill(os.getpid(), signal.SIGKILL)
