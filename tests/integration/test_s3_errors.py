"""S3ObjectStore failure modes against real servers: moto_server over TLS, local TLS servers.

Only what the servers really enforce is tested: signatures and IAM permissions on a
moto_server of our own with authentication switched on, TLS versions and trust on
local Python TLS servers, faults (5xx, throttling) through botocore's own send hook.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.httpsession
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ClientError

from connector.adapters.s3 import S3ObjectStore, enforce_tls_minimum, tls_minimum_of
from connector.errors import (
    AuthenticationError,
    ConfigError,
    NotFoundError,
    PermanentError,
    TLSTrustError,
    TransientError,
    UnreachableError,
)
from connector.secrets import Secret
from tests.harness import ca as ca_harness
from tests.harness.ca import make_ca
from tests.harness.moto import MotoServer, free_port, start_moto
from tests.harness.tls_servers import TLSServer, legacy_client_context

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SECRET_VALUE = "S3cr3t-never-in-messages-0123456789abcdefXYZ"


def store_for(moto: MotoServer, bucket: str, **overrides: Any) -> S3ObjectStore:
    args: dict[str, Any] = {
        "region": moto.region,
        "prefix": "staging",
        "endpoint_url": moto.endpoint_url,
        "ca_file": moto.ca_file,
        "sse": "aws:kms",
        "access_key_id": Secret(moto.access_key),
        "secret_access_key": Secret(SECRET_VALUE),
        "multipart_threshold": 6 * MiB,
        "multipart_part_size": 5 * MiB,
        "connect_timeout": 3.0,
        "read_timeout": 10.0,
    }
    args.update(overrides)
    return S3ObjectStore(bucket, **args)


def full_text(exc: BaseException) -> str:
    """Everything a traceback of `exc` would print, causes included."""
    return "".join(traceback.format_exception(exc))


# ------------------------------------------------------------- local TLS servers


# tls11_server and wrong_name_server: tests/harness/fixtures_tls.py


@pytest.fixture
def permissive_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make botocore's own SSL contexts accept TLS 1.0/1.1 (a weakened OpenSSL policy)."""
    original = botocore.httpsession.create_urllib3_context

    def permissive(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        ctx: ssl.SSLContext = original(*args, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        return ctx

    monkeypatch.setattr(botocore.httpsession, "create_urllib3_context", permissive)


# ------------------------------------------------------------------ configuration


def test_plain_http_endpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plain HTTP"):
        S3ObjectStore("bucket-a", region="eu-central-1", endpoint_url="http://127.0.0.1:9000")


def test_endpoint_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as info:
        S3ObjectStore(
            "bucket-a", region="eu-central-1", endpoint_url=f"https://ak:{SECRET_VALUE}@s3.example"
        )
    assert SECRET_VALUE not in full_text(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"sse": "none"},
        {"sse": "AES256", "kms_key_id": "alias/x"},
        {"access_key_id": Secret("AKIAONLYONE")},
        {"multipart_part_size": 4 * MiB},
        {"multipart_threshold": 5 * MiB, "multipart_part_size": 8 * MiB},
        {"ca_file": Path("/nonexistent/ca.pem")},
        {"region": "not a region"},
        {"use_fips_endpoint": True, "endpoint_url": "https://s3.example"},
    ],
)
def test_contradictory_settings_are_config_errors(overrides: dict[str, Any]) -> None:
    args: dict[str, Any] = {"region": "eu-central-1"}
    args.update(overrides)
    with pytest.raises(ConfigError):
        S3ObjectStore("bucket-a", **args)


def test_fips_endpoint_is_used_when_asked() -> None:
    store = S3ObjectStore("bucket-a", region="us-east-1", use_fips_endpoint=True)
    assert store.endpoint_url.startswith("https://s3-fips.us-east-1.")
    assert tls_minimum_of(store._client) == ssl.TLSVersion.TLSv1_2


def test_secret_is_not_in_repr(moto: MotoServer, s3_bucket: str) -> None:
    store = store_for(moto, s3_bucket)
    assert SECRET_VALUE not in repr(store)
    assert SECRET_VALUE not in str(vars(store).get("_client"))


# ------------------------------------------------------------------- reachability


def test_unreachable_endpoint_names_it_and_says_what_to_check() -> None:
    port = free_port()  # nothing listens there any more
    store = S3ObjectStore(
        "bucket-a",
        region="eu-central-1",
        endpoint_url=f"https://127.0.0.1:{port}",
        access_key_id=Secret("AKIAEXAMPLEEXAMPLE00"),
        secret_access_key=Secret(SECRET_VALUE),
        connect_timeout=2,
    )
    started = time.monotonic()
    with pytest.raises(UnreachableError) as info:
        store.put("k", b"x")
    assert time.monotonic() - started < 10  # one attempt, no SDK retry loop
    message = str(info.value)
    assert f"https://127.0.0.1:{port}" in message
    assert "check" in message and "firewall" in message
    assert SECRET_VALUE not in full_text(info.value)
    with pytest.raises(UnreachableError):
        store.check_access()


