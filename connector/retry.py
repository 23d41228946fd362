"""The retry policy shared by the disk readers: a few attempts, capped jittered backoff.

Which failures are worth another attempt is the caller's decision (the
`retryable` classes); the policy only says how often and how long to wait.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from connector.errors import TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Retryable(TransientError):
    """A failure that the retry policy may try again (connection reset, 5xx, EIO)."""


@dataclass(frozen=True)
class RetryPolicy:
    """A few attempts with capped, jittered exponential backoff."""

    attempts: int = 4
    base_delay: float = 0.25
    max_delay: float = 4.0

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 (jitter, not crypto)

    def call(
        self,
        fn: Callable[[], T],
        what: str,
        *,
        retryable: tuple[type[BaseException], ...] = (Retryable,),
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """`fn()`, retried on `retryable` errors; the last one surfaces as TransientError."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except retryable as exc:
                if attempt == self.attempts:
                    raise TransientError(f"{what} failed after {attempt} attempts: {exc}") from exc
                pause = self.delay(attempt)
                log.info("%s failed (%s); retrying in %.2f s", what, exc, pause)
                sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover
