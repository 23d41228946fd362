"""Error paths of the S3 client's arguments, the manifest format and the job rules,
each with the message the troubleshooting guide documents."""

from __future__ import annotations

import datetime as dt
import json
import struct

import pytest

from connector.adapters.s3 import S3ObjectStore, make_aws_client, validate_endpoint_url
from connector.domain.jobs import (
    JOB_DELETING,
    MAX_DESCRIPTION,
    JobStatus,
    on_resume,
    validate_description,
    validate_seed_time,
)
from connector.domain.manifest import MANIFEST_MAGIC, DiskManifest
from connector.errors import ConfigError, InvalidInputError, StoreFormatError
from connector.secrets import Secret


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://[::1/", "endpoint_url is not a valid URL: "),
        ("ftp://s3.example.com", "endpoint_url must be an https:// URL with a host, got 'ftp:"),
        ("https://s3.example.com/?x=1", "endpoint_url must not have a query or fragment"),
    ],
)
def test_a_bad_endpoint_url_is_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_endpoint_url(url)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"access_key_id": "AKIA", "secret_access_key": Secret("s")},
            "access_key_id must be given as a Secret",
        ),
        ({"max_pool_connections": 0}, "max_pool_connections must be at least 1"),
        ({"read_timeout": 0}, "connect and read timeouts must be positive"),
        ({"max_attempts": 0}, "max_attempts must be at least 1"),
    ],
)
def test_bad_client_settings_are_refused(arguments: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_aws_client("s3", region="eu-central-1", **arguments)  # type: ignore[arg-type]
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"bucket": "Not_A_Bucket"}, "bucket 'Not_A_Bucket' is not a valid S3 bucket name"),
        (
            {"bucket": "b-1", "sse": "aws:kms", "kms_key_id": ""},
            "kms_key_id is empty; omit it to use the bucket's default KMS key",
        ),
    ],
)
def test_bad_store_settings_are_refused(arguments: dict[str, object], message: str) -> None:
    bucket = str(arguments.pop("bucket"))
    with pytest.raises(ConfigError) as info:
        S3ObjectStore(bucket, region="eu-central-1", **arguments)  # type: ignore[arg-type]
    assert str(info.value) == message


def _manifest(header: bytes, body: bytes = b"") -> bytes:
    return MANIFEST_MAGIC + struct.pack("<I", len(header)) + header + body


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"XXXX" + bytes(8), "not a disk manifest (bad magic)"),
        (_manifest(b"{nope"), "disk manifest header is not valid JSON: "),
        (
            _manifest(json.dumps({"version": 99}).encode()),
            "disk manifest version 99 is not supported by this connector (it reads version 1); "
            "upgrade the connector",
        ),
        (
            _manifest(json.dumps({"version": 1, "packs": [], "entries": 2}).encode(), b"x"),
            "disk manifest is truncated",
        ),
    ],
)
def test_a_damaged_manifest_is_a_store_format_error(data: bytes, message: str) -> None:
    with pytest.raises(StoreFormatError) as info:
        DiskManifest.decode(data)
    assert str(info.value).startswith(message)


def test_job_rules_refuse_with_what_to_do() -> None:
    with pytest.raises(InvalidInputError) as info:
        validate_description("x" * (MAX_DESCRIPTION + 1))
    assert str(info.value) == (
        f"the description has {MAX_DESCRIPTION + 1} characters; at most {MAX_DESCRIPTION} "
        "are allowed"
    )
    now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    with pytest.raises(InvalidInputError, match="the seed time needs a time zone"):
        validate_seed_time(dt.datetime(2026, 12, 1, 2), now)
    with pytest.raises(InvalidInputError, match="the job is being deleted; create a new one"):
        on_resume(JobStatus(JOB_DELETING, 0, ""), has_completed_run=True)
