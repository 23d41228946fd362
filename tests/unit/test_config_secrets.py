"""Where secrets come from (files, systemd credentials, the environment), how
config refuses credentials in URLs, the proxy settings, and log redaction."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import sys
from pathlib import Path

import pytest
import structlog

from connector.app import App
from connector.config import load_config
from connector.errors import ConfigError
from connector.logging import configure, get_logger, register_secret
from connector.secrets import Secret

PASSWORD = "vc-Pa55word-unit-0123456789"
BASE = """
[vcenter]
url = "https://vc.example/sdk"
user = "svc@vsphere.local"
{vcenter}

[s3]
bucket = "staging-bucket"
region = "eu-central-1"
{s3}

[state]
path = "state/state.db"
{extra}
"""


def write(tmp_path: Path, vcenter: str = "", s3: str = "", extra: str = "") -> Path:
    cfg = tmp_path / "connector.toml"
    cfg.write_text(BASE.format(vcenter=vcenter, s3=s3, extra=extra))
    return cfg


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)


pytestmark = pytest.mark.usefixtures("no_proxy_env")


# ---------------------------------------------------------------- secret sources


def test_password_from_a_file_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "vc.password").write_text(PASSWORD + "\n")
    cfg = load_config(write(tmp_path, 'password_file = "vc.password"'))
    assert cfg.require_vcenter().password_file == tmp_path / "vc.password"
    assert cfg.vcenter_password() == Secret(PASSWORD)


def test_password_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "vcenter-password").write_text(PASSWORD)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_config(write(tmp_path, 'password_file = "credential:vcenter-password"'))
    assert cfg.vcenter_password().reveal() == PASSWORD


def test_a_relative_name_found_in_the_credentials_directory_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "vc.password").write_text(PASSWORD)
    (tmp_path / "vc.password").write_text("the-file-beside-the-config")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_config(write(tmp_path, 'password_file = "vc.password"'))
    assert cfg.vcenter_password().reveal() == PASSWORD
    # ...and without systemd, the same config reads the file beside it.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    cfg = load_config(write(tmp_path, 'password_file = "vc.password"'))
    assert cfg.vcenter_password().reveal() == "the-file-beside-the-config"


def test_a_missing_credential_says_how_to_load_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(write(tmp_path, 'password_file = "credential:vcenter-password"'))
    with pytest.raises(ConfigError, match=r"LoadCredential=vcenter-password"):
        cfg.vcenter_password()
    creds = tmp_path / "credentials"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with pytest.raises(ConfigError, match=r"not in \$CREDENTIALS_DIRECTORY"):
        cfg.vcenter_password()


def test_secrets_from_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(
        write(
            tmp_path,
            'password_env = "VCENTER_PASSWORD"',
            'access_key_id = "AKIAEXAMPLE"\nsecret_access_key_env = "S3_SECRET"',
        )
    )
    with pytest.raises(ConfigError, match="VCENTER_PASSWORD, which is not set"):
        cfg.vcenter_password()
    monkeypatch.setenv("VCENTER_PASSWORD", PASSWORD)
    monkeypatch.setenv("S3_SECRET", "s3-secret-from-env-0123")
    assert cfg.vcenter_password().reveal() == PASSWORD
    secret = cfg.s3_secret_key()
    assert secret is not None and secret.reveal() == "s3-secret-from-env-0123"
    monkeypatch.setenv("S3_SECRET", "")
    with pytest.raises(ConfigError, match="is empty"):
        cfg.s3_secret_key()


@pytest.mark.parametrize(
    ("vcenter", "message"),
    [
        ("", "exactly one of password_file"),
        ('password_file = "a"\npassword_env = "B"', "exactly one of password_file"),
    ],
)
def test_exactly_one_password_source(tmp_path: Path, vcenter: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, vcenter))


def test_store_key_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_text = base64.b64encode(b"k" * 32).decode()
    (tmp_path / "pw").write_text(PASSWORD)
    cfg = load_config(
        write(tmp_path, 'password_file = "pw"', extra='[store]\nkey_env = "CONNECTOR_STORE_KEY"')
    )
    monkeypatch.setenv("CONNECTOR_STORE_KEY", key_text)
    provider = App(cfg).key_provider(create=False)
    wrapped = provider.wrap(b"m" * 32, b"ctx")
    assert provider.unwrap(wrapped, b"ctx") == b"m" * 32
    monkeypatch.setenv("CONNECTOR_STORE_KEY", "not base64!")
    with pytest.raises(ConfigError) as info:
        App(cfg).key_provider(create=False)
    assert "$CONNECTOR_STORE_KEY is not base64" in str(info.value)
    assert "not base64!" not in str(info.value)


# ----------------------------------------------------------- credentials in URLs


@pytest.mark.parametrize(
    ("vcenter", "s3", "extra"),
    [
        ('url = "https://admin:Hunter2Secret@vc.example/sdk"', "", ""),
        ("", 'endpoint_url = "https://AKIA:Hunter2Secret@s3.example"', ""),
        ("", "", '[network]\nhttps_proxy = "http://u:Hunter2Secret@proxy.example:3128"'),
    ],
)
def test_urls_with_credentials_are_refused_at_load(
    tmp_path: Path, vcenter: str, s3: str, extra: str
) -> None:
    text = BASE.format(vcenter='password_file = "pw"', s3=s3, extra=extra)
    if vcenter:
        text = text.replace('url = "https://vc.example/sdk"', vcenter)
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "user name or password" in str(info.value) or "credentials" in str(info.value)
    assert "Hunter2Secret" not in str(info.value)


def test_proxy_from_the_config_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(write(tmp_path, 'password_file = "pw"'))
    assert cfg.proxy() is None
    monkeypatch.setenv("https_proxy", "http://env-proxy.example:3128")
    monkeypatch.setenv("no_proxy", "vc.example, .corp.example")
    proxy = cfg.proxy()
    assert proxy is not None and proxy.url == "http://env-proxy.example:3128"
    assert not proxy.applies_to("vc.example") and not proxy.applies_to("x.corp.example")
    assert proxy.applies_to("s3.eu-central-1.amazonaws.com")
    ca = tmp_path / "proxy-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    configured = load_config(
        write(
            tmp_path,
            'password_file = "pw"',
            extra='[network]\nhttps_proxy = "http://cfg-proxy.example:8080"\n'
            'no_proxy = ["10.0.0.0/8"]\nproxy_ca_file = "proxy-ca.pem"',
        )
    )
    proxy = configured.proxy()
    assert proxy is not None and proxy.url == "http://cfg-proxy.example:8080"
    assert proxy.ca_file == ca
    assert not proxy.applies_to("10.1.2.3") and proxy.applies_to("vc.example")


# ----------------------------------------------------------------------- logging


def test_redaction_covers_structlog_stdlib_and_tracebacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "redact-me-" + os.urandom(8).hex()
    register_secret(Secret(secret))
    stream = io.StringIO()
    original = sys.stderr
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        configure("debug", json=True, library_level="debug")
        get_logger("t").info("event", detail=f"has {secret} inside", password="plain-text-pw")
        get_logger("t").info("secret object", value=Secret("another-secret-value"))
        logging.getLogger("botocore.test").debug("library says %s", secret)
        try:
            raise RuntimeError(f"failed with {secret}")
        except RuntimeError:
            logging.getLogger("pyVmomi.test").exception("boom")
            get_logger("t").exception("boom2")
    finally:
        monkeypatch.setattr(sys, "stderr", original)
        configure("info")
        structlog.reset_defaults()
    text = stream.getvalue()
    assert secret not in text
    assert "plain-text-pw" not in text and "another-secret-value" not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert any(line.get("logger") == "botocore.test" for line in lines)
    assert any("RuntimeError" in str(line.get("exception", "")) for line in lines)
    assert text.count("**********") >= 5
