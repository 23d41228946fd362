"""The KMS key provider against moto_server's KMS over TLS, and the local key file beside it."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from connector.adapters.kms import KmsKeyProvider
from connector.adapters.s3 import S3ObjectStore, tls_minimum_of
from connector.errors import PermanentError
from connector.secrets import Secret
from connector.store.keys import LocalKeyProvider, StoreKeys, generate_key_file
from connector.store.repository import Repository

pytestmark = pytest.mark.integration


@pytest.fixture
def kms(moto: Any) -> Any:
    return moto.boto3_client("kms")


@pytest.fixture
def store(moto: Any, s3_bucket: str) -> S3ObjectStore:
    return S3ObjectStore(
        s3_bucket,
        region=moto.region,
        prefix="kms",
        endpoint_url=moto.endpoint_url,
        ca_file=moto.ca_file,
        sse="AES256",
        access_key_id=Secret(moto.access_key),
        secret_access_key=Secret(moto.secret_key),
    )


def provider(moto: Any, key_id: str) -> KmsKeyProvider:
    return KmsKeyProvider(
        key_id,
        region=moto.region,
        endpoint_url=moto.endpoint_url,
        ca_file=moto.ca_file,
        access_key_id=Secret(moto.access_key),
        secret_access_key=Secret(moto.secret_key),
    )


def new_key(kms: Any) -> tuple[str, str]:
    meta = kms.create_key(Description="connector store test")["KeyMetadata"]
    return meta["KeyId"], meta["Arn"]


def test_master_key_is_a_kms_data_key_kept_only_wrapped(
    moto: Any, kms: Any, store: S3ObjectStore
) -> None:
    key_id, arn = new_key(kms)
    p = provider(moto, key_id)
    assert tls_minimum_of(p.client) == ssl.TLSVersion.TLSv1_2
    repo = Repository.open(store, p, create=True)
    doc = json.loads(store.get("config"))
    assert doc["key"]["provider"] == "kms" and doc["key"]["key_id"] == arn
    assert set(doc["key"]) == {"provider", "key_id", "wrapped"}
    # the wrapped blob is KMS's, bound to this store id by the encryption context
    blob = base64.b64decode(doc["key"]["wrapped"])
    plain = kms.decrypt(CiphertextBlob=blob, EncryptionContext={"store": doc["store_id"]})
    assert StoreKeys(plain["Plaintext"]).block_id(b"x") == repo.keys.block_id(b"x")
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.decrypt(CiphertextBlob=blob, EncryptionContext={"store": "another"})
    # the plaintext data key is stored nowhere
    assert plain["Plaintext"] not in store.get("config")
    # a new process (a new provider, by alias too) opens the same store
    kms.create_alias(AliasName="alias/connector-store-test", TargetKeyId=key_id)
    again = Repository.open(store, provider(moto, "alias/connector-store-test"))
    assert again.keys.block_id(b"x") == repo.keys.block_id(b"x")
    sealed = repo.keys.seal(b"hello", b"aad")
    assert again.keys.open(sealed, b"aad", "test") == b"hello"


def test_wrong_kms_key_is_a_clear_error(moto: Any, kms: Any, store: S3ObjectStore) -> None:
    key_a, arn_a = new_key(kms)
    key_b, _ = new_key(kms)
    Repository.open(store, provider(moto, key_a), create=True)
    with pytest.raises(PermanentError) as info:
        Repository.open(store, provider(moto, key_b))
    message = str(info.value)
    assert "does not open this store" in message and arn_a in message and key_b in message


def test_disabled_and_deleted_kms_keys_are_clear_errors(
    moto: Any, kms: Any, store: S3ObjectStore
) -> None:
    key_id, _ = new_key(kms)
    Repository.open(store, provider(moto, key_id), create=True)
    kms.disable_key(KeyId=key_id)
    with pytest.raises(PermanentError, match=r"is disabled.*enable-key"):
        Repository.open(store, provider(moto, key_id))
    kms.enable_key(KeyId=key_id)
    Repository.open(store, provider(moto, key_id))
    kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
    with pytest.raises(PermanentError, match="scheduled for deletion"):
        Repository.open(store, provider(moto, key_id))


def test_missing_kms_key_is_a_clear_error(moto: Any, store: S3ObjectStore) -> None:
    missing = "0b9b6c4e-0000-4000-8000-000000000000"
    with pytest.raises(PermanentError, match=f"KMS key {missing} does not exist"):
        Repository.open(store, provider(moto, missing), create=True)
    assert store.stat("config") is None  # nothing was written


def test_store_moved_to_another_store_id_is_refused(
    moto: Any, kms: Any, store: S3ObjectStore
) -> None:
    key_id, _ = new_key(kms)
    Repository.open(store, provider(moto, key_id), create=True)
    doc = json.loads(store.get("config"))
    doc["store_id"] = "0" * 32
    store.put("config", json.dumps(doc).encode())
    with pytest.raises(PermanentError, match="does not belong to this store"):
        Repository.open(store, provider(moto, key_id))


def test_local_and_kms_stores_refuse_the_other_provider_clearly(
    moto: Any, kms: Any, store: S3ObjectStore, tmp_path: Path
) -> None:
    generate_key_file(tmp_path / "store.key")
    local = LocalKeyProvider(tmp_path / "store.key")
    Repository.open(store, local, create=True)
    key_id, _ = new_key(kms)
    with pytest.raises(PermanentError, match=r"local key file.*remove kms_key_id"):
        Repository.open(store, provider(moto, key_id))
    store.delete("config")
    Repository.open(store, provider(moto, key_id), create=True)
    with pytest.raises(PermanentError, match="protected by 'kms'"):
        Repository.open(store, local)
