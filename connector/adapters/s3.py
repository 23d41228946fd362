"""ObjectStore on Amazon S3 (or an S3-compatible HTTPS endpoint) through boto3.

Transport rules, applied to every client this module builds (`make_aws_client`):
- HTTPS only: a plain-HTTP endpoint is refused.
- Trust is passed explicitly (`verify=`): the configured CA file, or the system
  bundle compiled into OpenSSL (certifi as a fallback). The REQUESTS_CA_BUNDLE /
  AWS_CA_BUNDLE variables and endpoint URLs from the environment or config files
  are never consulted.
- TLS 1.2 is the minimum. botocore has no setting for it, so `enforce_tls_minimum`
  raises the floor of the SSLContext inside the client's urllib3 pool manager
  (botocore builds one context per client in `URLLib3Session._get_ssl_context`
  and hands it to the PoolManager, which uses it for every connection) and
  replaces that factory on the session instance, so contexts built later (proxy
  managers) get the same floor. If botocore's internals ever change shape, the
  client is refused (ConfigError) rather than used without the floor.

Retries are not done here: every client makes one attempt (botocore's own
retries are off, `max_attempts=1`). This adapter only says what kind of
failure it met, mapping each botocore error to a class of `connector.errors`
(`_map_error`): 5xx, throttling, timeouts and dropped connections are
`TransientError` (`UnreachableError` when the endpoint cannot be reached),
403s and missing credentials `AuthenticationError`, a refused TLS certificate
`TLSTrustError`, a missing object `NotFoundError`, the rest `PermanentError`.
The composition root (`connector.app.wrap_object_store`) stacks the retry
decorator (`connector.decorators.retry.RetryingStore`) around the five verbs,
and it decides from that class alone whether to try again. The methods beyond
the port (`check_access`, `probe_permissions`, `abort_upload`,
`abort_incomplete_uploads`) are called on this class directly, without retry:
they fail early and clearly, or are tried again by their caller (startup
recovery, the next sweep).
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import email.utils
import re
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ChecksumError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProxyConnectionError,
    SSLError,
)
from botocore.httpsession import URLLib3Session
from urllib3.util.ssl_match_hostname import CertificateError as HostnameMismatch

from connector.domain.objectkeys import check_range, validate_key
from connector.errors import (
    AuthenticationError,
    ConfigError,
    ConnectorError,
    NotFoundError,
    PermanentError,
    TLSTrustError,
    TransientError,
    UnreachableError,
)
from connector.faults import crash_point
from connector.logging import get_logger, register_secret, scrub
from connector.network import Proxy
from connector.ports import UploadJournal
from connector.secrets import Secret
from connector.tls import client_context, describe_ssl_error, is_connection_drop, load_ca_file

log = get_logger(__name__)

MiB = 1024 * 1024
S3_MIN_PART_SIZE = 5 * MiB
S3_MAX_PARTS = 10_000
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
DEFAULT_PART_SIZE = 8 * MiB
SSE_ALGORITHMS = ("AES256", "aws:kms")
TLS_MINIMUM = ssl.TLSVersion.TLSv1_2

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)+$")

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "InvalidSecurity",
        "AccountProblem",
        "AllAccessDisabled",
        "UnrecognizedClientException",
        "403",
    }
)
_REGION_CODES = frozenset(
    {
        "AuthorizationHeaderMalformed",
        "PermanentRedirect",
        "IllegalLocationConstraintException",
        "301",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "TokenRefreshRequired",
        "OperationAborted",
        "429",
        "500",
        "502",
        "503",
        "504",
    }
)


# --------------------------------------------------------------------------- TLS


def system_ca_bundle() -> str:
    """The system's CA bundle as compiled into OpenSSL (never taken from the environment)."""
    compiled_in = ssl.get_default_verify_paths().openssl_cafile
    if compiled_in and Path(compiled_in).is_file():
        return compiled_in
    import certifi  # a botocore dependency; the fallback when OpenSSL has no bundle file

    bundle: str = certifi.where()
    return bundle


def _raise_floor(ctx: ssl.SSLContext, extra_ca_files: tuple[Path, ...] = ()) -> None:
    if ctx.minimum_version not in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx.minimum_version = TLS_MINIMUM
    if ctx.verify_mode != ssl.CERT_REQUIRED:
        ctx.verify_mode = ssl.CERT_REQUIRED
    for ca_file in extra_ca_files:
        load_ca_file(ctx, ca_file)


def enforce_tls_minimum(client: Any, extra_ca_files: tuple[Path, ...] = ()) -> None:
    """Make every connection of a botocore client refuse TLS older than 1.2.

    `extra_ca_files` are trusted in addition to `verify=` (the CA of a
    TLS-inspecting proxy). Raises ConfigError when the client's HTTP layer is
    not the one this was written for, so a botocore upgrade cannot silently
    drop the floor.
    """
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    if not isinstance(session, URLLib3Session):
        raise ConfigError(
            "cannot enforce TLS 1.2 as a minimum on this botocore version "
            f"(HTTP session is {type(session).__name__}); install a supported botocore"
        )
    factory = getattr(session, "_get_ssl_context", None)
    manager = getattr(session, "_manager", None)
    pool_kw = getattr(manager, "connection_pool_kw", None)
    if not callable(factory) or not isinstance(pool_kw, dict):
        raise ConfigError(
            "cannot enforce TLS 1.2 as a minimum on this botocore version "
            "(unexpected URLLib3Session layout); install a supported botocore"
        )

    def tls12_context() -> ssl.SSLContext:
        ctx = factory()
        if not isinstance(ctx, ssl.SSLContext):
            raise ConfigError("botocore built no SSLContext; cannot enforce TLS 1.2")
        _raise_floor(ctx, extra_ca_files)
        return ctx

    # Contexts botocore builds from now on (proxy managers are created lazily).
    setattr(session, "_get_ssl_context", tls12_context)  # noqa: B010 - instance override
    managers = [manager, *getattr(session, "_proxy_managers", {}).values()]
    for mgr in managers:
        kw = getattr(mgr, "connection_pool_kw", None)
        ctx = kw.get("ssl_context") if isinstance(kw, dict) else None
        if not isinstance(ctx, ssl.SSLContext):
            raise ConfigError(
                "cannot enforce TLS 1.2 as a minimum: botocore's pool manager has no SSLContext"
            )
        _raise_floor(ctx, extra_ca_files)


def tls_minimum_of(client: Any) -> ssl.TLSVersion:
    """The minimum TLS version of the context the client's connections use (for checks)."""
    ctx = client._endpoint.http_session._manager.connection_pool_kw["ssl_context"]
    version: ssl.TLSVersion = ctx.minimum_version
    return version


# ------------------------------------------------------------------ client factory


def validate_endpoint_url(endpoint_url: str) -> str:
    """Return the endpoint URL when it is a plain https://host[:port][/path], else ConfigError."""
    try:
        parts = urlsplit(endpoint_url)
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(f"endpoint_url is not a valid URL: {exc}") from exc
    if parts.username is not None or parts.password is not None:
        # Never echo the URL: it carries a secret.
        raise ConfigError(
            "endpoint_url must not carry credentials; give the keys as secrets (files, "
            "environment or systemd credentials)"
        )
    scheme = parts.scheme.lower()
    if scheme == "http":
        raise ConfigError(
            f"endpoint_url http://{parts.netloc} is plain HTTP, which is refused: "
            "use an https:// endpoint"
        )
    if scheme != "https" or not parts.hostname:
        raise ConfigError(f"endpoint_url must be an https:// URL with a host, got {endpoint_url!r}")
    if parts.query or parts.fragment:
        raise ConfigError("endpoint_url must not have a query or fragment")
    return endpoint_url


def make_aws_client(
    service: str,
    *,
    region: str,
    endpoint_url: str | None = None,
    ca_file: Path | None = None,
    access_key_id: Secret | None = None,
    secret_access_key: Secret | None = None,
    use_fips_endpoint: bool = False,
    max_pool_connections: int = 10,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    max_attempts: int = 1,
    proxy: Proxy | None = None,
    session_token: Secret | None = None,
) -> Any:
    """A boto3 client with explicit trust, TLS 1.2 minimum and no environment endpoints.

    `session_token`: with the keys, temporary credentials (from STS AssumeRole).

    Credentials: both keys, or neither (then boto3's default chain: environment,
    shared files, container or instance role).

    Proxy: only the one passed here (from the config's [network] section); the
    proxy variables of the environment are not read by botocore. Connections
    through it stay TLS end to end; a TLS-inspecting proxy's CA
    (`proxy.ca_file`) is trusted for them in addition to `ca_file`.
    """
    if not region or not _REGION_RE.match(region):
        raise ConfigError(f"region {region!r} is not an AWS region name (e.g. eu-central-1)")
    if endpoint_url is not None:
        validate_endpoint_url(endpoint_url)
        if use_fips_endpoint:
            raise ConfigError(
                "use_fips_endpoint applies to AWS's own endpoints; with endpoint_url set, "
                "point endpoint_url at a FIPS endpoint instead"
            )
    if ca_file is not None:
        ca_file = Path(ca_file)
        client_context(ca_file)  # ConfigError when missing or not PEM
    for name, value in (("access_key_id", access_key_id), ("secret_access_key", secret_access_key)):
        if value is not None and not isinstance(value, Secret):
            raise ConfigError(f"{name} must be given as a Secret")
    if (access_key_id is None) != (secret_access_key is None):
        raise ConfigError("give both access_key_id and secret_access_key, or neither")
    if max_pool_connections < 1:
        raise ConfigError("max_pool_connections must be at least 1")
    if connect_timeout <= 0 or read_timeout <= 0:
        raise ConfigError("connect and read timeouts must be positive")
    if max_attempts < 1:
        raise ConfigError("max_attempts must be at least 1")

    if proxy is not None and proxy.no_proxy:
        # The endpoint's host decides whether the proxy applies: resolve it first
        # (no network traffic), then build the client that is used.
        probe = _build_client(
            service, region, endpoint_url, ca_file, None, None, use_fips_endpoint, {}
        )
        host = urlsplit(probe.meta.endpoint_url).hostname or ""
        probe.close()
        if not proxy.applies_to(host):
            proxy = None
    options: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "max_pool_connections": max_pool_connections,
        "retries": {"mode": "standard", "total_max_attempts": max_attempts},
        # An explicit (possibly empty) mapping: botocore then ignores the environment.
        "proxies": {"https": proxy.url} if proxy is not None else {},
    }
    client = _build_client(
        service,
        region,
        endpoint_url,
        ca_file,
        access_key_id,
        secret_access_key,
        use_fips_endpoint,
        options,
        session_token,
    )
    extra = (proxy.ca_file,) if proxy is not None and proxy.ca_file is not None else ()
    enforce_tls_minimum(client, extra)
    return client


def _build_client(
    service: str,
    region: str,
    endpoint_url: str | None,
    ca_file: Path | None,
    access_key_id: Secret | None,
    secret_access_key: Secret | None,
    use_fips_endpoint: bool,
    extra_options: dict[str, Any],
    session_token: Secret | None = None,
) -> Any:
    session = boto3.session.Session(
        aws_access_key_id=access_key_id.reveal() if access_key_id else None,
        aws_secret_access_key=secret_access_key.reveal() if secret_access_key else None,
        aws_session_token=session_token.reveal() if session_token else None,
        region_name=region,
    )
    options: dict[str, Any] = {
        "region_name": region,
        "use_fips_endpoint": use_fips_endpoint,
        "ignore_configured_endpoint_urls": True,
        "tcp_keepalive": True,
        "user_agent_extra": "vm-replication-connector",
    }
    if service == "s3":
        options["signature_version"] = "s3v4"
        options["s3"] = {"addressing_style": "path" if endpoint_url else "auto"}
    for option in ("request_checksum_calculation", "response_checksum_validation"):
        if option in Config.OPTION_DEFAULTS:  # botocore >= 1.36
            options[option] = "when_supported"
    options.update(extra_options)
    return session.client(
        service,
        endpoint_url=endpoint_url,
        verify=str(ca_file) if ca_file is not None else system_ca_bundle(),
        config=Config(**options),
    )


# ---------------------------------------------------------------------- the store


@dataclass(frozen=True)
class PermissionProbe:
    """One request of `S3ObjectStore.probe_permissions` and what it showed."""

    request: str
    permissions: tuple[str, ...]  # the IAM actions the request needs
    status: str  # ok, denied, error, skipped
    message: str


