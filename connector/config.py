"""The connector's one typed configuration, loaded from a TOML file and validated once."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from connector.domain.ids import MAX_KEEP
from connector.errors import ConfigError
from connector.network import Proxy, make_proxy, parse_proxy_url, split_no_proxy
from connector.secrets import (
    CREDENTIAL_PREFIX,
    Secret,
    is_credential,
    load_secret,
    read_secret_env,
    resolve_secret_path,
)
from connector.tls import normalize_thumbprint

DEFAULT_CONFIG = Path("/etc/connector/connector.toml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_userinfo(url: str, field_name: str) -> str:
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"{field_name} must not carry a user name or password; "
            "put the user in `user` and the password in a file"
        )
    if parts.scheme != "https":
        raise ValueError(f"{field_name} must be an https:// URL (plain HTTP is refused)")
    if not parts.hostname:
        raise ValueError(f"{field_name} has no host name")
    return url


class VCenterConfig(_Section):
    url: str
    user: str
    password_file: Path | None = None  # a file, or credential:NAME (systemd LoadCredential=)
    password_env: str | None = None  # or the name of an environment variable
    ca_file: Path | None = None
    thumbprint: str | None = None
    enable_cbt: StrictBool = True

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _no_userinfo(v, "[vcenter] url")

    @field_validator("thumbprint")
    @classmethod
    def _thumb(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            normalize_thumbprint(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _trust(self) -> VCenterConfig:
        if self.ca_file is not None and self.thumbprint is not None:
            raise ValueError("[vcenter] takes ca_file or thumbprint, not both")
        if (self.password_file is None) == (self.password_env is None):
            raise ValueError(
                "[vcenter] needs exactly one of password_file (a file or credential:NAME) "
                "and password_env (an environment variable name)"
            )
        return self


class S3Config(_Section):
    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.\-]+[a-z0-9]$")
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: str | None = None
    ca_file: Path | None = None
    sse: Literal["AES256", "aws:kms"] = "AES256"
    kms_key_id: str | None = None
    use_fips_endpoint: StrictBool = False
    access_key_id: str | None = None
    multipart_threshold: int = Field(default=64 * 1024 * 1024, ge=5 * 1024 * 1024)
    multipart_part_size: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    secret_access_key_file: Path | None = None  # a file, or credential:NAME
    secret_access_key_env: str | None = None  # or an environment variable name

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return None if v is None else _no_userinfo(v, "[s3] endpoint_url")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip("/")
        if ".." in v.split("/"):
            raise ValueError("[s3] prefix must not contain '..'")
        return v

    @model_validator(mode="after")
    def _keys(self) -> S3Config:
        if self.secret_access_key_file is not None and self.secret_access_key_env is not None:
            raise ValueError("[s3] takes secret_access_key_file or secret_access_key_env, not both")
        has_secret = (self.secret_access_key_file or self.secret_access_key_env) is not None
        if (self.access_key_id is None) == has_secret:
            raise ValueError(
                "[s3] access_key_id and secret_access_key_file (or secret_access_key_env) go "
                "together (or leave both out to use the AWS default credential chain)"
            )
        if self.sse == "aws:kms" and not self.kms_key_id:
            raise ValueError("[s3] sse = 'aws:kms' needs kms_key_id")
        if self.multipart_threshold < self.multipart_part_size:
            raise ValueError("[s3] multipart_threshold must not be below multipart_part_size")
        return self


class LandingConfig(_Section):
    """[landing]: where and how committed runs become EBS snapshots and AMIs
    (docs/landing.md). Region, endpoint and trust default to those of [s3], and the
    credentials are [s3]'s (or the role of a job's role name, assumed with them).
    The job fields (mode ... staging) are the defaults of a job that sets none."""

    region: str | None = None
    endpoint_url: str | None = None
    ca_file: Path | None = None
    ena_support: StrictBool = True
    concurrency: int = Field(default=8, ge=1, le=64)  # PutSnapshotBlock calls in flight
    snapshot_timeout_minutes: int = Field(default=60, ge=10, le=4320)
    wait_timeout: float = Field(default=3600.0, gt=0)  # seconds for a snapshot to complete
    mode: Literal["every", "on-demand", "never"] = "never"
    license_type: Literal["AWS", "BYOL"] = "BYOL"
    encrypted: StrictBool = True
    kms_key_id: str | None = None
    role_name: str | None = None
    keep_amis: int = Field(default=3, ge=1, le=100)
    staging: Literal["temporary", "replica"] = "temporary"

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        return None if v is None else _no_userinfo(v, "[landing] endpoint_url")


class StateConfig(_Section):
    path: Path = Path("/var/lib/connector/state.db")


StoreKind = Literal["s3", "local"]


class StoreConfig(_Section):
    """The replica store: where it lives ([s3], or a local directory) and its key."""

    # "s3": the bucket of [s3]; "local": the directory `path` (air-gapped staging,
    # restore drills), on a local disk or a mounted file system.
    kind: StoreKind = "s3"
    path: Path | None = None  # kind = "local" only
    key_file: Path | None = None  # default: store.key beside the state database
    key_env: str | None = None  # or the key's base64 text in an environment variable
    # AWS KMS instead of a key file: the master key is a KMS data key, stored wrapped.
    kms_key_id: str | None = None
    kms_region: str | None = None  # default: [s3] region
    kms_endpoint_url: str | None = None  # default: [s3] endpoint_url
    kms_ca_file: Path | None = None  # default: [s3] ca_file

    @field_validator("kms_endpoint_url")
    @classmethod
    def _kms_endpoint(cls, v: str | None) -> str | None:
        return None if v is None else _no_userinfo(v, "[store] kms_endpoint_url")

    @model_validator(mode="after")
    def _one_provider(self) -> StoreConfig:
        if self.kind == "local" and self.path is None:
            raise ValueError(
                "[store] kind = 'local' needs path, the directory that holds the replica store"
            )
        if self.kind == "s3" and self.path is not None:
            raise ValueError(
                "[store] path is used only with kind = 'local'; the 's3' store lives in the "
                "bucket of [s3]"
            )
        if self.key_file is not None and self.key_env is not None:
            raise ValueError("[store] takes key_file or key_env, not both")
        if self.kms_key_id is not None and not self.kms_key_id.strip():
            raise ValueError("[store] kms_key_id is empty; give a KMS key id, ARN or alias")
        if self.kms_key_id is not None and self.key_file is not None:
            raise ValueError("[store] takes key_file or kms_key_id, not both")
        if self.kms_key_id is not None and self.key_env is not None:
            raise ValueError("[store] takes key_env or kms_key_id, not both")
        kms_only = (self.kms_region, self.kms_endpoint_url, self.kms_ca_file)
        if self.kms_key_id is None and any(v is not None for v in kms_only):
            raise ValueError("[store] kms_region, kms_endpoint_url and kms_ca_file need kms_key_id")
        return self


class RetentionConfig(_Section):
    # Runs to keep per VM when no per-VM setting exists (`connector retention`); 0 keeps all.
    keep: int = Field(default=0, ge=0, le=MAX_KEEP)
    # A run lock older than this is reported as stale (`connector purge --break-stale-locks`).
    stale_lock_hours: float = Field(default=24.0, gt=0)


class NetworkConfig(_Section):
    """The corporate proxy. Unset: the https_proxy/no_proxy environment variables."""

    https_proxy: str | None = None  # http://proxy.example.com:3128 (CONNECT)
    no_proxy: list[str] | None = None  # hosts, .domains, IPs or CIDR networks
    proxy_ca_file: Path | None = None  # the CA of a TLS-inspecting proxy

    @field_validator("https_proxy")
    @classmethod
    def _proxy_url(cls, v: str | None) -> str | None:
        if v:
            try:
                parse_proxy_url(v, "[network] https_proxy")
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return v or None


class ApiConfig(_Section):
    """The connector's own HTTPS API (TLS 1.2+, bearer token)."""

    listen: str = "127.0.0.1:8443"
    cert_file: Path
    key_file: Path
    token_file: Path | None = None  # a file, or credential:NAME
    token_env: str | None = None
    # Seconds /readyz keeps a probe's result (vCenter login, S3 HeadBucket, queue).
    ready_cache_seconds: float = Field(default=10.0, gt=0, le=600)
    # Seconds each readiness probe of vCenter or S3 may take.
    ready_timeout_seconds: float = Field(default=3.0, gt=0, le=60)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("[api] listen must be host:port, e.g. 127.0.0.1:8443")
        return v

    @model_validator(mode="after")
    def _token(self) -> ApiConfig:
        if (self.token_file is None) == (self.token_env is None):
            raise ValueError("[api] needs exactly one of token_file and token_env")
        return self

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class AuditConfig(_Section):
    path: Path | None = None  # default: audit.jsonl beside the state database


