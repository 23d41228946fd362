"""The one retry policy: how often to try and how long to wait between attempts.

Built once from the config's [retry] section by the composition root
(`connector.app`) and handed to the object-store retry decorator
(`connector.decorators.retry`) and to every disk reader. Which failures are
worth another attempt is the caller's decision (the `retryable` classes); the
policy only says how often and how long to wait, with the domain's one backoff
rule (`connector.domain.backoff.backoff_delay`) and random jitter.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from connector.domain.backoff import backoff_delay
from connector.errors import TransientError
from connector.logging import get_logger, scrub

log = get_logger(__name__)

T = TypeVar("T")

DEFAULT_ATTEMPTS = 4
DEFAULT_BASE_DELAY = 0.25
DEFAULT_MAX_DELAY = 4.0


class Retryable(TransientError):
    """A failure that the retry policy may try again (connection reset, 5xx, EIO)."""


@dataclass(frozen=True)
class RetryPolicy:
    """A few attempts with capped, jittered exponential backoff."""

    attempts: int = DEFAULT_ATTEMPTS
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    # Told of every retry (the error that caused it): the API's retry metrics.
    on_retry: Callable[[BaseException], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.base_delay < 0 or self.max_delay < self.base_delay:
            raise ValueError(
                f"delays must satisfy 0 <= base_delay <= max_delay, got {self.base_delay} "
                f"and {self.max_delay}"
            )

    def delay(self, attempt: int) -> float:
        """The pause after failed attempt number `attempt` (1-based)."""
        jitter = random.random()  # noqa: S311 (jitter, not crypto)
        return backoff_delay(attempt, self.base_delay, self.max_delay, jitter)

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
                self.wait_or_give_up(attempt, what, exc, sleep)
        raise AssertionError("unreachable")  # pragma: no cover

    def wait_or_give_up(
        self,
        attempt: int,
        what: str,
        exc: BaseException,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """After failed attempt number `attempt`: log and pause, or raise when none is left.

        The error raised says what failed, how often, and the last reason.
        """
        if attempt >= self.attempts:
            raise TransientError(f"{what} failed after {attempt} attempts: {exc}") from exc
        pause = self.delay(attempt)
        if self.on_retry is not None:
            self.on_retry(exc)
        log.info(
            "retry.again",
            what=scrub(what),
            attempt=attempt,
            attempts=self.attempts,
            error=scrub(str(exc)),
            error_class=type(exc).__name__,
            pause=round(pause, 3),
        )
        sleep(pause)
