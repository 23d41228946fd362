"""The pure parts of `connector init` (secret references, the vCenter URL, the
config text) and of the support bundle's redaction."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from connector.application.support import SupportBundle, redact_config, redact_environment
from connector.cli.init import (
    InitSettings,
    SecretRef,
    make_state_dir,
    parse_secret_ref,
    render_config,
    vcenter_url,
)
from connector.errors import InvalidInputError


def test_secret_references_take_three_forms() -> None:
    assert parse_secret_ref("env:VC_PASSWORD", "--x") == SecretRef("env", "VC_PASSWORD")
    assert parse_secret_ref("credential:vc", "--x") == SecretRef("credential", "vc")
    assert parse_secret_ref("file:/etc/c/pw", "--x") == SecretRef("file", "/etc/c/pw")


@pytest.mark.parametrize(
    "text", ["hunter2-the-password", "file:", "env:1BAD", "env:A-B", "credential:a/b", "ftp:x"]
)
def test_anything_else_is_refused_naming_the_option(text: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_secret_ref(text, "--vcenter-password")
    assert str(info.value).startswith("--vcenter-password")
    if ":" not in text:  # not a reference at all: perhaps the secret itself
        assert text not in str(info.value)


def test_a_bare_secret_never_shows_in_the_refusal() -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_secret_ref("S3cr3t-V4lue!", "--secret-key")
    assert "S3cr3t-V4lue!" not in str(info.value)
    assert "the value given is not shown" in str(info.value)


def test_vcenter_host_names_become_sdk_urls() -> None:
    assert vcenter_url("vc.example.com") == "https://vc.example.com/sdk"
    assert vcenter_url("https://vc.example.com:8443/") == "https://vc.example.com:8443/sdk"
    assert vcenter_url("https://vc.example.com/sdk") == "https://vc.example.com/sdk"
    for bad in ("http://vc.example.com", "https://user:pw@vc.example.com"):
        with pytest.raises(InvalidInputError):
            vcenter_url(bad)


def test_the_rendered_config_is_valid_toml_with_references_only(tmp_path: Path) -> None:
    text = render_config(
        InitSettings(
            vcenter="https://vc/sdk",
            user='svc"quoted',
            password=SecretRef("credential", "vcenter-password"),
            bucket="b-1",
            region="eu-central-1",
            state_dir=tmp_path,
            thumbprint="AB:CD",
            access_key_id="AKIA1",
            secret_key=SecretRef("env", "S3_SECRET"),
        )
    )
    doc = tomllib.loads(text)
    assert doc["vcenter"]["user"] == 'svc"quoted'
    assert doc["vcenter"]["password_file"] == "credential:vcenter-password"
    assert doc["vcenter"]["thumbprint"] == "AB:CD"
    assert doc["s3"]["secret_access_key_env"] == "S3_SECRET"
    assert doc["state"]["path"] == str(tmp_path / "state.db")


def test_the_state_folder_is_made_private(tmp_path: Path) -> None:
    assert make_state_dir(tmp_path / "new") == "created, mode 0700"
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "open").chmod(0o755)
    assert make_state_dir(tmp_path / "open") == "existed with mode 0755, now 0700"
    (tmp_path / "file").write_text("")
    with pytest.raises(InvalidInputError, match="is not a folder"):
        make_state_dir(tmp_path / "file")


def test_config_redaction_keeps_references_and_drops_values() -> None:
    redacted = redact_config(
        {
            "s3": {"access_key_id": "AKIA", "secret_access_key_file": "/s", "bucket": "b"},
            "api": {"token_env": "TOKEN", "password": "x"},
            "n": 3,
        }
    )
    assert redacted == {
        "s3": {"access_key_id": "**********", "secret_access_key_file": "/s", "bucket": "b"},
        "api": {"token_env": "TOKEN", "password": "**********"},
        "n": 3,
    }


def test_environment_shows_names_and_only_harmless_values() -> None:
    shown = redact_environment(
        {"CONNECTOR_CONFIG": "/etc/c.toml", "CONNECTOR_X": "secret", "HOME": "/root"}
    )
    assert shown == {"CONNECTOR_CONFIG": "/etc/c.toml", "CONNECTOR_X": "(set)"}


def test_free_text_redaction_of_known_secrets_and_assignments() -> None:
    bundle = SupportBundle(version="1", config={}, secrets={"known-secret-1"})
    text = bundle.redact("a known-secret-1 b token=abc123 password_file=/etc/pw")
    assert text == "a ********** b token=********** password_file=/etc/pw"
    assert bundle.redact('{"token": "abc"}', free_text=False) == '{"token": "abc"}'