def test_server_that_accepts_but_never_answers_is_transient() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # the kernel completes TCP handshakes; nobody ever speaks TLS
    try:
        port = listener.getsockname()[1]
        store = S3ObjectStore(
            "bucket-a",
            region="eu-central-1",
            endpoint_url=f"https://127.0.0.1:{port}",
            access_key_id=Secret("AKIAEXAMPLEEXAMPLE00"),
            secret_access_key=Secret(SECRET_VALUE),
            connect_timeout=1,
            read_timeout=1,
        )
        started = time.monotonic()
        with pytest.raises(TransientError) as info:
            store.get("k")
        assert time.monotonic() - started < 10
        assert f"127.0.0.1:{port}" in str(info.value)
    finally:
        listener.close()


# ---------------------------------------------------------------------- TLS trust


def test_untrusted_ca_is_a_tls_trust_error_naming_the_host(
    moto: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    other_ca = make_ca(tmp_path / "other-ca", name="some-other-ca")
    store = store_for(moto, s3_bucket, ca_file=other_ca.cert_file)
    with pytest.raises(TLSTrustError) as info:
        store.put("k", b"x")
    message = str(info.value)
    assert f"127.0.0.1:{moto.port}" in message
    assert "not trusted" in message and "ca_file" in message
    assert SECRET_VALUE not in full_text(info.value)
    # Control: the same store with the right CA works.
    store_for(moto, s3_bucket).put("k", b"x")


def test_ca_bundle_environment_variables_are_ignored(
    moto: MotoServer, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The environment points at the CA that would make the connection succeed...
    monkeypatch.setenv("AWS_CA_BUNDLE", str(moto.ca_file))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(moto.ca_file))
    other_ca = make_ca(tmp_path / "other-ca", name="some-other-ca")
    # ...but only the configured CA file (or the system store) is trusted.
    with pytest.raises(TLSTrustError):
        store_for(moto, s3_bucket, ca_file=other_ca.cert_file).check_access()
    with pytest.raises(TLSTrustError):
        store_for(moto, s3_bucket, ca_file=None).check_access()


def test_certificate_for_another_host_is_refused(
    test_ca: ca_harness.TestCA, wrong_name_server: TLSServer
) -> None:
    store = S3ObjectStore(
        "bucket-a",
        region="eu-central-1",
        endpoint_url=wrong_name_server.url,
        ca_file=test_ca.cert_file,
        access_key_id=Secret("AKIAEXAMPLEEXAMPLE00"),
        secret_access_key=Secret(SECRET_VALUE),
    )
    with pytest.raises(TLSTrustError) as info:
        store.check_access()
    assert "host name" in str(info.value)
    assert f"127.0.0.1:{wrong_name_server.port}" in str(info.value)


# -------------------------------------------------------------------- TLS minimum


def test_the_old_server_really_speaks_only_tls_1_1(
    test_ca: ca_harness.TestCA, tls11_server: TLSServer
) -> None:
    with socket.create_connection(("127.0.0.1", tls11_server.port), timeout=5) as raw:
        ctx = legacy_client_context(test_ca.cert_file)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.1"
    modern = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    modern.minimum_version = ssl.TLSVersion.TLSv1_2
    modern.load_verify_locations(cafile=str(test_ca.cert_file))
    with (
        socket.create_connection(("127.0.0.1", tls11_server.port), timeout=5) as raw,
        pytest.raises(ssl.SSLError),
    ):
        modern.wrap_socket(raw, server_hostname="127.0.0.1")


def test_store_refuses_a_tls_1_1_server(
    test_ca: ca_harness.TestCA, tls11_server: TLSServer
) -> None:
    store = S3ObjectStore(
        "bucket-a",
        region="eu-central-1",
        endpoint_url=tls11_server.url,
        ca_file=test_ca.cert_file,
        access_key_id=Secret("AKIAEXAMPLEEXAMPLE00"),
        secret_access_key=Secret(SECRET_VALUE),
    )
    with pytest.raises(TLSTrustError) as info:
        store.check_access()
    assert "older than 1.2" in str(info.value)
    assert f"127.0.0.1:{tls11_server.port}" in str(info.value)


@pytest.mark.usefixtures("permissive_botocore")
def test_floor_holds_even_when_botocore_would_accept_tls_1_1(
    test_ca: ca_harness.TestCA, tls11_server: TLSServer
) -> None:
    # Control: a plain botocore client, built under the same weakened defaults, does
    # complete a request over TLS 1.1 to this server. So the refusal below is ours.
    before = len(tls11_server.handshakes)
    plain = boto3.session.Session(
        aws_access_key_id="AKIAEXAMPLEEXAMPLE00", aws_secret_access_key=SECRET_VALUE
    ).client(
        "s3",
        region_name="eu-central-1",
        endpoint_url=tls11_server.url,
        verify=str(test_ca.cert_file),
        config=Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"}),
    )
    plain.head_bucket(Bucket="bucket-a")
    assert tls11_server.handshakes[before:] == ["TLSv1.1"]

    store = S3ObjectStore(
        "bucket-a",
        region="eu-central-1",
        endpoint_url=tls11_server.url,
        ca_file=test_ca.cert_file,
        access_key_id=Secret("AKIAEXAMPLEEXAMPLE00"),
        secret_access_key=Secret(SECRET_VALUE),
    )
    assert tls_minimum_of(store._client) == ssl.TLSVersion.TLSv1_2
    # Contexts botocore builds later (e.g. for a proxy) get the floor as well.
    later = store._client._endpoint.http_session._get_ssl_context()
    assert later.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(TLSTrustError, match=r"older than 1\.2"):
        store.check_access()
    assert tls11_server.handshakes[before + 1 :] == []


def test_enforcement_fails_closed_on_an_unknown_http_layer() -> None:
    class NotBotocore:
        pass

    with pytest.raises(ConfigError, match=r"TLS 1\.2"):
        enforce_tls_minimum(NotBotocore())


# ---------------------------------------------------------------- server-side encryption


@pytest.mark.parametrize(
    ("sse", "kms_key_id"),
    [("AES256", None), ("aws:kms", None), ("aws:kms", "alias/connector-staging")],
)
def test_every_stored_object_is_server_side_encrypted(
    moto: MotoServer, s3_bucket: str, sse: str, kms_key_id: str | None
) -> None:
    store = store_for(moto, s3_bucket, sse=sse, kms_key_id=kms_key_id)
    store.put("small", b"tiny")
    store.put("large", b"\x01" * (11 * MiB))  # multipart
    raw = moto.boto3_client()
    keys = [o["Key"] for o in raw.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["staging/large", "staging/small"]
    for key in keys:
        head = raw.head_object(Bucket=s3_bucket, Key=key)
        assert head.get("ServerSideEncryption") == sse, (key, head)
        if kms_key_id is not None:
            assert head.get("SSEKMSKeyId") == kms_key_id, (key, head)


# --------------------------------------------------------------- missing bucket


def test_missing_bucket_is_permanent_and_named(moto: MotoServer) -> None:
    store = store_for(moto, "no-such-bucket-here")
    for action in (lambda: store.put("k", b"x"), lambda: store.get("k"), store.check_access):
        with pytest.raises(PermanentError) as info:
            action()
        assert not isinstance(info.value, NotFoundError | AuthenticationError)
        assert "no-such-bucket-here" in str(info.value)
        assert SECRET_VALUE not in full_text(info.value)


# ---------------------------------------------------------- credentials (moto enforces)


@dataclass(frozen=True)
class AuthMoto:
    server: MotoServer
    bucket: str
    allowed: dict[str, str]
    denied: dict[str, str]


@pytest.fixture(scope="module")
def auth_moto(
    test_ca: ca_harness.TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthMoto]:
    """A moto_server of our own that checks signatures and IAM permissions."""
    handle = start_moto(test_ca, tmp_path_factory.mktemp("moto-auth"), name="moto-auth")
    try:
        server = handle.server
        bucket = "auth-bucket"
        server.boto3_client().create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": server.region}
        )
        iam = server.boto3_client("iam")
        iam.create_user(UserName="writer")
        iam.put_user_policy(
            UserName="writer",
            PolicyName="staging",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        allowed = iam.create_access_key(UserName="writer")["AccessKey"]
        iam.create_user(UserName="nobody")
        denied = iam.create_access_key(UserName="nobody")["AccessKey"]
        server.require_authentication(0)
        yield AuthMoto(
            server=server,
            bucket=bucket,
            allowed={"id": allowed["AccessKeyId"], "secret": allowed["SecretAccessKey"]},
            denied={"id": denied["AccessKeyId"], "secret": denied["SecretAccessKey"]},
        )
    finally:
        handle.stop()


def _auth_store(auth: AuthMoto, key_id: str, secret: str) -> S3ObjectStore:
    return store_for(
        auth.server,
        auth.bucket,
        access_key_id=Secret(key_id),
        secret_access_key=Secret(secret),
    )


def test_valid_credentials_work_on_the_authenticating_server(auth_moto: AuthMoto) -> None:
    store = _auth_store(auth_moto, auth_moto.allowed["id"], auth_moto.allowed["secret"])
    store.check_access()
    store.put("ok", b"1")
    assert store.get("ok") == b"1"


@pytest.mark.parametrize("case", ["wrong-secret", "unknown-key", "no-permission"])
def test_refused_credentials_are_authentication_errors(auth_moto: AuthMoto, case: str) -> None:
    if case == "wrong-secret":
        key_id, secret, code = auth_moto.allowed["id"], SECRET_VALUE, "SignatureDoesNotMatch"
    elif case == "unknown-key":
        key_id, secret, code = "AKIAUNKNOWNUNKNOWN00", SECRET_VALUE, "InvalidAccessKeyId"
    else:
        key_id, secret, code = auth_moto.denied["id"], auth_moto.denied["secret"], "AccessDenied"
    store = _auth_store(auth_moto, key_id, secret)
    with pytest.raises(AuthenticationError) as info:
        store.put("k", b"x")
    assert code in str(info.value)
    assert "check the access key" in str(info.value)
    with pytest.raises(AuthenticationError) as head_info:
        store.check_access()
    assert auth_moto.bucket in str(head_info.value)
    for exc in (info.value, head_info.value):
        assert secret not in full_text(exc)


# ----------------------------------------------------------- faults: 5xx, throttling


class _Body:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


def _error_response(status: int, code: str) -> AWSResponse:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>injected {code}</Message><RequestId>1</RequestId></Error>"
    ).encode()
    return AWSResponse("https://injected", status, {"Content-Type": "application/xml"}, _Body(body))


@pytest.mark.parametrize(
    ("operation", "status", "code"),
    [("PutObject", 503, "SlowDown"), ("GetObject", 500, "InternalError"), ("HeadObject", 503, "")],
)
def test_throttling_and_server_errors_are_transient(
    moto: MotoServer, s3_bucket: str, operation: str, status: int, code: str
) -> None:
    store = store_for(moto, s3_bucket)
    store.put("k", b"x")
    calls: list[str] = []

    def inject(request: Any, **_: Any) -> AWSResponse:
        calls.append(request.url)
        return _error_response(status, code)

    store._client.meta.events.register(f"before-send.s3.{operation}", inject)
    action: Callable[[], object] = {
        "PutObject": lambda: store.put("k", b"y"),
        "GetObject": lambda: store.get("k"),
        "HeadObject": lambda: store.stat("k"),
    }[operation]
    with pytest.raises(TransientError) as info:
        action()
    assert not isinstance(info.value, UnreachableError)
    assert len(calls) == 1  # retries belong to the retry decorator, not the SDK
    assert SECRET_VALUE not in full_text(info.value)


# ------------------------------------------------------------------- multipart abort


def test_a_failed_part_aborts_the_multipart_upload(moto: MotoServer, s3_bucket: str) -> None:
    store = store_for(moto, s3_bucket)
    upload_ids: list[str] = []
    parts_sent: list[int] = []

    def remember_upload(parsed: dict[str, Any], **_: Any) -> None:
        upload_ids.append(parsed["UploadId"])

    def fail_second_part(request: Any, **_: Any) -> AWSResponse | None:
        parts_sent.append(1)
        return _error_response(500, "InternalError") if len(parts_sent) == 2 else None

    events = store._client.meta.events
    events.register("after-call.s3.CreateMultipartUpload", remember_upload)
    events.register("before-send.s3.UploadPart", fail_second_part)

    with pytest.raises(TransientError):
        store.put("big", b"\x02" * (11 * MiB))

    assert len(upload_ids) == 1 and len(parts_sent) == 2
    raw = moto.boto3_client()
    with pytest.raises(ClientError) as gone:
        raw.list_parts(Bucket=s3_bucket, Key="staging/big", UploadId=upload_ids[0])
    assert gone.value.response["Error"]["Code"] == "NoSuchUpload"
    assert raw.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert store.stat("big") is None


def test_a_failed_abort_does_not_hide_the_original_error(moto: MotoServer, s3_bucket: str) -> None:
    store = store_for(moto, s3_bucket)
    events = store._client.meta.events
    events.register("before-send.s3.UploadPart", lambda **_: _error_response(503, "SlowDown"))
    events.register(
        "before-send.s3.AbortMultipartUpload", lambda **_: _error_response(500, "InternalError")
    )
    with pytest.raises(TransientError, match="SlowDown"):
        store.put("big", b"\x03" * (7 * MiB))
    raw = moto.boto3_client()
    assert len(raw.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])) == 1

    # Startup recovery removes what the crashed or failed abort left behind.
    cleaner = store_for(moto, s3_bucket)
    # (moto reports every upload as initiated in 2010, so the age filter is not tested here.)
    assert cleaner.abort_incomplete_uploads(older_than=dt.timedelta(0)) == 1
    assert raw.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
