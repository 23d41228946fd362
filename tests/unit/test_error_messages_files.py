"""Error paths of the audit log, the store key and the local object store, each with the
message the troubleshooting guide documents."""

from __future__ import annotations

import base64
import errno
import os
from pathlib import Path

import pytest

from connector.adapters.localstore import _map_os_error
from connector.audit import AuditLog, read_records
from connector.errors import ConfigError, IntegrityError, PermanentError, TransientError
from connector.store.keys import NONCE_SIZE, LocalKeyProvider, StoreKeys, load_key_file


def test_an_audit_log_that_cannot_be_opened_names_its_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = AuditLog(blocker / "audit.jsonl")  # its folder is a file
    with pytest.raises(PermanentError) as info:
        log.record("config.load", "x", "success")
    assert str(info.value).startswith(f"cannot open the audit log {blocker / 'audit.jsonl'}: ")
    assert str(info.value).endswith("check [audit] path and the permissions of its folder")


def test_an_audit_log_on_a_full_device_cannot_be_appended_to() -> None:
    log = AuditLog(Path("/dev/full"))
    with pytest.raises(PermanentError) as info:
        log.record("config.load", "x", "success")
    assert str(info.value).startswith("cannot append to the audit log /dev/full: ")


def test_a_damaged_last_line_of_the_audit_log_stops_the_next_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).record("config.load", "x", "success")
    with path.open("a") as f:
        f.write('{"not": "a record"}\n')
    with pytest.raises(PermanentError) as info:
        AuditLog(path).record("config.load", "x", "success")
    assert str(info.value) == (
        f"the last line of the audit log {path} is not an audit record; run `connector audit "
        "verify` and move the damaged log aside before continuing"
    )
    with path.open("a") as f:
        f.write("not json\n")
    with pytest.raises(IntegrityError, match=f"line 3 of {path} is not JSON"):
        read_records(path)


def test_store_key_files_fail_with_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "store.key"
    with pytest.raises(ConfigError, match=f"the store key file {missing} does not exist; without"):
        load_key_file(missing)
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(b"x" * 16).decode())
    with pytest.raises(ConfigError) as info:
        load_key_file(short)
    assert str(info.value) == f"the store key file {short} must hold 32 bytes (base64), not 16"
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    for path in (right, wrong):
        path.write_text(base64.b64encode(os.urandom(32)).decode())
    _master, wrapped = LocalKeyProvider(right).new_master(b"store")
    with pytest.raises(PermanentError) as refused:
        LocalKeyProvider(wrong).unwrap(wrapped, b"store")
    assert str(refused.value) == (
        f"the key file {wrong} does not open this store (wrong key); use the key file the "
        "store was created with"
    )


def test_a_blob_that_authenticates_but_does_not_decompress_is_an_integrity_error() -> None:
    keys = StoreKeys(os.urandom(32))
    nonce = os.urandom(NONCE_SIZE)
    blob = nonce + keys._aead.encrypt(nonce, b"not zstd data", b"aad")
    with pytest.raises(IntegrityError, match="block 7 does not decompress: "):
        keys.open(blob, b"aad", "block 7")


def test_local_object_store_errors_say_what_to_do() -> None:
    full = _map_os_error(OSError(errno.ENOSPC, "No space left on device"), "writing packs/ab")
    assert isinstance(full, TransientError)
    assert str(full) == "writing packs/ab: the disk is full (No space left on device); free space"
    denied = _map_os_error(OSError(errno.EACCES, "Permission denied"), "writing packs/ab")
    assert str(denied).startswith("writing packs/ab: permission denied (")
    assert str(denied).endswith("); check the directory's owner")


def test_a_sealed_object_cut_shorter_than_its_nonce_fails_authentication() -> None:
    keys = StoreKeys(os.urandom(32))
    for cut in (b"", b"short", bytes(NONCE_SIZE + 15)):
        with pytest.raises(IntegrityError) as info:
            keys.open(cut, b"aad", "pack ab header")
        assert str(info.value) == "pack ab header failed authentication (damaged or altered)"
