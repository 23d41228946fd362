"""Configuration of the store's key provider and of retention; one purge at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.app import App
from connector.config import load_config
from connector.errors import ConfigError, PermanentError

BASE = """
[vcenter]
url = "https://vc.example/sdk"
user = "svc"
password_file = "vc.password"

[s3]
bucket = "replicas"
endpoint_url = "https://s3.example"
ca_file = "s3-ca.pem"

[state]
path = "state/state.db"
"""


def config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "connector.toml"
    path.write_text(BASE + extra)
    return path


def test_kms_settings_default_to_the_s3_endpoint_and_trust(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path, '[store]\nkms_key_id = "alias/replicas"\n'))
    assert cfg.store.kms_key_id == "alias/replicas"
    assert cfg.retention.keep == 0 and cfg.retention.stale_lock_hours == 24
    own = load_config(
        config(
            tmp_path,
            '[store]\nkms_key_id = "k"\nkms_endpoint_url = "https://kms.example"\n'
            'kms_ca_file = "kms-ca.pem"\n[retention]\nkeep = 3\n',
        )
    )
    assert own.store.kms_ca_file == tmp_path / "kms-ca.pem"  # relative to the file
    assert own.retention.keep == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[store]\nkms_key_id = "k"\nkey_file = "store.key"\n', "key_file or kms_key_id"),
        ('[store]\nkms_key_id = " "\n', "kms_key_id is empty"),
        ('[store]\nkms_endpoint_url = "https://kms.example"\n', "need kms_key_id"),
        ('[store]\nkms_key_id = "k"\nkms_endpoint_url = "http://kms.example"\n', "https://"),
        ("[retention]\nkeep = -1\n", "retention.keep"),
        ("[retention]\nstale_lock_hours = 0\n", "stale_lock_hours"),
    ],
)
def test_bad_store_and_retention_settings_are_refused(
    tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(config(tmp_path, extra))


def test_a_second_purge_on_the_same_state_is_refused(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path, ""))
    first, second = App(cfg), App(cfg)
    with (
        first.retention.guard(),
        pytest.raises(PermanentError, match="another purge is running"),
        second.retention.guard(),
    ):
        pass
    with second.retention.guard():  # released
        assert (tmp_path / "state" / "purge.lock").exists()


LOCAL_ONLY = """
[transport]
kind = "local"

[[local.vms]]
name = "web-01"
quiescent = true
[[local.vms.disks]]
path = "web-01.img"

[state]
path = "state/state.db"
"""


def test_a_local_directory_store_needs_no_s3_and_its_path_is_relative_to_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "connector.toml"
    path.write_text(LOCAL_ONLY + '[store]\nkind = "local"\npath = "replicas"\n')
    cfg = load_config(path)
    assert cfg.s3 is None and cfg.store.kind == "local"
    assert cfg.store.path == tmp_path / "replicas"
    app = App(cfg)
    store = app.objects
    assert store.endpoint_url == (tmp_path / "replicas").as_uri()
    store.check_access()
    assert list(store.list("")) == []  # the access probe leaves nothing behind
    with pytest.raises(ConfigError, match=r"needs S3.*\[store\] kind = 'local'"):
        cfg.require_s3()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (LOCAL_ONLY + '[store]\nkind = "local"\n', "kind = 'local' needs path"),
        (LOCAL_ONLY + '[store]\npath = "replicas"\n', "path is used only with kind = 'local'"),
        (LOCAL_ONLY + '[store]\nkind = "nfs"\n', "store.kind"),
        (LOCAL_ONLY, "add [s3] with its bucket"),
        (
            BASE + '[store]\nkind = "local"\npath = "replicas"\n',
            "[s3] is not used: remove [s3]",
        ),
        (
            LOCAL_ONLY + '[store]\nkind = "local"\npath = "r"\nkms_key_id = "alias/k"\n',
            "needs kms_region",
        ),
    ],
)
def test_bad_store_kinds_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "connector.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)


def test_a_store_path_that_is_a_file_or_cannot_be_created_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    for store_path, message in (
        (blocker, "is not a directory"),
        (blocker / "below", "cannot create the replica store directory"),
    ):
        path = tmp_path / "connector.toml"
        path.write_text(LOCAL_ONLY + f'[store]\nkind = "local"\npath = "{store_path}"\n')
        with pytest.raises(ConfigError) as info:
            App(load_config(path)).objects
        assert message in str(info.value) and "[store] path" in str(info.value)