TransportKind = Literal["datastore-https", "vddk", "nbd", "local"]
VddkTransportMode = Literal["file", "san", "hotadd", "nbdssl"]
_SHA1_THUMB_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){19}$")


class VddkConfig(_Section):
    """How nbdkit's vddk plugin reaches vCenter (see docs/transports.md)."""

    libdir: Path  # the unpacked VDDK distribution (holds lib64/libvixDiskLib.so.*)
    server: str | None = None  # default: the host of [vcenter] url
    port: int | None = Field(default=None, ge=1, le=65535)  # default: the port of that url
    thumbprint: str | None = None  # SHA-1; default: from vCenter's verified certificate
    transports: tuple[VddkTransportMode, ...] = Field(
        default=("file", "san", "hotadd", "nbdssl"), min_length=1
    )
    config_file: Path | None = None  # a VDDK config file (log levels, timeouts)
    nbdkit: str = "nbdkit"  # the nbdkit program
    start_timeout: float = Field(default=120.0, gt=0)

    @field_validator("transports", mode="before")
    @classmethod
    def _no_plain_nbd(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.split(":")
        if isinstance(v, list | tuple) and "nbd" in v:
            raise ValueError(
                "[transport.vddk] transports must not include plain 'nbd': it sends disk data "
                "unencrypted; use 'nbdssl'"
            )
        return v

    @field_validator("thumbprint")
    @classmethod
    def _sha1(cls, v: str | None) -> str | None:
        if v is not None and not _SHA1_THUMB_RE.match(v.strip()):
            raise ValueError(
                "[transport.vddk] thumbprint is the SHA-1 fingerprint VDDK expects: 20 hex "
                "pairs separated by colons (leave it out to take it from vCenter's verified "
                "certificate)"
            )
        return None if v is None else v.strip().upper()


class TransportConfig(_Section):
    kind: TransportKind = "datastore-https"
    max_request: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024)
    in_flight: int = Field(default=8, ge=1, le=64)  # NBD requests in flight (nbd, vddk)
    nbd_ca_file: Path | None = None  # CA bundle for nbds:// exports; default: system store
    vddk: VddkConfig | None = None


class LocalDiskConfig(_Section):
    key: int | None = Field(default=None, ge=0)  # default: 2000 + position
    label: str | None = None
    path: Path | None = None  # raw image or block device (transport "local")
    snapshot_path: Path | None = None  # read this while the snapshot exists
    nbd: str | None = None  # NBD URI (transport "nbd")

    @model_validator(mode="after")
    def _one_source(self) -> LocalDiskConfig:
        if (self.path is None) == (self.nbd is None):
            raise ValueError("a disk takes either path (a file or block device) or nbd (a URI)")
        if self.snapshot_path is not None and self.path is None:
            raise ValueError("snapshot_path goes with path, not with nbd")
        if self.nbd is not None:
            from connector.adapters.nbd import parse_nbd_uri

            try:
                parse_nbd_uri(self.nbd)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return self


class LocalVmConfig(_Section):
    name: str = Field(min_length=1)
    uuid: str | None = None  # default: derived from the name
    quiescent: StrictBool = False  # nothing writes to the disks during a run: read them as they are
    snapshot_command: list[str] | None = Field(default=None, min_length=1)
    release_command: list[str] | None = Field(default=None, min_length=1)
    hook_timeout: float = Field(default=600.0, gt=0)
    guest_id: str | None = (
        None  # e.g. "ubuntu64Guest", "arm-ubuntu64Guest": a landed AMI's architecture
    )
    firmware: Literal["bios", "efi"] | None = None  # a landed AMI's boot mode
    disks: list[LocalDiskConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> LocalVmConfig:
        if not self.quiescent and self.snapshot_command is None:
            raise ValueError(
                f"local VM {self.name!r} needs a snapshot_command, or quiescent = true when "
                "nothing writes to its disks during a run"
            )
        keys = self.disk_keys()
        if len(set(keys)) != len(keys):
            raise ValueError(f"local VM {self.name!r} has two disks with the same key")
        return self

    def disk_keys(self) -> list[int]:
        return [d.key if d.key is not None else 2000 + i for i, d in enumerate(self.disks)]


class LocalConfig(_Section):
    vms: list[LocalVmConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> LocalConfig:
        names = [vm.name for vm in self.vms]
        if len(set(names)) != len(names):
            raise ValueError("[local] has two VMs with the same name")
        uuids = [vm.uuid for vm in self.vms if vm.uuid]
        if len(set(uuids)) != len(uuids):
            raise ValueError("[local] has two VMs with the same uuid")
        return self


class BandwidthWindow(_Section):
    """A daily time-of-day window (local time) with its own upload limit."""

    start: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    end: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    limit: int = Field(ge=0)  # bytes per second; 0: unlimited in this window

    @model_validator(mode="after")
    def _span(self) -> BandwidthWindow:
        if self.start == self.end:
            raise ValueError("a bandwidth window needs different start and end times")
        return self


class DaemonConfig(_Section):
    """`connector run`: schedules, the job queue, limits and recovery."""

    discovery_interval: float = Field(default=300.0, ge=1.0)  # seconds between inventory polls
    sync_interval: float = Field(default=5.0, gt=0.0, le=300.0)  # job changes take effect within
    max_concurrent_runs: int = Field(default=4, ge=1, le=64)
    max_runs_per_host: int = Field(default=2, ge=1, le=64)
    max_disks_per_vm: int = Field(default=2, ge=1, le=32)
    bandwidth_limit: int = Field(default=0, ge=0)  # bytes per second for uploads; 0: unlimited
    bandwidth_windows: list[BandwidthWindow] = Field(default_factory=list)
    failures_before_pause: int = Field(default=5, ge=1, le=100)
    on_demand_quota_per_24h: int = Field(default=2, ge=1, le=1000)
    shutdown_deadline: float = Field(default=30.0, ge=0.0, le=3600.0)
    stage_retries: int = Field(default=5, ge=0, le=100)  # per stage, for transient errors
    retry_backoff: float = Field(default=10.0, ge=0.0)  # first retry delay, doubled each time
    retry_backoff_max: float = Field(default=600.0, ge=0.0)
    resume_within: float = Field(default=6 * 3600.0, ge=0.0)  # older interrupted runs roll back
    admission_interval: float = Field(default=5.0, gt=0.0)  # re-check of a run waiting a slot
    # A job's retention that could not be applied (purge guard busy, S3 down) is tried
    # again after this many seconds, doubled each time up to retry_backoff_max.
    retention_retry_backoff: float = Field(default=30.0, gt=0.0, le=3600.0)
    # The sweep of leftovers while the daemon runs: snapshots of runs that are over,
    # multipart uploads the connector started and no put owns any more.
    sweep_interval: float = Field(default=300.0, gt=0.0, le=86400.0)
    # Incomplete multipart uploads under the prefix that no put of this process owns
    # are aborted by the sweep once this old (their id may never have reached the
    # ledger: a lost CreateMultipartUpload reply). Well above a request's time out.
    stale_upload_age: float = Field(default=3600.0, gt=0.0, le=7 * 86400.0)
    # Testing aid: how many seconds one scheduling "hour" lasts. Leave at 3600.
    schedule_unit_seconds: float = Field(default=3600.0, gt=0.0)


_LOCAL_DB_HOSTS = {"localhost", "127.0.0.1", "::1"}
_WEAK_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca"}


class FleetConfig(_Section):
    """Fleet mode: the state and the job queue in one PostgreSQL, shared by N connectors.

    The URL names the server, port, database and user; the password comes from a
    file, a systemd credential or an environment variable, never from the URL. TLS
    to a server that is not on this machine is required and verified (the server's
    name against its certificate, from `ca_file` or the system's trust store).
    """

    database_url: str
    password_file: Path | None = None  # a file, or credential:NAME (systemd LoadCredential=)
    password_env: str | None = None  # or the name of an environment variable
    ca_file: Path | None = None  # the CA of the server's certificate; default: system store
    member_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
    # A member heartbeats every heartbeat_interval seconds; one silent for lease_timeout
    # is dead: its runs are taken over, its leadership passes to another member.
    heartbeat_interval: float = Field(default=5.0, gt=0.0, le=300.0)
    lease_timeout: float = Field(default=30.0, gt=0.0, le=3600.0)
    # Runs active at once across the whole fleet ([daemon] max_runs_per_host holds
    # fleet-wide per ESXi host).
    max_concurrent_runs: int = Field(default=16, ge=1, le=10000)
    connect_timeout: float = Field(default=10.0, gt=0.0, le=300.0)

    @field_validator("database_url")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            parts = urlsplit(v)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"[fleet] database_url cannot be read: {exc}") from None
        if parts.scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise ValueError(
                "[fleet] database_url must be a postgresql:// URL "
                "(postgresql://USER@HOST:PORT/DATABASE)"
            )
        if parts.password is not None:
            raise ValueError(
                "[fleet] database_url must not carry a password; remove it from the URL "
                "and put it in password_file (a file or credential:NAME) or password_env"
            )
        query = {k.lower() for k in _query_keys(parts.query)}
        if "password" in query or "passfile" in query:
            raise ValueError(
                "[fleet] database_url must not carry a password; use password_file or password_env"
            )
        if not parts.hostname:
            raise ValueError("[fleet] database_url has no host name")
        if not parts.path.strip("/"):
            raise ValueError("[fleet] database_url names no database (…/DATABASE at its end)")
        if not parts.username:
            raise ValueError("[fleet] database_url names no user (postgresql://USER@HOST/…)")
        if port is not None and not 0 < port < 65536:
            raise ValueError("[fleet] database_url has a port out of range")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FleetConfig:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("[fleet] takes password_file or password_env, not both")
        if self.lease_timeout < 2 * self.heartbeat_interval:
            raise ValueError(
                "[fleet] lease_timeout must be at least twice heartbeat_interval, or a "
                "member that is alive may be taken for dead"
            )
        if not self.is_local:
            mode = _query_value(urlsplit(self.database_url).query, "sslmode")
            if mode is not None and mode in _WEAK_SSLMODES:
                raise ValueError(
                    f"[fleet] database_url asks for sslmode={mode}, but the server "
                    f"{self.host} is not on this machine: TLS is verified "
                    "(verify-full); remove sslmode from the URL"
                )
        return self

    @property
    def host(self) -> str:
        return urlsplit(self.database_url).hostname or ""

    @property
    def is_local(self) -> bool:
        """Whether the server is on this machine (loopback): then TLS is not required."""
        return self.host in _LOCAL_DB_HOSTS or self.host.startswith("127.")

    def redacted_url(self) -> str:
        """The URL without its query (which may name files): for messages."""
        parts = urlsplit(self.database_url)
        return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _query_keys(query: str) -> list[str]:
    return [item.split("=", 1)[0] for item in query.split("&") if item]


def _query_value(query: str, key: str) -> str | None:
    for item in query.split("&"):
        k, _, v = item.partition("=")
        if k.lower() == key:
            return v
    return None


class RetryConfig(_Section):
    """How often a transient failure (a 5xx, throttling, a dropped connection, EIO) is
    tried again within one operation: S3 requests and disk reads. One policy for all."""

    attempts: int = Field(default=4, ge=1, le=20)  # tries in all, the first one included
    base_delay: float = Field(default=0.25, ge=0.0, le=60.0)  # seconds; doubled each time
    max_delay: float = Field(default=4.0, ge=0.0, le=600.0)  # seconds; the cap

    @model_validator(mode="after")
    def _delays(self) -> RetryConfig:
        if self.max_delay < self.base_delay:
            raise ValueError("[retry] max_delay must not be below base_delay")
        return self


class PipelineConfig(_Section):
    """How a run's transfer stage uses memory and cores (docs/architecture.md, "The
    transfer pipeline"). Memory per run is about
    disks x reads_in_flight x 2 x [transport] max_request
    + (uploads_in_flight + disks) x pack_size, whatever the size of the disks."""

    # Threads that hash, compress and encrypt blocks, shared by the disks of a run.
    workers: int = Field(default=2, ge=1, le=64)
    # Per disk: reads held between the reader and the packs (queued, being sealed,
    # waiting to be packed), each up to [transport] max_request bytes.
    reads_in_flight: int = Field(default=4, ge=1, le=64)
    # Per run: packs uploading at once, in the background of reading and sealing.
    uploads_in_flight: int = Field(default=2, ge=1, le=32)
    # A pack is closed and uploaded once it holds this many bytes (about).
    pack_size: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024, le=1024 * 1024 * 1024)
    # zstd level for blocks (bench/zstd_levels.py measured the default).
    zstd_level: int = Field(default=2, ge=-7, le=19)


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_format: StrictBool = Field(default=False, alias="json")
    # botocore, urllib3, pyVmomi...: their debug output is voluminous
    library_level: Literal["debug", "info", "warning", "error"] = "warning"


class Config(_Section):
    vcenter: VCenterConfig | None = None  # required by the datastore-https and vddk transports
    s3: S3Config | None = None  # required by [store] kind = "s3" (the default)
    state: StateConfig = StateConfig()
    store: StoreConfig = StoreConfig()
    transport: TransportConfig = TransportConfig()
    daemon: DaemonConfig = DaemonConfig()
    pipeline: PipelineConfig = PipelineConfig()
    local: LocalConfig = LocalConfig()
    log: LogConfig = LogConfig()
    retry: RetryConfig = RetryConfig()
    retention: RetentionConfig = RetentionConfig()
    network: NetworkConfig = NetworkConfig()
    landing: LandingConfig = LandingConfig()
    api: ApiConfig | None = None
    audit: AuditConfig = AuditConfig()
    fleet: FleetConfig | None = None  # PostgreSQL for state and queue; SQLite without it
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _store_fits(self) -> Config:
        st = self.store
        if st.kind == "s3" and self.s3 is None:
            raise ValueError(
                "the replica store is in S3 ([store] kind = 's3', the default): add [s3] with "
                "its bucket, or set [store] kind = 'local' and path for a local directory"
            )
        if st.kind == "local" and self.s3 is not None:
            raise ValueError(
                "[store] kind = 'local' keeps the replica store in a directory, so [s3] is not "
                "used: remove [s3], or set [store] kind = 's3'"
            )
        if st.kind == "local" and st.kms_key_id is not None and st.kms_region is None:
            raise ValueError(
                "[store] kms_key_id with kind = 'local' needs kms_region (there is no [s3] "
                "to take it from)"
            )
        return self

    @model_validator(mode="after")
    def _transport_fits(self) -> Config:
        kind = self.transport.kind
        if kind in ("datastore-https", "vddk"):
            if self.vcenter is None:
                raise ValueError(f"[transport] kind = {kind!r} reads from vCenter: add [vcenter]")
            if self.local.vms:
                raise ValueError(
                    "[local] vms are read only by the 'local' and 'nbd' transports; set "
                    "[transport] kind to one of them, or remove [local]"
                )
        if kind == "vddk" and self.transport.vddk is None:
            raise ValueError(
                "[transport] kind = 'vddk' needs [transport.vddk] with libdir (the unpacked "
                "VDDK); see docs/transports.md"
            )
        if kind != "vddk" and self.transport.vddk is not None:
            raise ValueError("[transport.vddk] is used only with [transport] kind = 'vddk'")
        if kind in ("local", "nbd"):
            if not self.local.vms:
                raise ValueError(
                    f"[transport] kind = {kind!r} reads the VMs of [local]; define at least "
                    "one [[local.vms]] with its [[local.vms.disks]]"
                )
            field_name = "path" if kind == "local" else "nbd"
            for vm in self.local.vms:
                for i, disk in enumerate(vm.disks):
                    if getattr(disk, field_name) is None:
                        raise ValueError(
                            f"local VM {vm.name!r} disk {i + 1}: [transport] kind = {kind!r} "
                            f"reads each disk from its {field_name!r}"
                        )
        return self

    @property
    def state_dir(self) -> Path:
        return self.state.path.parent

    @property
    def key_file(self) -> Path:
        if self.store.key_file is not None:
            return resolve_secret_path(self.store.key_file, "store key")
        return self.state.path.parent / "store.key"

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.state.path.parent / "audit.jsonl"

    def vcenter_password(self) -> Secret:
        vc = self.require_vcenter()
        return load_secret(vc.password_file, vc.password_env, "vCenter password")

    def require_vcenter(self) -> VCenterConfig:
        if self.vcenter is None:
            raise ConfigError(
                f"this needs vCenter, but the config has no [vcenter] (transport "
                f"{self.transport.kind!r})"
            )
        return self.vcenter

    def require_s3(self) -> S3Config:
        if self.s3 is None:
            raise ConfigError(
                f"this needs S3, but the config has no [s3] (the replica store is "
                f"[store] kind = {self.store.kind!r})"
            )
        return self.s3

    def s3_secret_key(self) -> Secret | None:
        s3 = self.s3
        if s3 is None:
            return None
        if s3.secret_access_key_file is None and s3.secret_access_key_env is None:
            return None
        return load_secret(
            s3.secret_access_key_file, s3.secret_access_key_env, "S3 secret access key"
        )

    def store_key_text(self) -> Secret | None:
        """The store key from the environment, when [store] key_env is set."""
        if self.store.key_env is None:
            return None
        return read_secret_env(self.store.key_env, "store key")

    def database_password(self) -> Secret | None:
        """The password of [fleet]'s database user; None when the server needs none."""
        f = self.fleet
        if f is None or (f.password_file is None and f.password_env is None):
            return None
        return load_secret(f.password_file, f.password_env, "database password")

    def api_token(self) -> Secret:
        if self.api is None:
            raise ConfigError("the [api] section is missing; see docs/security.md")
        return load_secret(self.api.token_file, self.api.token_env, "API token")

    def proxy(self) -> Proxy | None:
        """The proxy from [network], or from https_proxy/no_proxy in the environment."""
        net = self.network
        url = net.https_proxy
        no_proxy = net.no_proxy
        if url is None:
            url = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
            if url:
                parse_proxy_url(url, "the https_proxy environment variable")
        if no_proxy is None:
            no_proxy = split_no_proxy(
                os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""
            )
        return make_proxy(url, no_proxy, net.proxy_ca_file)