class S3ObjectStore:
    """Objects under `prefix` in one bucket; every put is server-side encrypted."""

    def __init__(
        self,
        bucket: str,
        *,
        region: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        ca_file: Path | None = None,
        sse: str = "aws:kms",
        kms_key_id: str | None = None,
        access_key_id: Secret | None = None,
        secret_access_key: Secret | None = None,
        use_fips_endpoint: bool = False,
        max_pool_connections: int = 16,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_attempts: int = 1,
        multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
        multipart_part_size: int = DEFAULT_PART_SIZE,
        upload_journal: UploadJournal | None = None,
        proxy: Proxy | None = None,
    ) -> None:
        if not _BUCKET_RE.match(bucket or "") or ".." in bucket:
            raise ConfigError(f"bucket {bucket!r} is not a valid S3 bucket name")
        prefix = (prefix or "").strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except ValueError as exc:
                raise ConfigError(f"prefix: {exc}") from exc
        if sse not in SSE_ALGORITHMS:
            raise ConfigError(f"sse must be one of {', '.join(SSE_ALGORITHMS)}, got {sse!r}")
        if kms_key_id is not None and sse != "aws:kms":
            raise ConfigError("kms_key_id is only valid with sse = 'aws:kms'")
        if kms_key_id is not None and not kms_key_id.strip():
            raise ConfigError("kms_key_id is empty; omit it to use the bucket's default KMS key")
        if multipart_part_size < S3_MIN_PART_SIZE:
            raise ConfigError(f"multipart_part_size must be at least {S3_MIN_PART_SIZE} bytes")
        if multipart_threshold < multipart_part_size:
            raise ConfigError("multipart_threshold must not be below multipart_part_size")

        self._bucket = bucket
        self._prefix = f"{prefix}/" if prefix else ""
        self._sse = sse
        self._kms_key_id = kms_key_id
        self._threshold = multipart_threshold
        self._part_size = multipart_part_size
        self._journal = upload_journal
        # Multipart uploads a put of this process is using now: the sweep of leftovers
        # aborts only uploads outside this set (`uploads_in_use`).
        self._in_use: set[str] = set()
        self._in_use_lock = threading.Lock()
        for secret in (access_key_id, secret_access_key):
            if secret is not None:
                # Defence in depth: no message built here quotes a secret, but a
                # server's message might echo one; the one scrubber removes them.
                register_secret(secret)
        self._client = make_aws_client(
            "s3",
            region=region,
            endpoint_url=endpoint_url,
            ca_file=ca_file,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            use_fips_endpoint=use_fips_endpoint,
            max_pool_connections=max_pool_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            proxy=proxy,
        )
        self._endpoint: str = self._client.meta.endpoint_url

    def __repr__(self) -> str:
        return f"S3ObjectStore(s3://{self._bucket}/{self._prefix} at {self._endpoint})"

    @property
    def bucket(self) -> str:
        return self._bucket

    @property
    def endpoint_url(self) -> str:
        return self._endpoint

    def close(self) -> None:
        self._client.close()

    # -- the five verbs

    def put(self, key: str, data: bytes) -> None:
        full = self._full_key(key)
        if len(data) > self._threshold:
            self._put_multipart(key, full, data)
            return
        self._call(
            "put_object",
            key,
            Bucket=self._bucket,
            Key=full,
            Body=bytes(data),
            ChecksumAlgorithm="CRC32",
            **self._sse_args(),
        )

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        check_range(offset, length)
        full = self._full_key(key)
        if length == 0:
            if self.stat(key) is None:
                raise NotFoundError(f"object {self._where(full)} does not exist")
            return b""
        args: dict[str, Any] = {"Bucket": self._bucket, "Key": full}
        if length is not None:
            args["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset:
            args["Range"] = f"bytes={offset}-"
        try:
            resp = self._client.get_object(**args)
            body = resp["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
        except ClientError as exc:
            if _code(exc) == "InvalidRange":
                return b""  # the range starts at or after the end of the object
            raise self._map_error(exc, "get", key) from exc
        except BotoCoreError as exc:
            raise self._map_error(exc, "get", key) from exc
        return data

    def stat(self, key: str) -> int | None:
        full = self._full_key(key)
        try:
            resp = self._client.head_object(Bucket=self._bucket, Key=full)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND_CODES:
                return None
            raise self._map_error(exc, "stat", key) from exc
        except BotoCoreError as exc:
            raise self._map_error(exc, "stat", key) from exc
        size: int = resp["ContentLength"]
        return size

    def list(self, prefix: str) -> Iterator[str]:
        if prefix.startswith("/"):
            raise ValueError(f"list prefix {prefix!r} must be relative")
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        strip = len(self._prefix)
        try:
            for page in paginator.paginate(Bucket=self._bucket, Prefix=self._prefix + prefix):
                for obj in page.get("Contents", ()):
                    yield obj["Key"][strip:]
        except (ClientError, BotoCoreError) as exc:
            raise self._map_error(exc, "list", None) from exc

    def delete(self, key: str) -> None:
        full = self._full_key(key)
        try:
            self._client.delete_object(Bucket=self._bucket, Key=full)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND_CODES:
                return
            raise self._map_error(exc, "delete", key) from exc
        except BotoCoreError as exc:
            raise self._map_error(exc, "delete", key) from exc

    # -- beyond the port

    def check_access(self) -> None:
        """One cheap request (HeadBucket) so a misconfiguration fails early and clearly."""
        try:
            self._client.head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            code, status = _code(exc), _status(exc)
            if code in ("404", "NoSuchBucket", "NotFound") or status == 404:
                raise PermanentError(
                    f"bucket {self._bucket} does not exist at {self._endpoint}; "
                    "create it or correct the bucket name"
                ) from exc
            if code in ("403", "AccessDenied") or status == 403:
                raise AuthenticationError(
                    f"access to bucket {self._bucket} at {self._endpoint} was refused (HTTP 403): "
                    "check the access key and secret, and that the IAM policy allows "
                    "s3:ListBucket on the bucket"
                ) from exc
            if code in ("301", "400") or status in (301, 400):
                raise PermanentError(
                    f"bucket {self._bucket} is not reachable in this region at {self._endpoint} "
                    f"(HTTP {status}): check the region setting and the bucket name"
                ) from exc
            raise self._map_error(exc, "access check", None) from exc
        except BotoCoreError as exc:
            raise self._map_error(exc, "access check", None) from exc

    def probe_permissions(self) -> builtins.list[PermissionProbe]:
        """Harmless requests that show which IAM permissions the credentials lack.

        Under the prefix, one probe object (an opaque name) is written with the
        configured server-side encryption, read, checked for that encryption and
        deleted; one multipart upload is started and aborted. Each probe names the
        permission it needs; a denied one is reported, never raised.
        """
        probes: builtins.list[PermissionProbe] = []
        key = f"{self._prefix}connector-check/{uuid.uuid4().hex}"
        kms = ("kms:GenerateDataKey",) if self._sse == "aws:kms" else ()
        kms_read = ("kms:Decrypt",) if self._sse == "aws:kms" else ()

        def attempt(name: str, permissions: tuple[str, ...], call: Callable[[], Any]) -> Any | None:
            try:
                result = call()
            except ClientError as exc:
                code, status = _code(exc), _status(exc)
                message = scrub(exc.response.get("Error", {}).get("Message") or code)
                if code in _AUTH_CODES or status == 403 or code.startswith("KMS."):
                    probes.append(
                        PermissionProbe(name, permissions, "denied", f"{code}: {message}")
                    )
                else:
                    probes.append(PermissionProbe(name, permissions, "error", f"{code}: {message}"))
                return None
            except BotoCoreError as exc:
                error = self._map_error(exc, name, None)
                probes.append(PermissionProbe(name, permissions, "error", str(error)))
                return None
            probes.append(PermissionProbe(name, permissions, "ok", ""))
            return result if result is not None else True

        def skip(name: str, permissions: tuple[str, ...], why: str) -> None:
            probes.append(PermissionProbe(name, permissions, "skipped", why))

        client, bucket = self._client, self._bucket
        attempt("HeadBucket", ("s3:ListBucket",), lambda: client.head_bucket(Bucket=bucket))
        attempt(
            "ListObjectsV2",
            ("s3:ListBucket",),
            lambda: client.list_objects_v2(Bucket=bucket, Prefix=self._prefix, MaxKeys=1),
        )
        put = attempt(
            "PutObject",
            ("s3:PutObject", *kms),
            lambda: client.put_object(Bucket=bucket, Key=key, Body=b"check", **self._sse_args()),
        )
        if put is None:
            for name, perms in (
                ("GetObject", ("s3:GetObject", *kms_read)),
                ("DeleteObject", ("s3:DeleteObject",)),
            ):
                skip(name, perms, "no probe object (PutObject failed)")
        else:
            head = attempt(
                "HeadObject", ("s3:GetObject",), lambda: client.head_object(Bucket=bucket, Key=key)
            )
            if isinstance(head, dict) and head.get("ServerSideEncryption") != self._sse:
                probes.append(
                    PermissionProbe(
                        "ServerSideEncryption",
                        (),
                        "error",
                        f"the probe object reports encryption {head.get('ServerSideEncryption')!r}"
                        f", not {self._sse!r}",
                    )
                )
            attempt(
                "GetObject",
                ("s3:GetObject", *kms_read),
                lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read(),
            )
            attempt(
                "DeleteObject",
                ("s3:DeleteObject",),
                lambda: client.delete_object(Bucket=bucket, Key=key),
            )
        created = attempt(
            "CreateMultipartUpload",
            ("s3:PutObject", *kms),
            lambda: client.create_multipart_upload(Bucket=bucket, Key=key, **self._sse_args()),
        )
        if isinstance(created, dict):
            attempt(
                "AbortMultipartUpload",
                ("s3:AbortMultipartUpload",),
                lambda: client.abort_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=created["UploadId"]
                ),
            )
        else:
            skip("AbortMultipartUpload", ("s3:AbortMultipartUpload",), "no upload to abort")
        attempt(
            "ListMultipartUploads",
            ("s3:ListBucketMultipartUploads",),
            lambda: client.list_multipart_uploads(Bucket=bucket, Prefix=self._prefix),
        )
        return probes

    def default_encryption(self) -> builtins.list[str] | None:
        """The bucket's default encryption (GetBucketEncryption): its algorithms, or None.

        None means no default encryption is configured. Other failures raise the
        connector's error classes (403: AuthenticationError naming the permission).
        """
        try:
            resp = self._client.get_bucket_encryption(Bucket=self._bucket)
        except ClientError as exc:
            if _code(exc) == "ServerSideEncryptionConfigurationNotFoundError":
                return None
            if _code(exc) in _AUTH_CODES or _status(exc) == 403:
                raise AuthenticationError(
                    f"reading the default encryption of bucket {self._bucket} was refused "
                    "(HTTP 403); allow s3:GetEncryptionConfiguration on the bucket "
                    "(docs/permissions.md)"
                ) from exc
            raise self._map_error(exc, "read the default encryption of", None) from exc
        except BotoCoreError as exc:
            raise self._map_error(exc, "read the default encryption of", None) from exc
        rules = resp.get("ServerSideEncryptionConfiguration", {}).get("Rules", [])
        return [
            str(r["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"])
            for r in rules
            if r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm")
        ] or None

    def server_time(self) -> dt.datetime | None:
        """The time S3 says it is (the Date header of a HeadBucket answer), or None.

        A refused request answers with a Date too (a skewed clock is refused with
        RequestTimeTooSkewed), so it is read from error answers as well.
        """
        try:
            resp = self._client.head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            resp = exc.response
        except BotoCoreError as exc:
            raise self._map_error(exc, "check the clock against", None) from exc
        date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            return None
        try:
            return email.utils.parsedate_to_datetime(date).astimezone(dt.UTC)
        except (TypeError, ValueError):
            return None

    def uploads_in_use(self) -> frozenset[str]:
        """The ids of the multipart uploads that puts of this process are using now."""
        with self._in_use_lock:
            return frozenset(self._in_use)

    def abort_incomplete_uploads(
        self, older_than: dt.timedelta, keep: frozenset[str] = frozenset()
    ) -> int:
        """Abort multipart uploads under the prefix started more than `older_than` ago
        that no put of this process is using, and whose id is not in `keep` (in a fleet:
        the uploads that other connectors, alive, recorded as theirs).

        For startup recovery after a crash (a process kill skips the in-process abort),
        and for the daemon's sweep: an upload whose CreateMultipartUpload reply was lost
        never reached the ledger, and only this listing finds it. Returns how many were
        aborted.
        """
        cutoff = dt.datetime.now(dt.UTC) - older_than
        paginator = self._client.get_paginator("list_multipart_uploads")
        aborted = 0
        try:
            for page in paginator.paginate(Bucket=self._bucket, Prefix=self._prefix):
                in_use = self.uploads_in_use()
                for upload in page.get("Uploads", ()):
                    if upload["UploadId"] in keep:
                        continue
                    if upload["Initiated"] > cutoff or upload["UploadId"] in in_use:
                        continue
                    if self._abort_multipart(upload["Key"], upload["UploadId"]):
                        aborted += 1
        except (ClientError, BotoCoreError) as exc:
            raise self._map_error(exc, "list multipart uploads of", None) from exc
        return aborted

    # -- internals

    def _full_key(self, key: str) -> str:
        return self._prefix + validate_key(key)

    def _sse_args(self) -> dict[str, str]:
        args = {"ServerSideEncryption": self._sse}
        if self._kms_key_id is not None:
            args["SSEKMSKeyId"] = self._kms_key_id
        return args

    def _call(self, operation: str, key: str | None, **kwargs: Any) -> dict[str, Any]:
        try:
            result: dict[str, Any] = getattr(self._client, operation)(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._map_error(exc, operation.replace("_", " "), key) from exc
        return result

    def _put_multipart(self, key: str, full: str, data: bytes) -> None:
        size = len(data)
        part_size = max(self._part_size, -(-size // S3_MAX_PARTS))
        view = memoryview(data)
        with contextlib.ExitStack() as on_failure:
            created = self._call(
                "create_multipart_upload",
                key,
                Bucket=self._bucket,
                Key=full,
                ChecksumAlgorithm="CRC32",
                **self._sse_args(),
            )
            upload_id: str = created["UploadId"]
            # In use until the put is over, settled or not: the sweep leaves it alone.
            with self._in_use_lock:
                self._in_use.add(upload_id)
            on_failure.callback(self._release, upload_id)
            # Registered right where the upload exists: any failure below aborts it.
            on_failure.callback(self._abort_and_settle, key, full, upload_id)
            if self._journal is not None:
                # Durable before any part: a killed process leaves a record to abort.
                self._journal.upload_started(key, upload_id)
            parts: builtins.list[dict[str, Any]] = []
            for number, start in enumerate(range(0, size, part_size), start=1):
                resp = self._call(
                    "upload_part",
                    key,
                    Bucket=self._bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=bytes(view[start : start + part_size]),
                    ChecksumAlgorithm="CRC32",
                )
                part: dict[str, Any] = {"PartNumber": number, "ETag": resp["ETag"]}
                if resp.get("ChecksumCRC32"):
                    part["ChecksumCRC32"] = resp["ChecksumCRC32"]
                parts.append(part)
                crash_point("multipart-part")
            self._call(
                "complete_multipart_upload",
                key,
                Bucket=self._bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            on_failure.pop_all()  # completed: nothing to abort
        try:
            if self._journal is not None:
                self._journal.upload_ended(key, upload_id)
        finally:
            self._release(upload_id)

    def _release(self, upload_id: str) -> None:
        """The put is over with this upload (after its ledger record was settled, or
        left for the sweep): from now on the sweep may abort it."""
        with self._in_use_lock:
            self._in_use.discard(upload_id)

    def _abort_and_settle(self, key: str, full: str, upload_id: str) -> None:
        if self._abort_multipart(full, upload_id) and self._journal is not None:
            self._journal.upload_ended(key, upload_id)

    def abort_upload(self, key: str, upload_id: str) -> bool:
        """Abort one multipart upload of `key` (an upload that is already gone counts as
        aborted). False when S3 could not be asked; the caller tries again later."""
        return self._abort_multipart(self._full_key(key), upload_id)

    def _abort_multipart(self, full: str, upload_id: str) -> bool:
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=full, UploadId=upload_id)
        except ClientError as exc:
            if _code(exc) in ("NoSuchUpload", "404") or _status(exc) == 404:
                log.info("s3.multipart_already_gone", bucket=self._bucket, key=full)
                return True
            log.warning(
                "s3.multipart_abort_failed",
                bucket=self._bucket,
                key=full,
                upload_id=upload_id,
                error=scrub(str(exc)),
            )
            return False
        except BotoCoreError as exc:
            # The original failure is what the caller must see; the bucket's lifecycle
            # rule (AbortIncompleteMultipartUpload) or abort_incomplete_uploads() will
            # remove this one.
            log.warning(
                "s3.multipart_abort_failed",
                bucket=self._bucket,
                key=full,
                upload_id=upload_id,
                error=scrub(str(exc)),
            )
            return False
        log.info("s3.multipart_aborted", bucket=self._bucket, key=full, upload_id=upload_id)
        return True

    def _where(self, full: str | None) -> str:
        if full is None:
            return f"s3://{self._bucket}/{self._prefix}"
        return f"s3://{self._bucket}/{full}"

    def _map_error(self, exc: BaseException, operation: str, key: str | None) -> ConnectorError:
        where = self._where(self._prefix + key if key is not None else None)
        error = _map_error(exc, operation, where, self._bucket, self._endpoint, self._kms_key_id)
        scrubbed = scrub(str(error))
        if scrubbed != str(error):
            error = type(error)(scrubbed)
        return error


# --------------------------------------------------------------- error mapping


def _code(exc: ClientError) -> str:
    code: str = exc.response.get("Error", {}).get("Code", "") or ""
    return code


def _status(exc: ClientError) -> int:
    status: int = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
    return status


def _find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The innermost exception of type `kind` behind a botocore/urllib3 exception, if any."""
    seen: set[int] = set()
    todo: builtins.list[BaseException] = [exc]
    found: BaseException | None = None
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, kind):
            found = cur
        kwargs = getattr(cur, "kwargs", None)
        inner = kwargs.get("error") if isinstance(kwargs, dict) else None
        candidates = [inner, cur.__cause__, cur.__context__, *cur.args]
        todo.extend(c for c in candidates if isinstance(c, BaseException))
    return found


def _map_error(
    exc: BaseException,
    operation: str,
    where: str,
    bucket: str,
    endpoint: str,
    kms_key_id: str | None,
) -> ConnectorError:
    host = urlsplit(endpoint).netloc or endpoint
    if isinstance(exc, ClientError):
        code, status = _code(exc), _status(exc)
        message = exc.response.get("Error", {}).get("Message") or ""
        detail = f"{code or status}" + (f": {message}" if message else "")
        if code == "NoSuchBucket":
            return PermanentError(
                f"bucket {bucket} does not exist at {endpoint}; "
                "create it or correct the bucket name"
            )
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFoundError(f"object {where} does not exist ({operation}: {detail})")
        if "Throttl" in code or code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return TransientError(f"S3 {operation} of {where} failed, try again later ({detail})")
        if code.startswith("KMS.") or code == "KMSKeyNotAccessible":
            return PermanentError(
                f"S3 {operation} of {where} failed because of the KMS key "
                f"{kms_key_id or '(bucket default)'} ({detail}); check that it exists, is "
                "enabled, and that the key policy lets these credentials use it"
            )
        # S3 answers a skewed clock with 403: before the credentials' check
        if code == "RequestTimeTooSkewed":
            return PermanentError(
                f"S3 refused {operation} of {where} ({detail}): this machine's clock is wrong; "
                "enable time synchronisation (NTP)"
            )
        if code in _AUTH_CODES or status == 403:
            return AuthenticationError(
                f"S3 refused {operation} of {where} ({detail}); check the access key id and "
                "secret, and that the IAM policy allows this action on the bucket"
            )
        if code in _REGION_CODES or status == 301:
            return PermanentError(
                f"S3 {operation} of {where} failed ({detail}); the bucket is in another region "
                "than the one configured: check the region setting"
            )
        return PermanentError(f"S3 {operation} of {where} failed ({detail})")

    if isinstance(exc, BotoCoreError):
        # urllib3 checks host names itself (botocore turns OpenSSL's check off).
        mismatch = _find_cause(exc, HostnameMismatch)
        if mismatch is not None:
            return TLSTrustError(
                f"the certificate of the S3 endpoint {host} is not valid for that host name "
                f"({mismatch}); connect with the name the certificate was issued for"
            )
        tls_error = _find_cause(exc, ssl.SSLError)
        if tls_error is not None and is_connection_drop(tls_error):
            return TransientError(
                f"S3 {operation} of {where} at {endpoint}: the connection was dropped "
                f"({tls_error}); try again later"
            )
        if tls_error is not None or isinstance(exc, SSLError):
            return TLSTrustError(describe_ssl_error(f"the S3 endpoint {host}", tls_error or exc))
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ProxyConnectionError):
        reason = getattr(exc, "kwargs", {}).get("error", exc)
        return UnreachableError(
            f"cannot reach the S3 endpoint {endpoint} ({reason}); check the endpoint URL and "
            "region, DNS resolution, the firewall, and any HTTPS proxy between here and there"
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return AuthenticationError(
            f"no usable AWS credentials for S3 {operation} of {where} ({exc}); give "
            "access_key_id and secret_access_key, or run with an instance or container role"
        )
    if isinstance(exc, FlexibleChecksumError | ChecksumError):
        return TransientError(f"S3 {operation} of {where}: checksum mismatch in transfer ({exc})")
    if isinstance(exc, HTTPClientError | IncompleteReadError):
        return TransientError(
            f"S3 {operation} of {where} at {endpoint} was interrupted ({exc}); try again later"
        )
    return PermanentError(f"S3 {operation} of {where} failed: {exc}")
