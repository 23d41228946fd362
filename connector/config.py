"""The connector's one typed configuration, loaded from a TOML file and validated once."""

from __future__ import annotations

import os
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
        if self.kms_key_id is not None and not self.kms_key_id.strip():
            raise ValueError("[store] kms_key_id is empty; give a KMS key id, ARN or alias")
        if self.kms_key_id is not None and self.key_file is not None:
            raise ValueError("[store] takes key_file or kms_key_id, not both")
        kms_only = (self.kms_region, self.kms_endpoint_url, self.kms_ca_file)
        if self.kms_key_id is None and any(v is not None for v in kms_only):
            raise ValueError("[store] kms_region, kms_endpoint_url and kms_ca_file need kms_key_id")
        return self


class RetentionConfig(_Section):
    # Runs to keep per VM when no per-VM setting exists (`connector retention`); 0 keeps all.
    keep: int = Field(default=0, ge=0)
    # A run lock older than this is reported as stale (`connector purge --break-stale-locks`).
    stale_lock_hours: float = Field(default=24.0, gt=0)


class TransportConfig(_Section):
    kind: Literal["datastore-https"] = "datastore-https"
    max_request: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024)


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_format: bool = Field(default=False, alias="json")


class Config(_Section):
    vcenter: VCenterConfig
    s3: S3Config
    state: StateConfig = StateConfig()
    store: StoreConfig = StoreConfig()
    transport: TransportConfig = TransportConfig()
    log: LogConfig = LogConfig()
    retention: RetentionConfig = RetentionConfig()
    source: Path | None = Field(default=None, exclude=True)

    @property
    def key_file(self) -> Path:
        return self.store.key_file or self.state.path.parent / "store.key"

    def vcenter_password(self) -> Secret:
        return read_secret_file(self.vcenter.password_file, "vCenter password")

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
    "store": ("key_file", "kms_ca_file"),
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
