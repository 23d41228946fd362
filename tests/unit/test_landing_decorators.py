"""The SnapshotTarget decorators: throttling retried by class, uploads share one limit."""

from __future__ import annotations

import pytest

from connector.decorators.bandwidth import RateSchedule, TokenBucket
from connector.decorators.landing import BandwidthLimitedTarget, RetryingTarget
from connector.domain.landing import EBS_BLOCK
from connector.errors import AuthenticationError, TransientError
from connector.fakelanding import FakeSnapshotTarget
from connector.retry import RetryPolicy


class Throttled(FakeSnapshotTarget):
    def __init__(self, failures: int, error: Exception) -> None:
        super().__init__()
        self.failures = failures
        self.error = error
        self.tries = 0

    def put_block(self, snapshot_id: str, index: int, data: bytes) -> None:
        self.tries += 1
        if self.tries <= self.failures:
            raise self.error
        super().put_block(snapshot_id, index, data)


def _start(target: FakeSnapshotTarget) -> str:
    sid, _ = target.start_snapshot(
        volume_size=1,
        client_token="t",
        parent_snapshot_id=None,
        encrypted=False,
        kms_key_id=None,
        tags={},
        description="",
        timeout_minutes=60,
    )
    return sid


def test_throttling_is_retried_and_a_refusal_is_not() -> None:
    pauses: list[float] = []
    inner = Throttled(2, TransientError("ThrottlingException"))
    sid = _start(inner)
    RetryingTarget(inner, RetryPolicy(attempts=3), sleep=pauses.append).put_block(
        sid, 0, bytes(EBS_BLOCK)
    )
    assert inner.tries == 3 and len(pauses) == 2
    denied = Throttled(5, AuthenticationError("AccessDenied"))
    sid = _start(denied)
    with pytest.raises(AuthenticationError):
        RetryingTarget(denied, RetryPolicy(attempts=3), sleep=pauses.append).put_block(
            sid, 0, bytes(EBS_BLOCK)
        )
    assert denied.tries == 1


def test_blocks_take_tokens_from_the_shared_bucket() -> None:
    clock = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    bucket = TokenBucket(RateSchedule(EBS_BLOCK), monotonic=lambda: clock[0], sleep=sleep)
    inner = FakeSnapshotTarget()
    sid = _start(inner)
    limited = BandwidthLimitedTarget(inner, bucket)
    for i in range(3):
        limited.put_block(sid, i, bytes(EBS_BLOCK))
    assert sum(slept) == pytest.approx(2.0)  # one block per second after the first
    assert inner.list_blocks(sid) == [0, 1, 2]
