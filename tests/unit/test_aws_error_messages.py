"""How the S3 and KMS adapters turn botocore's errors into the connector's: each kind of
failure gives the message the troubleshooting guide documents, with what to do."""

from __future__ import annotations

import ssl

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    NoCredentialsError,
    SSLError,
)
from urllib3.util.ssl_match_hostname import CertificateError

from connector.adapters import kms, s3
from connector.errors import (
    AuthenticationError,
    PermanentError,
    TLSTrustError,
    TransientError,
    UnreachableError,
)

ENDPOINT = "https://s3.eu-central-1.amazonaws.com"
KMS_ENDPOINT = "https://kms.eu-central-1.amazonaws.com"
WHERE = "packs/ab/abcd"


def client_error(code: str, status: int = 400, message: str = "m") -> ClientError:
    response = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")


def dropped() -> SSLError:
    return SSLError(
        endpoint_url=ENDPOINT, error=ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    )


def s3_message(exc: BaseException, key: str | None = "alias/staging") -> tuple[type, str]:
    error = s3._map_error(exc, "put", WHERE, "bucket-1", ENDPOINT, key)
    return type(error), str(error)


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (
            client_error("KMS.DisabledException"),
            PermanentError,
            f"S3 put of {WHERE} failed because of the KMS key alias/staging "
            "(KMS.DisabledException: m); check that it exists, is enabled, and that the key policy "
            "lets these credentials use it",
        ),
        (
            client_error("PermanentRedirect", 301),
            PermanentError,
            f"S3 put of {WHERE} failed (PermanentRedirect: m); the bucket is in another region "
            "than the one configured: check the region setting",
        ),
        (
            client_error("RequestTimeTooSkewed", 403),
            PermanentError,
            f"S3 refused put of {WHERE} (RequestTimeTooSkewed: m): this machine's clock is wrong; "
            "enable time synchronisation (NTP)",
        ),
        (
            client_error("InvalidArgument"),
            PermanentError,
            f"S3 put of {WHERE} failed (InvalidArgument: m)",
        ),
        (
            NoCredentialsError(),
            AuthenticationError,
            f"no usable AWS credentials for S3 put of {WHERE} (Unable to locate credentials); give "
            "access_key_id and secret_access_key, or run with an instance or container role",
        ),
        (
            FlexibleChecksumError(error_msg="crc32 differs"),
            TransientError,
            f"S3 put of {WHERE}: checksum mismatch in transfer (crc32 differs)",
        ),
        (ValueError("something else"), PermanentError, f"S3 put of {WHERE} failed: something else"),
    ],
)
def test_s3_errors_say_what_happened_and_what_to_do(
    exc: BaseException, kind: type, message: str
) -> None:
    assert s3_message(exc) == (kind, message)


def test_a_dropped_s3_connection_is_transient() -> None:
    kind, message = s3_message(dropped())
    assert kind is TransientError
    assert message.startswith(f"S3 put of {WHERE} at {ENDPOINT}: the connection was dropped (")
    assert message.endswith("); try again later")


def test_an_s3_endpoint_whose_certificate_names_another_host_is_a_trust_error() -> None:
    mismatch = CertificateError("hostname 's3.example.com' doesn't match 'other.example.com'")
    exc = SSLError(endpoint_url=ENDPOINT, error=mismatch)
    kind, message = s3_message(exc)
    assert kind is TLSTrustError
    assert message.startswith(
        "the certificate of the S3 endpoint s3.eu-central-1.amazonaws.com is not valid for that "
        "host name ("
    )


def kms_message(exc: BaseException, stored: str | None = None) -> tuple[type, str]:
    error = kms._map_error(exc, "Decrypt", "alias/replicas", KMS_ENDPOINT, stored)
    return type(error), str(error)


@pytest.mark.parametrize(
    ("exc", "kind", "message"),
    [
        (
            client_error("NotFoundException"),
            PermanentError,
            "the KMS key alias/replicas does not exist in this account and region (the store was "
            "created with arn:k) (NotFoundException: m); check [store] kms_key_id and the region",
        ),
        (
            client_error("DisabledException"),
            PermanentError,
            "the KMS key alias/replicas is disabled (DisabledException: m); enable it "
            "(aws kms enable-key)",
        ),
        (
            client_error("KMSInvalidStateException"),
            PermanentError,
            "the KMS key alias/replicas cannot be used in its current state "
            "(KMSInvalidStateException: m); a key pending deletion must have its deletion "
            "cancelled and be enabled again",
        ),
        (
            client_error("AccessDeniedException"),
            AuthenticationError,
            "KMS refused Decrypt with key alias/replicas (AccessDeniedException: m); the key "
            "policy or the IAM policy must allow kms:Decrypt for these credentials",
        ),
        (
            client_error("UnrecognizedClientException"),
            AuthenticationError,
            "KMS refused the credentials for Decrypt (UnrecognizedClientException: m); check the "
            "access key id and secret",
        ),
        (
            client_error("ThrottlingException"),
            TransientError,
            "KMS Decrypt failed, try again later (ThrottlingException: m)",
        ),
        (
            client_error("InvalidKeyUsageException"),
            PermanentError,
            "KMS Decrypt with key alias/replicas failed (InvalidKeyUsageException: m)",
        ),
        (
            EndpointConnectionError(endpoint_url=KMS_ENDPOINT),
            UnreachableError,
            f"cannot reach the KMS endpoint {KMS_ENDPOINT} (Could not connect to the endpoint URL: "
            f'"{KMS_ENDPOINT}"); check [store] kms_endpoint_url, the region, DNS, the firewall '
            "and any HTTPS proxy",
        ),
        (
            NoCredentialsError(),
            AuthenticationError,
            "no usable AWS credentials for KMS Decrypt (Unable to locate credentials); give "
            "access_key_id and secret_access_key_file in [s3], or run with an instance or "
            "container role",
        ),
        (
            HTTPClientError(error="reset by peer"),
            TransientError,
            f"KMS Decrypt at {KMS_ENDPOINT} was interrupted (An HTTP Client raised an unhandled "
            "exception: reset by peer); try again",
        ),
        (ValueError("odd"), PermanentError, f"KMS Decrypt at {KMS_ENDPOINT} failed: odd"),
    ],
)
def test_kms_errors_say_what_happened_and_what_to_do(
    exc: BaseException, kind: type, message: str
) -> None:
    got_kind, got = kms_message(exc, stored="arn:k")
    assert (got_kind, got) == (kind, message)


def test_a_dropped_kms_connection_is_transient() -> None:
    kind, message = kms_message(dropped())
    assert kind is TransientError
    assert message.startswith(f"KMS Decrypt at {KMS_ENDPOINT}: the connection was dropped (")
    assert message.endswith("); try again")
