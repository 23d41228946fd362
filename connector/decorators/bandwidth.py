"""Bandwidth limit: an ObjectStore decorator that paces uploads with a token bucket.

`put` takes as many tokens as it sends bytes; the bucket refills at the rate in
force now (the global limit, or the limit of the time-of-day window that
contains the local time) and holds at most one second of tokens, so the average
over any stretch longer than a second stays under the limit. Reads, lists and
deletes pass through untouched.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from connector.ports import ObjectStore


@dataclass(frozen=True)
class Window:
    """[start, end) in minutes after local midnight; end < start wraps past midnight."""

    start: int
    end: int
    limit: int  # bytes per second; 0: unlimited

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


def parse_hhmm(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


@dataclass(frozen=True)
class RateSchedule:
    """The upload limit at a given local time: the first window that contains it wins."""

    default: int  # bytes per second; 0: unlimited
    windows: Sequence[Window] = ()

    def rate_at(self, local: dt.datetime) -> int:
        minute = local.hour * 60 + local.minute
        for w in self.windows:
            if w.contains(minute):
                return w.limit
        return self.default

    @property
    def unlimited(self) -> bool:
        return self.default == 0 and all(w.limit == 0 for w in self.windows)


class TokenBucket:
    """Thread-safe; `take(n)` blocks until n bytes fit under the current rate."""

    def __init__(
        self,
        schedule: RateSchedule,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        local_now: Callable[[], dt.datetime] = lambda: dt.datetime.now().astimezone(),
    ) -> None:
        self.schedule = schedule
        self._monotonic = monotonic
        self._sleep = sleep
        self._local_now = local_now
        self._lock = threading.Lock()
        self._last = monotonic()
        rate = schedule.rate_at(local_now())
        self._tokens = float(rate)  # a full bucket: one second's worth
        self.waited = 0.0  # seconds spent waiting, for tests and metrics

    def take(self, n: int) -> None:
        with self._lock:
            rate = self.schedule.rate_at(self._local_now())
            now = self._monotonic()
            if rate == 0:
                self._last = now
                return
            self._tokens = min(float(rate), self._tokens + (now - self._last) * rate)
            self._last = now
            self._tokens -= n
            wait = -self._tokens / rate if self._tokens < 0 else 0.0
            # The debt is paid by sleeping while holding the lock: concurrent uploads
            # queue behind each other, and the total stays under the limit.
            if wait > 0:
                self.waited += wait
                self._sleep(wait)
                self._tokens = 0.0
                self._last = self._monotonic()


class BandwidthLimitedStore:
    """ObjectStore decorator: `put` waits for tokens, then calls the inner store."""

    def __init__(self, inner: ObjectStore, bucket: TokenBucket) -> None:
        self.inner = inner
        self.bucket = bucket

    def put(self, key: str, data: bytes) -> None:
        self.bucket.take(len(data))
        self.inner.put(key, data)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(key, offset, length)

    def stat(self, key: str) -> int | None:
        return self.inner.stat(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)
