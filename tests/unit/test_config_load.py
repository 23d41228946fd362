"""Config loading: every malformed input is a ConfigError that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.config import load_config
from connector.errors import ConfigError

GOOD = """
[vcenter]
url = "https://vc.example.com/sdk"
user = "svc@vsphere.local"
password_file = "vc.password"
ca_file = "ca.pem"

[s3]
bucket = "replica-staging"
region = "eu-central-1"

[state]
path = "state/state.db"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "connector.toml"
    p.write_text(text)
    return p


def test_good_config_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.require_vcenter().password_file == tmp_path / "vc.password"
    assert cfg.state.path == tmp_path / "state" / "state.db"
    assert cfg.key_file == tmp_path / "state" / "store.key"
    assert cfg.require_s3().sse == "AES256"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("https://vc.example.com/sdk", "https://root:pw@vc.example.com/sdk"), "must not carry"),
        (("https://vc.example.com/sdk", "http://vc.example.com/sdk"), "https://"),
        (
            ('ca_file = "ca.pem"', 'ca_file = "ca.pem"\nthumbprint = "' + "ab" * 32 + '"'),
            "not both",
        ),
        (('ca_file = "ca.pem"', 'thumbprint = "12:34"'), "SHA-256"),
        (('bucket = "replica-staging"', 'bucket = "Bad_Bucket"'), "s3.bucket"),
        (('region = "eu-central-1"', 'region = "eu-central-1"\nsse = "aws:kms"'), "kms_key_id"),
        (('region = "eu-central-1"', 'region = "eu-central-1"\nprefix = "a/../b"'), ".."),
        (
            ('region = "eu-central-1"', 'region = "eu-central-1"\naccess_key_id = "AKIA"'),
            "go together",
        ),
        (
            ('user = "svc@vsphere.local"', 'user = "svc@vsphere.local"\npassword = "inline"'),
            "password",
        ),
    ],
)
def test_bad_values_are_named(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD.replace(old, new, 1)))
    assert message in str(info.value)
    assert "pw@" not in str(info.value) and "inline" not in str(info.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[vcenter\nurl = 1"))


def test_missing_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"replica store is in S3.*add \[s3\]"):
        load_config(write(tmp_path, GOOD.split("[s3]")[0]))


def test_password_file_must_exist(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match=r"vc\.password does not exist"):
        cfg.vcenter_password()
    (tmp_path / "vc.password").write_text("s3cr3t\n")
    assert cfg.vcenter_password().reveal() == "s3cr3t"
    assert "s3cr3t" not in repr(cfg.vcenter_password())


def test_retry_defaults_and_the_one_policy_built_from_them(tmp_path: Path) -> None:
    from connector.app import App

    cfg = load_config(write(tmp_path, GOOD))
    assert (cfg.retry.attempts, cfg.retry.base_delay, cfg.retry.max_delay) == (4, 0.25, 4.0)
    tuned = load_config(
        write(tmp_path, GOOD + "\n[retry]\nattempts = 6\nbase_delay = 0.5\nmax_delay = 10\n")
    )
    app = App(tuned)
    policy = app.retry_policy
    assert (policy.attempts, policy.base_delay, policy.max_delay) == (6, 0.5, 10.0)
    assert app.retry_policy is policy  # built once, shared


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("attempts = 0", "retry.attempts"),
        ("base_delay = -1", "retry.base_delay"),
        ("base_delay = 5\nmax_delay = 1", "max_delay must not be below base_delay"),
        ("tries = 3", "retry.tries"),
    ],
)
def test_bad_retry_settings_are_named(tmp_path: Path, section: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, GOOD + f"\n[retry]\n{section}\n"))
    assert message in str(info.value)


def test_readers_get_the_one_policy_from_the_composition_root(tmp_path: Path) -> None:
    from connector.adapters.local import LocalDiskSource, LocalFileReader
    from connector.app import App

    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 65536)
    text = f"""
[s3]
bucket = "replica-staging"

[state]
path = "state/state.db"

[transport]
kind = "local"

[retry]
attempts = 7

[[local.vms]]
name = "vm1"
quiescent = true

[[local.vms.disks]]
path = "{image}"
"""
    app = App(load_config(write(tmp_path, text)))
    try:
        policy = app.retry_policy
        assert policy.attempts == 7
        source = app.disk_source()
        assert isinstance(source, LocalDiskSource) and source._retry is policy
        assert app.local._retry is policy
        vm = app.local.list_vms()[0]
        snap = app.local.create_snapshot(vm.uuid, "connector-t", "")
        reader = source.open(vm, snap, vm.disks[0])
        try:
            assert isinstance(reader, LocalFileReader) and reader._retry is policy
        finally:
            reader.close()
            app.local.remove_snapshot(vm.uuid, snap.ref)
    finally:
        app.close()
