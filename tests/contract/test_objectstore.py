"""The ObjectStore contract against the in-memory fake, the local directory store and S3 on a
real moto_server (TLS)."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

import pytest

from connector.adapters.localstore import LocalDirObjectStore
from connector.adapters.s3 import S3ObjectStore
from connector.errors import ConfigError, PermanentError
from connector.fakes import MemoryObjectStore
from connector.secrets import Secret
from tests.contract.objectstore_contract import MiB, ObjectStoreContract, pattern
from tests.harness.moto import MotoServer

# Small multipart settings so the large-object test really goes multipart on moto,
# which enforces S3's 5 MiB minimum part size.
TEST_THRESHOLD = 6 * MiB
TEST_PART_SIZE = 5 * MiB
LARGE_SIZE = 2 * TEST_PART_SIZE + 123_457  # three parts: 5 MiB, 5 MiB, the rest


class TestMemoryObjectStore(ObjectStoreContract):
    """The fake every unit test stores into: it must keep the real stores' rules."""

    @pytest.fixture
    def store(self) -> MemoryObjectStore:
        return MemoryObjectStore()


class TestLocalDirObjectStore(ObjectStoreContract):
    large_size = LARGE_SIZE

    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalDirObjectStore:
        return LocalDirObjectStore(tmp_path / "store")

    def test_a_root_that_is_a_file_is_refused_and_left_alone(self, tmp_path: Path) -> None:
        root = tmp_path / "store"
        root.write_bytes(b"not a folder")
        with pytest.raises(
            ConfigError, match=r"the object store directory .*store is not a directory; give "
        ):
            LocalDirObjectStore(root)
        assert root.read_bytes() == b"not a folder"

    def test_writes_leave_no_temporary_files(self, store: LocalDirObjectStore) -> None:
        for i in range(5):
            store.put(f"p/{i}", b"x" * i)
        names = sorted(p.name for p in (store.root / "p").iterdir())
        assert names == ["0", "1", "2", "3", "4"]

    def test_a_write_in_progress_is_not_listed(self, store: LocalDirObjectStore) -> None:
        store.put("p/done", b"1")
        (store.root / "p" / ".tmp-half-written").write_bytes(b"partial")
        assert list(store.list("")) == ["p/done"]

    def test_the_sweep_removes_only_temporary_files_older_than_asked(
        self, store: LocalDirObjectStore
    ) -> None:
        store.put("p/done", b"1")
        old = store.root / "p" / ".tmp-crashed-write"
        old.write_bytes(b"partial")
        os.utime(old, (1_000_000, 1_000_000))
        fresh = store.root / "p" / ".tmp-in-progress"
        fresh.write_bytes(b"partial")
        assert store.abort_incomplete_uploads(dt.timedelta(hours=1)) == 1
        assert not old.exists() and fresh.exists()
        assert store.abort_incomplete_uploads(dt.timedelta(0)) == 1
        assert not fresh.exists() and store.get("p/done") == b"1"
        assert store.uploads_in_use() == frozenset()

    def test_the_access_check_names_a_read_only_directory(self, store: LocalDirObjectStore) -> None:
        store.check_access()
        store.root.chmod(0o500)
        try:
            if os.access(store.root, os.W_OK):  # root ignores modes: drop to nobody
                pid = os.fork()
                if pid == 0:  # the child reports through its exit status only
                    code = 1
                    try:
                        os.setgid(65534)
                        os.setuid(65534)
                        store.check_access()
                    except PermanentError as exc:
                        code = 0 if "is not writable" in str(exc) else 2
                    finally:
                        os._exit(code)
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0
            else:
                with pytest.raises(PermanentError, match="is not writable"):
                    store.check_access()
        finally:
            store.root.chmod(0o700)

    def test_keys_cannot_escape_through_a_symlink(
        self, store: LocalDirObjectStore, tmp_path: Path
    ) -> None:
        outside = tmp_path / "outside"
        outside.mkdir()
        (store.root / "link").symlink_to(outside, target_is_directory=True)
        with pytest.raises(ValueError):
            store.put("link/x", b"x")
        assert list(outside.iterdir()) == []

    def test_concurrent_puts_of_one_key_leave_one_whole_version(
        self, store: LocalDirObjectStore
    ) -> None:
        # Atomic replace: readers and the final state see one whole version, never a mix.
        # (Not in the shared contract: moto_server itself fails on concurrent overwrites
        # of one key with "I/O operation on closed file"; real S3 is atomic per PUT.)
        versions = [os.urandom(256 * 1024) for _ in range(8)]
        errors: list[BaseException] = []
        seen: list[bytes] = []
        store.put("contended", versions[0])

        def writer(data: bytes) -> None:
            try:
                for _ in range(5):
                    store.put("contended", data)
                    seen.append(store.get("contended"))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(v,)) for v in versions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert all(s in versions for s in seen)
        assert store.get("contended") in versions
        assert list(store.list("")) == ["contended"]

    def test_files_are_private_to_the_owner(self, store: LocalDirObjectStore) -> None:
        store.put("secret-ish", b"x")
        assert (os.stat(store.root / "secret-ish").st_mode & 0o077) == 0

    def test_root_that_is_a_file_is_a_config_error(self, tmp_path: Path) -> None:
        f = tmp_path / "file"
        f.write_bytes(b"")
        with pytest.raises(ConfigError):
            LocalDirObjectStore(f)


