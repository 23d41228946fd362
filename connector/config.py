"""The connector's one typed configuration, loaded from a TOML file and validated once."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from connector.errors import ConfigError
from connector.secrets import Secret, read_secret_file
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
    password_file: Path
    ca_file: Path | None = None
    thumbprint: str | None = None
    enable_cbt: bool = True

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
        return self


class S3Config(_Section):
    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.\-]+[a-z0-9]$")
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: str | None = None
    ca_file: Path | None = None
    sse: Literal["AES256", "aws:kms"] = "AES256"
    kms_key_id: str | None = None
    use_fips_endpoint: bool = False
    access_key_id: str | None = None
    secret_access_key_file: Path | None = None

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
        if (self.access_key_id is None) != (self.secret_access_key_file is None):
            raise ValueError(
                "[s3] access_key_id and secret_access_key_file go together (or leave both "
                "out to use the AWS default credential chain)"
            )
        if self.sse == "aws:kms" and not self.kms_key_id:
            raise ValueError("[s3] sse = 'aws:kms' needs kms_key_id")
        return self


class StateConfig(_Section):
    path: Path = Path("/var/lib/connector/state.db")


class StoreConfig(_Section):
    key_file: Path | None = None  # default: key.b64 beside the state database


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
    quiescent: bool = False  # nothing writes to the disks during a run: read them as they are
    snapshot_command: list[str] | None = Field(default=None, min_length=1)
    release_command: list[str] | None = Field(default=None, min_length=1)
    hook_timeout: float = Field(default=600.0, gt=0)
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


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_format: bool = Field(default=False, alias="json")


class Config(_Section):
    vcenter: VCenterConfig | None = None  # required by the datastore-https and vddk transports
    s3: S3Config
    state: StateConfig = StateConfig()
    store: StoreConfig = StoreConfig()
    transport: TransportConfig = TransportConfig()
    local: LocalConfig = LocalConfig()
    log: LogConfig = LogConfig()
    source: Path | None = Field(default=None, exclude=True)

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
        return self.store.key_file or self.state.path.parent / "store.key"

    def vcenter_password(self) -> Secret:
        return read_secret_file(self.require_vcenter().password_file, "vCenter password")

    def require_vcenter(self) -> VCenterConfig:
        if self.vcenter is None:
            raise ConfigError(
                f"this needs vCenter, but the config has no [vcenter] (transport "
                f"{self.transport.kind!r})"
            )
        return self.vcenter

    def s3_secret_key(self) -> Secret | None:
        if self.s3.secret_access_key_file is None:
            return None
        return read_secret_file(self.s3.secret_access_key_file, "S3 secret access key")


def config_path(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    env = os.environ.get("CONNECTOR_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


def load_config(path: Path) -> Config:
    """Load and validate; every problem is a ConfigError that names the file and the key."""
    if not path.is_file():
        raise ConfigError(
            f"config file {path} does not exist; pass --config or set CONNECTOR_CONFIG"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    base = path.parent
    _resolve_paths(raw, base)
    _resolve_nested_paths(raw, base)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigError(f"config file {path} is invalid: {problems}") from None
    return cfg.model_copy(update={"source": path})


_PATH_KEYS = {
    "vcenter": ("password_file", "ca_file"),
    "s3": ("ca_file", "secret_access_key_file"),
    "state": ("path",),
    "store": ("key_file",),
}


def _resolve_paths(raw: dict[str, object], base: Path) -> None:
    """Relative paths in the file are relative to the file's own folder."""
    for section, keys in _PATH_KEYS.items():
        sec = raw.get(section)
        if not isinstance(sec, dict):
            continue
        for key in keys:
            value = sec.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
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
