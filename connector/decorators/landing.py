"""SnapshotTarget decorators: retry of transient failures (throttling) by error class,
and the upload bandwidth limit on PutSnapshotBlock.

Every verb may be repeated: StartSnapshot carries a ClientToken, a block written
again holds the same bytes, completion and deletion of what is done or gone are
not errors. RegisterImage is the exception (it has no token): the land stage looks
the AMI up by its name before it registers one again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from connector.decorators.bandwidth import TokenBucket
from connector.errors import TransientError
from connector.ports import SnapshotTarget
from connector.retry import RetryPolicy

T = TypeVar("T")


class RetryingTarget:
    """Transient failures (ThrottlingException, RequestThrottledException, 5xx) are
    tried again under the one retry policy; others fail at once."""

    def __init__(
        self,
        inner: SnapshotTarget,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.policy = policy
        self._sleep = sleep

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr) or name.startswith("_") or name == "close":
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            what = f"AWS {name.replace('_', ' ')}"
            return self.policy.call(
                lambda: attr(*args, **kwargs),
                what,
                retryable=(TransientError,),
                sleep=self._sleep,
            )

        return call


class BandwidthLimitedTarget:
    """PutSnapshotBlock waits for tokens of the same bucket as uploads to S3."""

    def __init__(self, inner: SnapshotTarget, bucket: TokenBucket) -> None:
        self.inner = inner
        self.bucket = bucket

    def put_block(self, snapshot_id: str, index: int, data: bytes) -> None:
        self.bucket.take(len(data))
        self.inner.put_block(snapshot_id, index, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
