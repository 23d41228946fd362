"""The one backoff rule: how long to wait before the next attempt (a pure function).

Both retry layers use it: the retry policy of the object store and the disk
readers (`connector.retry.RetryPolicy`, seconds, with jitter), and the daemon's
stage retries (`connector.daemon.runner`, without jitter).
"""

from __future__ import annotations


def backoff_delay(attempt: int, base: float, cap: float, jitter: float = 0.0) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based).

    Exponential: `base`, doubled with each attempt, never above `cap`. `jitter`
    is a number in [0, 1] that the caller draws at random (0: no jitter); it
    takes up to half of the delay away, so callers that fail together do not
    retry together. Attempt 0 or less waits nothing.
    """
    if attempt < 1:
        return 0.0
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    ceiling = float(min(cap, base * 2.0 ** (attempt - 1)))
    return ceiling * (1.0 - jitter / 2.0)
