"""Is the connector ready to work: its services reachable, its own loops alive.

Each check is a named callable that returns a short detail when the thing it
checks answers and raises when it does not (vCenter: a login; S3: HeadBucket;
the queue: a count of its tasks; the daemon: its scheduler, workers and main
loop). A result is kept for `ttl` seconds, so asking often (a load balancer, the
web console) costs one probe per check per `ttl`, not one per request; while a
probe runs, other callers get the last result rather than waiting for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from connector.errors import ConnectorError
from connector.logging import scrub

Check = Callable[[], str]
"""Returns a short detail when the check passes; raises with the reason otherwise."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    age_seconds: float  # how old the result is (0: probed for this answer)


@dataclass(frozen=True)
class ReadinessReport:
    ready: bool
    checks: list[CheckResult]

    @property
    def failing(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.ok]


@dataclass
class _Cached:
    ok: bool
    detail: str
    at: float


class Readiness:
    def __init__(
        self,
        checks: Mapping[str, Check],
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._checks = dict(checks)
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._locks = {name: threading.Lock() for name in self._checks}

    @property
    def names(self) -> list[str]:
        return list(self._checks)

    def report(self) -> ReadinessReport:
        results = [self._result(name) for name in self._checks]
        return ReadinessReport(ready=all(r.ok for r in results), checks=results)

    def _result(self, name: str) -> CheckResult:
        now = self._clock()
        cached = self._cache.get(name)
        if cached is None or now - cached.at >= self._ttl:
            lock = self._locks[name]
            if lock.acquire(blocking=cached is None):
                try:
                    cached = self._cache.get(name)
                    if cached is None or self._clock() - cached.at >= self._ttl:
                        cached = self._probe(name)
                        self._cache[name] = cached
                finally:
                    lock.release()
        assert cached is not None
        return CheckResult(name, cached.ok, cached.detail, max(self._clock() - cached.at, 0.0))

    def _probe(self, name: str) -> _Cached:
        try:
            detail = self._checks[name]()
            ok = True
        except ConnectorError as exc:
            ok, detail = False, scrub(str(exc))
        except Exception as exc:  # a probe must never break the report
            ok, detail = False, scrub(f"{type(exc).__name__}: {exc}")
        return _Cached(ok, detail, self._clock())
