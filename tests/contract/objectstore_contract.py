"""The ObjectStore contract: every implementation must pass this one suite.

Subclass `ObjectStoreContract` in a test module, override the `store` fixture and,
when the implementation has a multipart path, set `large_size` above its threshold.
"""

from __future__ import annotations

import os
import random
import threading

import pytest

from connector.errors import NotFoundError
from connector.ports import ObjectStore

MiB = 1024 * 1024


def pattern(size: int, seed: int = 1) -> bytes:
    """Deterministic, incompressible-looking bytes (so a wrong offset cannot go unnoticed)."""
    return random.Random(seed).randbytes(size)


class ObjectStoreContract:
    #: size of the "large" object; subclasses set it above their multipart threshold
    large_size: int = 12 * MiB

    @pytest.fixture
    def store(self) -> ObjectStore:
        raise NotImplementedError("a contract subclass must provide the `store` fixture")

    # -- put / get

    def test_put_then_get_returns_the_same_bytes(self, store: ObjectStore) -> None:
        data = pattern(100_000)
        store.put("packs/00/a1", data)
        assert store.get("packs/00/a1") == data

    def test_every_byte_value_round_trips(self, store: ObjectStore) -> None:
        data = bytes(range(256)) * 4
        store.put("bin", data)
        assert store.get("bin") == data

    def test_empty_object(self, store: ObjectStore) -> None:
        store.put("empty", b"")
        assert store.get("empty") == b""
        assert store.stat("empty") == 0
        assert list(store.list("emp")) == ["empty"]

    def test_put_replaces_an_existing_object(self, store: ObjectStore) -> None:
        store.put("k", b"first version, longer")
        store.put("k", b"second")
        assert store.get("k") == b"second"
        assert store.stat("k") == 6

    def test_get_of_a_missing_key_raises_not_found(self, store: ObjectStore) -> None:
        with pytest.raises(NotFoundError):
            store.get("no/such/key")
        with pytest.raises(NotFoundError):
            store.get("no/such/key", 10, 20)
        with pytest.raises(NotFoundError):
            store.get("no/such/key", 0, 0)

    # -- ranged get

    def test_ranged_get(self, store: ObjectStore) -> None:
        data = pattern(10_000, seed=2)
        store.put("r", data)
        assert store.get("r", 0, 1) == data[:1]
        assert store.get("r", 1234, 4321) == data[1234 : 1234 + 4321]
        assert store.get("r", 9_999, 1) == data[-1:]
        assert store.get("r", 5000) == data[5000:]
        assert store.get("r", 0) == data
        assert store.get("r", 100, 0) == b""

    def test_ranged_get_past_the_end_is_short(self, store: ObjectStore) -> None:
        data = pattern(1000, seed=3)
        store.put("short", data)
        assert store.get("short", 900, 500) == data[900:]
        assert store.get("short", 1000, 10) == b""
        assert store.get("short", 5000) == b""

    def test_negative_range_is_a_programming_error(self, store: ObjectStore) -> None:
        store.put("neg", b"abc")
        with pytest.raises(ValueError):
            store.get("neg", -1, 2)
        with pytest.raises(ValueError):
            store.get("neg", 0, -2)

    # -- stat

    def test_stat_reports_size_or_none(self, store: ObjectStore) -> None:
        store.put("sized", b"x" * 4097)
        assert store.stat("sized") == 4097
        assert store.stat("missing") is None
        assert store.stat("sized/below") is None

    # -- list

    def test_list_is_lexical_and_filtered_by_prefix(self, store: ObjectStore) -> None:
        keys = [
            "packs/00/aa",
            "packs/00/ab",
            "packs/01/zz",
            "packs/0a",
            "packs-other",
            "packs.x",
            "packs0",
            "manifests/r1/d1",
            "manifests/r10/d1",
            "manifests/r2/d1",
        ]
        shuffled = keys[:]
        random.Random(7).shuffle(shuffled)
        for key in shuffled:
            store.put(key, key.encode())
        assert list(store.list("")) == sorted(keys)
        assert list(store.list("packs")) == sorted(k for k in keys if k.startswith("packs"))
        assert list(store.list("packs/")) == [
            "packs/00/aa",
            "packs/00/ab",
            "packs/01/zz",
            "packs/0a",
        ]
        assert list(store.list("packs/0")) == [
            "packs/00/aa",
            "packs/00/ab",
            "packs/01/zz",
            "packs/0a",
        ]
        assert list(store.list("packs/00/a")) == ["packs/00/aa", "packs/00/ab"]
        assert list(store.list("manifests/r1")) == ["manifests/r1/d1", "manifests/r10/d1"]
        assert list(store.list("manifests/r1/")) == ["manifests/r1/d1"]
        assert list(store.list("nothing-here")) == []
        assert list(store.list("packs/00/aa")) == ["packs/00/aa"]

    def test_list_of_an_empty_store(self, store: ObjectStore) -> None:
        assert list(store.list("")) == []

    # -- delete

    def test_delete_removes_and_is_idempotent(self, store: ObjectStore) -> None:
        store.put("d/1", b"1")
        store.put("d/2", b"2")
        store.delete("d/1")
        assert store.stat("d/1") is None
        with pytest.raises(NotFoundError):
            store.get("d/1")
        store.delete("d/1")  # again: not an error
        store.delete("never/existed")
        assert list(store.list("d/")) == ["d/2"]

    # -- keys

    @pytest.mark.parametrize(
        "bad", ["", "/abs", "../up", "a/../../b", "a//b", "a/./b", "a/", "back\\slash", "nul\x00"]
    )
    def test_unsafe_keys_are_refused(self, store: ObjectStore, bad: str) -> None:
        with pytest.raises(ValueError):
            store.put(bad, b"x")
        with pytest.raises(ValueError):
            store.get(bad)

    # -- large objects

    def test_large_put_round_trips(self, store: ObjectStore) -> None:
        data = pattern(self.large_size, seed=4)
        store.put("large/object", data)
        assert store.stat("large/object") == len(data)
        # A range across the boundary between the first and second 5 MiB parts.
        start = 5 * MiB - 1000
        assert store.get("large/object", start, 3000) == data[start : start + 3000]
        assert store.get("large/object") == data

    # -- concurrency

    def test_concurrent_puts_from_many_threads(self, store: ObjectStore) -> None:
        # One store instance is shared by the upload workers.
        items = {f"conc/{i:02d}": os.urandom(32 * 1024) for i in range(12)}
        errors: list[BaseException] = []

        def writer(key: str, data: bytes) -> None:
            try:
                store.put(key, data)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=kv) for kv in items.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert list(store.list("conc/")) == sorted(items)
        for key, data in items.items():
            assert store.get(key) == data
