"""Metrics: an ObjectStore decorator that counts what reaches the store below.

For every verb: operations by outcome, errors by the class of
`connector.errors` they were raised as (TransientError, AuthenticationError...),
latency, and the bytes of successful puts (sent) and gets (received). The numbers live in a
prometheus-client registry of their own (`StoreMetrics.registry`), which the
HTTPS API's /metrics serves beside its other metrics.

Stacked inside the retry decorator (see `connector.app.wrap_object_store`), it
counts every attempt: a transient error that a retry then hid still shows up
here, so a rising error rate is visible before runs start failing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from connector.errors import ConnectorError
from connector.ports import ObjectStore

T = TypeVar("T")

OPERATIONS = ("put", "get", "stat", "list", "delete")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def error_class(exc: BaseException) -> str:
    """The label of an error: its connector error class, or `other`."""
    return type(exc).__name__ if isinstance(exc, ConnectorError) else "other"


class StoreMetrics(Collector):
    """The object-store metrics of one process, in their own registry.

    It is a collector itself: a registry that registers it (the API's) shows them.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.operations = Counter(
            "connector_object_store_operations",
            "Object store requests by operation and outcome (ok or error), each attempt counted",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.errors = Counter(
            "connector_object_store_errors",
            "Object store errors by operation and error class",
            ["operation", "error"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "connector_object_store_bytes",
            "Bytes of successful puts (sent) and gets (received) of the object store",
            ["direction"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "connector_object_store_latency_seconds",
            "Time the object store took per operation (a listing: its requests only)",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        for operation in OPERATIONS:  # every series exists from the start, at zero
            self.operations.labels(operation, "ok")
            self.latency.labels(operation)
        for direction in ("sent", "received"):
            self.bytes.labels(direction)

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()

    def observe(self, operation: str, seconds: float, error: BaseException | None) -> None:
        self.latency.labels(operation).observe(seconds)
        if error is None:
            self.operations.labels(operation, "ok").inc()
        else:
            self.operations.labels(operation, "error").inc()
            self.errors.labels(operation, error_class(error)).inc()


class MeteredStore:
    """ObjectStore decorator: every call is counted and timed in `metrics`."""

    def __init__(
        self,
        inner: ObjectStore,
        metrics: StoreMetrics,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.metrics = metrics
        self._monotonic = monotonic

    def put(self, key: str, data: bytes) -> None:
        self._timed("put", lambda: self.inner.put(key, data))
        self.metrics.bytes.labels("sent").inc(len(data))

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self._timed("get", lambda: self.inner.get(key, offset, length))
        self.metrics.bytes.labels("received").inc(len(data))
        return data

    def stat(self, key: str) -> int | None:
        return self._timed("stat", lambda: self.inner.stat(key))

    def delete(self, key: str) -> None:
        self._timed("delete", lambda: self.inner.delete(key))

    def list(self, prefix: str) -> Iterator[str]:
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[str]:
        # Only the time spent inside the store's iterator counts, not the consumer's.
        spent = 0.0
        start = self._monotonic()
        try:
            keys = iter(self.inner.list(prefix))
            while True:
                try:
                    key = next(keys)
                except StopIteration:
                    break
                spent += self._monotonic() - start
                try:
                    yield key
                except GeneratorExit:  # the consumer stopped early: a successful listing
                    self.metrics.observe("list", spent, None)
                    raise
                start = self._monotonic()
        except Exception as exc:
            self.metrics.observe("list", spent + self._monotonic() - start, exc)
            raise
        self.metrics.observe("list", spent + self._monotonic() - start, None)

    def _timed(self, operation: str, fn: Callable[[], T]) -> T:
        start = self._monotonic()
        try:
            result = fn()
        except BaseException as exc:
            self.metrics.observe(operation, self._monotonic() - start, exc)
            raise
        self.metrics.observe(operation, self._monotonic() - start, None)
        return result


class ProcessMetrics(Collector):
    """Retries and bandwidth waits of this process, for the API's /metrics.

    `retried` is the retry policy's `on_retry` (every retry of an object-store
    request or a disk read, by the class of the error that caused it); the
    bandwidth wait is read at scrape time from `waited()` (seconds uploads spent
    waiting for the limit; the token bucket's `waited`).
    """

    def __init__(self, waited: Callable[[], float] = lambda: 0.0) -> None:
        self.registry = CollectorRegistry()
        self.retries = Counter(
            "connector_retries",
            "Retries of requests to the object store and of disk reads, by error class",
            ["error"],
            registry=self.registry,
        )
        self.retries.labels("TransientError")
        self.waited = waited

    def retried(self, exc: BaseException) -> None:
        self.retries.labels(error_class(exc)).inc()

    def collect(self) -> Iterable[Metric]:
        yield from self.registry.collect()
        wait = CounterMetricFamily(
            "connector_bandwidth_wait_seconds",
            "Seconds uploads waited for the bandwidth limit",
        )
        wait.add_metric([], self.waited())
        yield wait
