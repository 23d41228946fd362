"""[fleet]: the database URL never carries a password; the password comes from a file,
a systemd credential or the environment; TLS is verified to a server not on this
machine; the password never shows in an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.app import database_connect_args
from connector.config import load_config
from connector.errors import ConfigError

SECRET = "db-Pa55word-fleet-0123456789"
BASE = """
[vcenter]
url = "https://vc.example/sdk"
user = "svc@vsphere.local"
password_env = "VC_PASSWORD"

[s3]
bucket = "staging-bucket"

[state]
path = "state/state.db"

[fleet]
{fleet}
"""


def write(tmp_path: Path, fleet: str) -> Path:
    cfg = tmp_path / "connector.toml"
    cfg.write_text(BASE.format(fleet=fleet))
    return cfg


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def test_a_password_in_the_url_is_refused_and_never_echoed(tmp_path: Path) -> None:
    cfg = write(tmp_path, f'database_url = "postgresql://connector:{SECRET}@db.example/fleet"')
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "must not carry a password" in str(err.value)
    assert "password_file" in str(err.value)
    assert SECRET not in str(err.value)


def test_a_password_in_the_query_is_refused(tmp_path: Path) -> None:
    cfg = write(
        tmp_path, f'database_url = "postgresql://connector@db.example/fleet?password={SECRET}"'
    )
    with pytest.raises(ConfigError, match="must not carry a password") as err:
        load_config(cfg)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("mysql://u@db.example/fleet", "must be a postgresql:// URL"),
        ("postgresql://u@db.example/", "names no database"),
        ("postgresql://db.example/fleet", "names no user"),
        ("postgresql://u@db.example:99999/fleet", "(?i)port out of range"),
    ],
)
def test_a_bad_url_says_what_is_wrong(tmp_path: Path, url: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_config(write(tmp_path, f'database_url = "{url}"'))


def test_weak_tls_to_a_remote_server_is_refused(tmp_path: Path) -> None:
    cfg = write(tmp_path, 'database_url = "postgresql://u@db.example/fleet?sslmode=require"')
    with pytest.raises(ConfigError, match="TLS is verified"):
        load_config(cfg)


def test_a_short_lease_is_refused(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        'database_url = "postgresql://u@db.example/fleet"\nheartbeat_interval = 5\n'
        "lease_timeout = 6",
    )
    with pytest.raises(ConfigError, match="at least twice heartbeat_interval"):
        load_config(cfg)


def test_the_password_comes_from_a_file_and_tls_is_verified_to_a_remote_server(
    tmp_path: Path,
) -> None:
    (tmp_path / "db-password").write_text(SECRET + "\n")
    cfg = load_config(
        write(
            tmp_path,
            'database_url = "postgresql://connector@db.example:5433/fleet"\n'
            'password_file = "db-password"\nca_file = "db-ca.pem"',
        )
    )
    args = database_connect_args(cfg)
    assert args["password"] == SECRET
    assert args["sslmode"] == "verify-full"
    assert args["sslrootcert"] == str(tmp_path / "db-ca.pem")
    assert cfg.fleet is not None and SECRET not in cfg.fleet.database_url
    assert SECRET not in repr(cfg)


def test_a_remote_server_without_a_ca_file_is_verified_against_the_system_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DB_PASSWORD", SECRET)
    cfg = load_config(
        write(
            tmp_path,
            'database_url = "postgresql://connector@db.example/fleet"\n'
            'password_env = "DB_PASSWORD"',
        )
    )
    args = database_connect_args(cfg)
    assert args["sslmode"] == "verify-full" and args["sslrootcert"] == "system"
    assert args["password"] == SECRET


def test_the_password_from_a_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db-password").write_text(SECRET)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_config(
        write(
            tmp_path,
            'database_url = "postgresql://connector@db.example/fleet"\n'
            'password_file = "credential:db-password"',
        )
    )
    assert database_connect_args(cfg)["password"] == SECRET


def test_a_missing_password_file_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            'database_url = "postgresql://connector@db.example/fleet"\npassword_file = "nope"',
        )
    )
    with pytest.raises(ConfigError, match=r"database password file .* does not exist"):
        database_connect_args(cfg)


def test_a_local_server_needs_no_tls(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, 'database_url = "postgresql://postgres@127.0.0.1/x"'))
    args = database_connect_args(cfg)
    assert "sslmode" not in args and "password" not in args
