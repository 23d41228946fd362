"""KMS keys the store cannot use, and damaged wrapped master keys, against moto_server's
KMS over TLS: each gives the message the troubleshooting guide documents."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from connector.adapters.kms import KmsKeyProvider
from connector.errors import PermanentError
from connector.secrets import Secret
from connector.store.keys import KEY_CONTEXT_PREFIX

pytestmark = pytest.mark.integration

CONTEXT = KEY_CONTEXT_PREFIX + b"store-1"


@pytest.fixture
def kms(moto: Any) -> Any:
    return moto.boto3_client("kms")


def provider(moto: Any, key_id: str) -> KmsKeyProvider:
    return KmsKeyProvider(
        key_id,
        region=moto.region,
        endpoint_url=moto.endpoint_url,
        ca_file=moto.ca_file,
        access_key_id=Secret(moto.access_key),
        secret_access_key=Secret(moto.secret_key),
    )


def test_a_signing_key_is_refused_for_the_store(moto: Any, kms: Any) -> None:
    meta = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]
    with pytest.raises(PermanentError) as info:
        provider(moto, meta["KeyId"]).new_master(CONTEXT)
    assert str(info.value) == (
        f"the KMS key {meta['KeyId']} is a SIGN_VERIFY key; the store needs a symmetric "
        "ENCRYPT_DECRYPT key"
    )


def test_damaged_wrapped_master_keys_are_named_as_damage(moto: Any, kms: Any) -> None:
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    keys = provider(moto, key_id)
    with pytest.raises(PermanentError) as info:
        keys.unwrap({"provider": "kms", "key_id": key_id, "wrapped": "not base64!"}, CONTEXT)
    assert str(info.value) == (
        "the store's config object holds no valid KMS ciphertext; it is damaged"
    )
    short = kms.encrypt(
        KeyId=key_id, Plaintext=b"sixteen bytes!!!", EncryptionContext={"store": "store-1"}
    )["CiphertextBlob"]
    wrapped = {"provider": "kms", "key_id": key_id, "wrapped": base64.b64encode(short).decode()}
    with pytest.raises(PermanentError) as info:
        keys.unwrap(wrapped, CONTEXT)
    assert str(info.value) == "KMS returned a master key of the wrong size; the store is damaged"
