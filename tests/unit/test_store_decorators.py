"""The object-store decorators over the in-memory store: retry by error class, metrics,
and the order `wrap_object_store` stacks them in."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from connector.app import wrap_object_store
from connector.decorators.bandwidth import BandwidthLimitedStore, RateSchedule
from connector.decorators.metrics import MeteredStore, StoreMetrics
from connector.decorators.retry import RetryingStore
from connector.domain.backoff import backoff_delay
from connector.errors import (
    AuthenticationError,
    NotFoundError,
    PermanentError,
    TLSTrustError,
    TransientError,
    UnreachableError,
)
from connector.fakes import MemoryObjectStore
from connector.retry import RetryPolicy

POLICY = RetryPolicy(attempts=4, base_delay=0.5, max_delay=2.0)


class FaultyStore:
    """MemoryObjectStore with failures injected: `fail(op, *errors)` makes the next calls
    of `op` raise those errors in turn; `fail_list_after(n, error)` makes the next listing
    raise after yielding n keys. Every call is recorded."""

    def __init__(self) -> None:
        self.inner = MemoryObjectStore()
        self.faults: dict[str, list[BaseException]] = {}
        self.list_faults: list[tuple[int, BaseException]] = []
        self.calls: list[str] = []

    def fail(self, op: str, *errors: BaseException) -> None:
        self.faults.setdefault(op, []).extend(errors)

    def fail_list_after(self, n: int, error: BaseException) -> None:
        self.list_faults.append((n, error))

    def _enter(self, op: str) -> None:
        self.calls.append(op)
        pending = self.faults.get(op)
        if pending:
            raise pending.pop(0)

    def put(self, key: str, data: bytes) -> None:
        self._enter("put")
        self.inner.put(key, data)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self._enter("get")
        return self.inner.get(key, offset, length)

    def stat(self, key: str) -> int | None:
        self._enter("stat")
        return self.inner.stat(key)

    def delete(self, key: str) -> None:
        self._enter("delete")
        self.inner.delete(key)

    def list(self, prefix: str) -> Iterator[str]:
        self._enter("list")
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[str]:
        fault = self.list_faults.pop(0) if self.list_faults else None
        for i, key in enumerate(self.inner.list(prefix)):
            if fault is not None and i == fault[0]:
                raise fault[1]
            yield key


@pytest.fixture
def faulty() -> FaultyStore:
    return FaultyStore()


def retrying(store: FaultyStore, pauses: list[float]) -> RetryingStore:
    return RetryingStore(store, POLICY, sleep=pauses.append)


# -------------------------------------------------------------------------- retry


def test_transient_errors_are_retried_then_the_put_succeeds(faulty: FaultyStore) -> None:
    pauses: list[float] = []
    faulty.fail("put", TransientError("S3 answered 500"), UnreachableError("connection reset"))
    retrying(faulty, pauses).put("packs/aa", b"pack body")
    assert faulty.calls == ["put", "put", "put"]
    assert faulty.inner.objects == {"packs/aa": b"pack body"}
    # the policy's backoff: between half and all of 0.5 s, then of 1.0 s
    assert len(pauses) == 2
    assert 0.25 <= pauses[0] <= 0.5 and 0.5 <= pauses[1] <= 1.0


@pytest.mark.parametrize(
    "error",
    [
        PermanentError("S3 put failed (InvalidRequest)"),
        AuthenticationError("S3 refused put (403 AccessDenied)"),
        TLSTrustError("the certificate is not trusted"),
        NotFoundError("object does not exist"),
        ValueError("a bug, not a server"),
    ],
)
def test_permanent_errors_fail_at_once_with_one_call(
    faulty: FaultyStore, error: BaseException
) -> None:
    pauses: list[float] = []
    faulty.fail("get", error)
    faulty.inner.put("config", b"x")
    with pytest.raises(type(error)) as info:
        retrying(faulty, pauses).get("config")
    assert info.value is error
    assert faulty.calls == ["get"]
    assert pauses == []


def test_exhausted_attempts_give_a_transient_error_saying_what_and_how_often(
    faulty: FaultyStore,
) -> None:
    pauses: list[float] = []
    faulty.fail("stat", *(TransientError(f"S3 answered 503 (#{i})") for i in range(1, 6)))
    with pytest.raises(TransientError) as info:
        retrying(faulty, pauses).stat("packs/bb")
    message = str(info.value)
    assert "stat of packs/bb" in message
    assert "after 4 attempts" in message
    assert "503 (#4)" in message  # the last reason
    assert faulty.calls == ["stat"] * 4
    assert len(pauses) == 3
    assert faulty.faults["stat"] and len(faulty.faults["stat"]) == 1  # the fifth never asked


def test_delete_and_get_are_retried_too(faulty: FaultyStore) -> None:
    pauses: list[float] = []
    store = retrying(faulty, pauses)
    faulty.inner.put("locks/r1", b"lock")
    faulty.fail("get", TransientError("throttled"))
    faulty.fail("delete", TransientError("throttled"))
    assert store.get("locks/r1", 1, 2) == b"oc"
    store.delete("locks/r1")
    assert faulty.inner.objects == {}
    assert faulty.calls == ["get", "get", "delete", "delete"]


def test_a_listing_that_fails_midway_resumes_after_the_last_key_without_duplicates(
    faulty: FaultyStore,
) -> None:
    pauses: list[float] = []
    keys = [f"packs/{i:02x}" for i in range(10)]
    for key in keys:
        faulty.inner.put(key, b"p")
    faulty.inner.put("other/zz", b"o")
    faulty.fail_list_after(3, TransientError("connection reset while listing"))
    faulty.fail_list_after(7, UnreachableError("endpoint unreachable"))
    assert list(retrying(faulty, pauses).list("packs/")) == keys
    assert faulty.calls == ["list", "list", "list"]
    assert len(pauses) == 2


def test_a_listing_that_fails_before_yielding_is_retried(faulty: FaultyStore) -> None:
    pauses: list[float] = []
    faulty.inner.put("runs/a", b"1")
    faulty.fail("list", TransientError("503 before the first page"))
    assert list(retrying(faulty, pauses).list("runs/")) == ["runs/a"]
    assert faulty.calls == ["list", "list"]


def test_a_listing_that_fails_without_progress_gives_up(faulty: FaultyStore) -> None:
    pauses: list[float] = []
    faulty.inner.put("runs/a", b"1")
    faulty.inner.put("runs/b", b"2")
    for _ in range(4):
        faulty.fail_list_after(1, TransientError("reset after the first page"))
    seen: list[str] = []
    with pytest.raises(TransientError, match=r"list of runs/ failed after 4 attempts"):
        seen.extend(retrying(faulty, pauses).list("runs/"))
    assert seen == ["runs/a"]


def test_a_permanent_listing_error_is_not_retried(faulty: FaultyStore) -> None:
    faulty.inner.put("runs/a", b"1")
    faulty.inner.put("runs/b", b"2")
    faulty.fail_list_after(1, AuthenticationError("403 on the second page"))
    seen: list[str] = []
    with pytest.raises(AuthenticationError):
        seen.extend(retrying(faulty, []).list("runs/"))
    assert seen == ["runs/a"] and faulty.calls == ["list"]


def test_retries_are_logged_as_events_without_secrets(
    faulty: FaultyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import json
    import sys

    import structlog

    from connector import logging as clog
    from connector.secrets import Secret

    secret = "sk-" + "q" * 30
    clog.register_secret(Secret(secret))
    stream = io.StringIO()
    original = sys.stderr
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        clog.configure("info", json=True)
        faulty.fail("put", TransientError(f"server echoed {secret}"))
        retrying(faulty, []).put("packs/cc", b"x")
    finally:
        monkeypatch.setattr(sys, "stderr", original)
        clog.configure("info")
        structlog.reset_defaults()
    text = stream.getvalue()
    assert secret not in text
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    (event,) = [e for e in events if e.get("event") == "retry.again"]
    assert event["what"] == "object store put of packs/cc"
    assert event["error_class"] == "TransientError" and event["attempt"] == 1
    assert event["error"] == "server echoed **********"


def test_the_policy_and_the_daemon_share_one_backoff_rule() -> None:
    assert [backoff_delay(n, 10, 60) for n in (0, 1, 2, 3, 4)] == [0, 10, 20, 40, 60]
    assert backoff_delay(2, 1.0, 8.0, jitter=1.0) == 1.0  # jitter takes at most half
    policy = RetryPolicy(attempts=3, base_delay=1.0, max_delay=8.0)
    delays = [policy.delay(4) for _ in range(200)]
    assert all(4.0 <= d <= 8.0 for d in delays) and len(set(delays)) > 1
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_delay=5.0, max_delay=1.0)


# ------------------------------------------------------------------------ metrics


def sample(metrics: StoreMetrics, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_metrics_count_operations_bytes_errors_and_latency(faulty: FaultyStore) -> None:
    metrics = StoreMetrics()
    clock = iter(float(i) for i in range(100))
    store = MeteredStore(faulty, metrics, monotonic=lambda: next(clock))
    store.put("packs/aa", b"12345")
    assert store.get("packs/aa", 1, 3) == b"234"
    assert store.stat("packs/aa") == 5
    faulty.fail("get", TransientError("500"))
    with pytest.raises(TransientError):
        store.get("packs/aa")
    with pytest.raises(NotFoundError):
        store.get("packs/none")
    assert list(store.list("packs/")) == ["packs/aa"]
    store.delete("packs/aa")
    ops = "connector_object_store_operations_total"
    assert sample(metrics, ops, {"operation": "put", "outcome": "ok"}) == 1
    assert sample(metrics, ops, {"operation": "get", "outcome": "ok"}) == 1
    assert sample(metrics, ops, {"operation": "get", "outcome": "error"}) == 2
    assert sample(metrics, ops, {"operation": "list", "outcome": "ok"}) == 1
    assert sample(metrics, ops, {"operation": "delete", "outcome": "ok"}) == 1
    errors = "connector_object_store_errors_total"
    assert sample(metrics, errors, {"operation": "get", "error": "TransientError"}) == 1
    assert sample(metrics, errors, {"operation": "get", "error": "NotFoundError"}) == 1
    byte_count = "connector_object_store_bytes_total"
    assert sample(metrics, byte_count, {"direction": "sent"}) == 5
    assert sample(metrics, byte_count, {"direction": "received"}) == 3
    latency = "connector_object_store_latency_seconds_count"
    assert sample(metrics, latency, {"operation": "get"}) == 3
    # each call took one tick of the fake clock
    assert sample(metrics, "connector_object_store_latency_seconds_sum", {"operation": "put"}) == 1
    text = generate_latest(metrics.registry).decode()
    assert 'connector_object_store_operations_total{operation="put",outcome="ok"} 1.0' in text


# ----------------------------------------------------------------------- stacking


def layers(store: object) -> list[type]:
    out = []
    while True:
        out.append(type(store))
        inner = getattr(store, "inner", None)
        if inner is None:
            return out
        store = inner


def test_wrap_object_store_stacks_retry_outside_the_limit_outside_the_metrics() -> None:
    base = MemoryObjectStore()
    limited = RateSchedule(default=10 * 1024 * 1024)
    stack = wrap_object_store(base, POLICY, limited, StoreMetrics())
    assert layers(stack) == [RetryingStore, BandwidthLimitedStore, MeteredStore, MemoryObjectStore]
    assert isinstance(stack, RetryingStore) and stack.policy is POLICY
    # no limit: no limiter; no metrics: no metrics layer
    assert layers(wrap_object_store(base, POLICY, RateSchedule(0), StoreMetrics())) == [
        RetryingStore,
        MeteredStore,
        MemoryObjectStore,
    ]
    assert layers(wrap_object_store(base, POLICY, RateSchedule(0))) == [
        RetryingStore,
        MemoryObjectStore,
    ]


def test_every_attempt_of_a_retried_put_is_counted_and_paced() -> None:
    faulty = FaultyStore()
    faulty.fail("put", TransientError("500"), TransientError("500"))
    metrics = StoreMetrics()
    stack = wrap_object_store(
        faulty, POLICY, RateSchedule(default=1 << 30), metrics, sleep=lambda _s: None
    )
    stack.put("packs/dd", b"x" * 1000)
    assert faulty.inner.objects == {"packs/dd": b"x" * 1000}
    ops = "connector_object_store_operations_total"
    assert sample(metrics, ops, {"operation": "put", "outcome": "error"}) == 2
    assert sample(metrics, ops, {"operation": "put", "outcome": "ok"}) == 1
    # the metrics sit inside the limiter: all three attempts passed through it
    assert layers(stack)[1:3] == [BandwidthLimitedStore, MeteredStore]