def make_s3_store(
    moto: MotoServer, bucket: str, prefix: str = "staging/v1", **overrides: object
) -> S3ObjectStore:
    args: dict[str, object] = {
        "region": moto.region,
        "prefix": prefix,
        "endpoint_url": moto.endpoint_url,
        "ca_file": moto.ca_file,
        "sse": "aws:kms",
        "kms_key_id": "alias/connector-staging",
        "access_key_id": Secret(moto.access_key),
        "secret_access_key": Secret(moto.secret_key),
        "multipart_threshold": TEST_THRESHOLD,
        "multipart_part_size": TEST_PART_SIZE,
    }
    args.update(overrides)
    return S3ObjectStore(bucket, **args)  # type: ignore[arg-type]


@pytest.mark.integration
class TestS3ObjectStore(ObjectStoreContract):
    large_size = LARGE_SIZE

    @pytest.fixture
    def store(self, moto: MotoServer, s3_bucket: str) -> S3ObjectStore:
        return make_s3_store(moto, s3_bucket)

    def test_keys_live_under_the_prefix(
        self, store: S3ObjectStore, moto: MotoServer, s3_bucket: str
    ) -> None:
        store.put("packs/00/aa", b"1")
        raw = moto.boto3_client().list_objects_v2(Bucket=s3_bucket)
        assert [o["Key"] for o in raw["Contents"]] == ["staging/v1/packs/00/aa"]

    def test_another_prefix_sees_nothing(
        self, store: S3ObjectStore, moto: MotoServer, s3_bucket: str
    ) -> None:
        store.put("packs/00/aa", b"1")
        other = make_s3_store(moto, s3_bucket, prefix="staging/v10")
        assert list(other.list("")) == []
        assert other.stat("packs/00/aa") is None

    def test_large_put_is_multipart_and_leaves_no_upload(
        self, store: S3ObjectStore, moto: MotoServer, s3_bucket: str
    ) -> None:
        data = pattern(LARGE_SIZE, seed=9)
        store.put("big", data)
        raw = moto.boto3_client()
        head = raw.head_object(Bucket=s3_bucket, Key="staging/v1/big")
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # three parts
        assert head["ContentLength"] == LARGE_SIZE
        assert raw.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []

    def test_at_threshold_is_a_single_put(
        self, store: S3ObjectStore, moto: MotoServer, s3_bucket: str
    ) -> None:
        store.put("edge", pattern(TEST_THRESHOLD, seed=5))
        head = moto.boto3_client().head_object(Bucket=s3_bucket, Key="staging/v1/edge")
        assert "-" not in head["ETag"]

    def test_check_access_passes_on_an_existing_bucket(self, store: S3ObjectStore) -> None:
        store.check_access()
