"""Retry: an ObjectStore decorator that tries a failed operation again, by error class.

The store below says what kind of failure it met (the S3 adapter maps every
botocore error to a class of `connector.errors`); this decorator decides from
that class alone:

- `TransientError` and its subclasses (`UnreachableError`, throttling, 5xx, a
  connection reset) are tried again under the one `RetryPolicy`, with its
  backoff, until its attempts run out; then a `TransientError` says what
  failed, how often, and the last reason.
- Everything else (`PermanentError`: `NotFoundError`, `AuthenticationError`,
  `TLSTrustError`...) and errors that are not the connector's fail at once.

Every verb may be repeated safely: objects are write-once and content-named,
`put` takes the whole body as bytes (it can be sent again from the start), and
`delete` of an absent key is not an error. A listing is an iterator: after a
failure it is started again and resumes after the last key it yielded (keys
come in lexical order), so no key is yielded twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from connector.errors import TransientError
from connector.ports import ObjectStore
from connector.retry import RetryPolicy

T = TypeVar("T")


class RetryingStore:
    """ObjectStore decorator: transient failures are retried under one policy."""

    def __init__(
        self,
        inner: ObjectStore,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.policy = policy
        self._sleep = sleep

    def put(self, key: str, data: bytes) -> None:
        body = bytes(data)  # rewindable: every attempt sends the same bytes from the start
        self._call(lambda: self.inner.put(key, body), f"object store put of {key}")

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self._call(lambda: self.inner.get(key, offset, length), f"object store get of {key}")

    def stat(self, key: str) -> int | None:
        return self._call(lambda: self.inner.stat(key), f"object store stat of {key}")

    def delete(self, key: str) -> None:
        self._call(lambda: self.inner.delete(key), f"object store delete of {key}")

    def list(self, prefix: str) -> Iterator[str]:
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[str]:
        what = f"object store list of {prefix or '(all keys)'}"
        last: str | None = None
        failures = 0
        while True:
            try:
                for key in self.inner.list(prefix):
                    if last is not None and key <= last:
                        continue  # yielded before the failure
                    yield key
                    last = key
                    failures = 0  # progress: the next failure starts a new count
                return
            except TransientError as exc:
                failures += 1
                self.policy.wait_or_give_up(failures, what, exc, self._sleep)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        return self.policy.call(fn, what, retryable=(TransientError,), sleep=self._sleep)
