"""The fault-injecting proxy in front of moto_server (tests/harness/s3faults.py), and
how the S3 adapter classifies what it injects."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError

from connector.adapters.s3 import S3ObjectStore
from connector.errors import AuthenticationError, PermanentError, TransientError
from connector.secrets import Secret
from tests.harness.moto import MotoServer
from tests.harness.s3faults import FaultyS3Proxy

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def client_via(proxy: FaultyS3Proxy, moto: MotoServer) -> Any:
    """A raw boto3 client (one attempt per request) whose endpoint is the proxy."""
    session = boto3.session.Session(
        aws_access_key_id=moto.access_key,
        aws_secret_access_key=moto.secret_key,
        region_name=moto.region,
    )
    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        s3={"addressing_style": "path"},
        ignore_configured_endpoint_urls=True,
    )
    return session.client("s3", endpoint_url=proxy.url, verify=str(moto.ca_file), config=config)


def store_via(proxy: FaultyS3Proxy, moto: MotoServer, bucket: str) -> S3ObjectStore:
    return S3ObjectStore(
        bucket,
        region=moto.region,
        prefix="staging",
        endpoint_url=proxy.url,
        ca_file=moto.ca_file,
        sse="AES256",
        access_key_id=Secret(moto.access_key),
        secret_access_key=Secret(moto.secret_key),
        multipart_threshold=6 * MiB,
        multipart_part_size=5 * MiB,
    )


def test_requests_pass_through_unchanged_and_are_recorded(
    faulty_s3: FaultyS3Proxy, moto: MotoServer, s3_bucket: str
) -> None:
    s3 = client_via(faulty_s3, moto)
    body = bytes(range(256)) * 4096  # 1 MiB
    s3.put_object(Bucket=s3_bucket, Key="a/one", Body=body)
    assert s3.get_object(Bucket=s3_bucket, Key="a/one")["Body"].read() == body
    assert (
        s3.get_object(Bucket=s3_bucket, Key="a/one", Range="bytes=10-19")["Body"].read()
        == (body[10:20])
    )
    assert s3.head_object(Bucket=s3_bucket, Key="a/one")["ContentLength"] == len(body)
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="a/")["Contents"]
    assert [o["Key"] for o in listed] == ["a/one"]
    with pytest.raises(ClientError) as info:
        s3.head_object(Bucket=s3_bucket, Key="a/absent")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    # what moto itself holds, asked directly
    direct = moto.boto3_client().get_object(Bucket=s3_bucket, Key="a/one")["Body"].read()
    assert direct == body
    outcomes = [(s.method, s.outcome) for s in faulty_s3.seen if "/a/" in s.path]
    assert outcomes == [
        ("PUT", "forwarded 200"),
        ("GET", "forwarded 200"),
        ("GET", "forwarded 206"),
        ("HEAD", "forwarded 200"),
        ("HEAD", "forwarded 404"),
    ]


def test_an_injected_status_is_answered_the_given_number_of_times(
    faulty_s3: FaultyS3Proxy, moto: MotoServer, s3_bucket: str
) -> None:
    s3 = client_via(faulty_s3, moto)
    fault = faulty_s3.inject("PUT", "/b/", status=500, code="InternalError", times=1)
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket=s3_bucket, Key="b/x", Body=b"first")
    assert info.value.response["Error"]["Code"] == "InternalError"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    s3.put_object(Bucket=s3_bucket, Key="b/x", Body=b"second")  # the fault is used up
    assert fault.hits == 1
    assert [s.outcome for s in faulty_s3.requests("PUT", "/b/x")] == [
        "injected 500",
        "forwarded 200",
    ]
    # a PUT elsewhere was never matched
    s3.put_object(Bucket=s3_bucket, Key="c/x", Body=b"c")
    assert faulty_s3.requests("PUT", "/c/x")[0].outcome == "forwarded 200"


def test_an_injected_reset_drops_the_connection(
    faulty_s3: FaultyS3Proxy, moto: MotoServer, s3_bucket: str
) -> None:
    s3 = client_via(faulty_s3, moto)
    faulty_s3.inject("PUT", "/d/", reset=True)
    with pytest.raises(ConnectionClosedError):
        s3.put_object(Bucket=s3_bucket, Key="d/x", Body=b"z" * 100_000)
    s3.put_object(Bucket=s3_bucket, Key="d/x", Body=b"z" * 100_000)
    assert [s.outcome for s in faulty_s3.requests("PUT", "/d/x")] == ["reset", "forwarded 200"]
    assert moto.boto3_client().head_object(Bucket=s3_bucket, Key="d/x")["ContentLength"] == 100_000


def test_the_s3_adapter_classifies_injected_faults(
    faulty_s3: FaultyS3Proxy, moto: MotoServer, s3_bucket: str
) -> None:
    store = store_via(faulty_s3, moto, s3_bucket)
    faulty_s3.inject("PUT", "/staging/e/", status=503, code="SlowDown")
    with pytest.raises(TransientError, match="SlowDown"):
        store.put("e/1", b"x")
    faulty_s3.inject("PUT", "/staging/e/", reset=True)
    with pytest.raises(TransientError) as reset:
        store.put("e/1", b"x")
    assert not isinstance(reset.value, PermanentError)
    faulty_s3.inject("PUT", "/staging/e/", status=403, code="AccessDenied")
    with pytest.raises(AuthenticationError, match="AccessDenied"):
        store.put("e/1", b"x")
    faulty_s3.inject("GET", "/staging/e/", status=500)
    store.put("e/1", b"x")
    with pytest.raises(TransientError, match="InternalError"):
        store.get("e/1")
    assert store.get("e/1") == b"x"


def test_the_connect_proxy_resets_a_tunnel_mid_upload_once(
    moto: MotoServer, s3_bucket: str
) -> None:
    from connector.network import make_proxy
    from tests.harness.s3faults import ResettingConnectProxy

    proxy = ResettingConnectProxy(reset_after=256 * 1024, resets=1)
    try:
        store = S3ObjectStore(
            s3_bucket,
            region=moto.region,
            prefix="staging",
            endpoint_url=moto.endpoint_url,
            ca_file=moto.ca_file,
            sse="AES256",
            access_key_id=Secret(moto.access_key),
            secret_access_key=Secret(moto.secret_key),
            proxy=make_proxy(proxy.proxy_url),
        )
        store.put("f/small", b"s" * 1000)  # below the threshold: relayed
        body = bytes(range(256)) * 4096  # 1 MiB
        with pytest.raises(TransientError) as info:
            store.put("f/big", body)
        assert not isinstance(info.value, PermanentError)
        assert proxy.reset_tunnels == [f"127.0.0.1:{moto.port}"]
        store.put("f/big", body)  # a new tunnel, no reset left
        assert store.get("f/big") == body and store.get("f/small") == b"s" * 1000
        assert len(proxy.tunnels) >= 2
        assert set(proxy.tunnels) == {f"127.0.0.1:{moto.port}"}
    finally:
        proxy.stop()


def test_a_dropped_reply_reaches_s3_but_never_the_client(
    faulty_s3: FaultyS3Proxy, moto: MotoServer, s3_bucket: str
) -> None:
    faulty_s3.inject("POST", "?uploads", drop_reply=True)
    s3 = client_via(faulty_s3, moto)
    with pytest.raises(ConnectionClosedError):
        s3.create_multipart_upload(Bucket=s3_bucket, Key="a/big")
    (seen,) = faulty_s3.requests("POST", "?uploads")
    assert seen.outcome == "forwarded 200, reply dropped"
    (lost,) = faulty_s3.dropped_replies
    # S3 made the upload: it is open, and its id is in the reply the client never got
    uploads = moto.boto3_client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["a/big"]
    assert uploads[0]["UploadId"].encode() in lost
    # only once: the next request is answered
    s3.create_multipart_upload(Bucket=s3_bucket, Key="a/big")
    assert faulty_s3.requests("POST", "?uploads")[-1].outcome == "forwarded 200"
    with pytest.raises(ValueError):
        faulty_s3.inject("POST", "?uploads", drop_reply=True, reset=True)