def config_path(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    env = os.environ.get("CONNECTOR_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def load_config(path: Path) -> Config:
    """Load and validate; every problem is a ConfigError that names the file and the key."""
    if path.is_dir():
        raise ConfigError(
            f"config file {path} is a folder, not a file; pass the path of the TOML file in it "
            f"(e.g. --config {path / 'connector.toml'})"
        )
    if not path.exists():
        raise ConfigError(
            f"config file {path} does not exist; pass --config or set CONNECTOR_CONFIG"
        )
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file; pass a TOML file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    base = path.parent
    _resolve_paths(raw, base)
    _resolve_nested_paths(raw, base)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {_problem(err)}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigError(f"config file {path} is invalid: {problems}") from None
    return cfg.model_copy(update={"source": path})


def _problem(err: ErrorDetails) -> str:
    """What is wrong with one setting, in words that say what to write instead."""
    if err["type"] == "bool_type":
        return "must be true or false (a TOML boolean, without quotes)"
    return err["msg"]


_PATH_KEYS = {
    "vcenter": ("password_file", "ca_file"),
    "s3": ("ca_file", "secret_access_key_file"),
    "state": ("path",),
    "store": ("path", "key_file", "kms_ca_file"),
    "network": ("proxy_ca_file",),
    "api": ("cert_file", "key_file", "token_file"),
    "audit": ("path",),
    "fleet": ("password_file", "ca_file"),
}
# Keys that name secrets: they may also be systemd credentials.
_SECRET_KEYS = {
    ("vcenter", "password_file"),
    ("s3", "secret_access_key_file"),
    ("store", "key_file"),
    ("api", "token_file"),
    ("api", "key_file"),
    ("fleet", "password_file"),
}


def _resolve_paths(raw: dict[str, object], base: Path) -> None:
    """Relative paths in the file are relative to the file's own folder.

    A secret given as `credential:NAME` is left for systemd's
    $CREDENTIALS_DIRECTORY; so is a relative secret file name that exists there.
    """
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    for section, keys in _PATH_KEYS.items():
        sec = raw.get(section)
        if not isinstance(sec, dict):
            continue
        for key in keys:
            value = sec.get(key)
            if not isinstance(value, str) or not value or os.path.isabs(value):
                continue
            if (section, key) in _SECRET_KEYS:
                if is_credential(value):
                    continue
                if cred_dir and (Path(cred_dir) / value).is_file():
                    sec[key] = CREDENTIAL_PREFIX + value
                    continue
            elif is_credential(value):
                raise ConfigError(
                    f"[{section}] {key} cannot be a systemd credential; give a file path"
                )
            sec[key] = str(base / value)


def _resolve_nested_paths(raw: dict[str, object], base: Path) -> None:
    """Relative paths in [transport.vddk] and [[local.vms.disks]], like the others."""

    def fix(section: object, keys: tuple[str, ...]) -> None:
        if not isinstance(section, dict):
            return
        for key in keys:
            value = section.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
                section[key] = str(base / value)

    transport = raw.get("transport")
    if isinstance(transport, dict):
        fix(transport, ("nbd_ca_file",))
        fix(transport.get("vddk"), ("libdir", "config_file"))
    local = raw.get("local")
    vms = local.get("vms") if isinstance(local, dict) else None
    for vm in vms if isinstance(vms, list) else []:
        disks = vm.get("disks") if isinstance(vm, dict) else None
        for disk in disks if isinstance(disks, list) else []:
            fix(disk, ("path", "snapshot_path"))
