"""Error paths of opening the replica store and reading its packs, each with the message
the troubleshooting guide documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connector.domain.manifest import BlockRef
from connector.errors import IntegrityError, NotFoundError, StoreFormatError
from connector.fakes import MemoryObjectStore
from connector.store.keys import LocalKeyProvider, generate_key_file
from connector.store.repository import (
    _PACK_TRAILER,
    PACK_MAGIC,
    STORE_FORMAT,
    Repository,
    ServerRecord,
    pack_key,
    server_key,
)


@pytest.fixture
def provider(tmp_path: Path) -> LocalKeyProvider:
    generate_key_file(tmp_path / "store.key")
    return LocalKeyProvider(tmp_path / "store.key")


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (
            None,
            NotFoundError,
            "no replica store at this bucket and prefix (no config object); "
            "run a replication first, or check [s3] bucket and prefix",
        ),
        (b"{broken", StoreFormatError, "the store's config object is not JSON: "),
        (
            b'{"format": "something-else"}',
            StoreFormatError,
            "the object named config at this prefix is not a replica store",
        ),
        (
            json.dumps({"format": STORE_FORMAT, "version": 7}).encode(),
            StoreFormatError,
            "replica store format version 7 is not supported (this connector reads version 1); "
            "upgrade the connector",
        ),
    ],
)
def test_a_store_that_cannot_be_opened_says_why(
    provider: LocalKeyProvider, config: bytes | None, error: type[Exception], message: str
) -> None:
    objects = MemoryObjectStore()
    if config is not None:
        objects.put("config", config)
    with pytest.raises(error) as info:
        Repository.open(objects, provider)
    assert str(info.value).startswith(message)


def test_a_missing_or_damaged_pack_header_is_named(provider: LocalKeyProvider) -> None:
    objects = MemoryObjectStore()
    repo = Repository.open(objects, provider, create=True)
    pack_id = "ab" * 32
    with pytest.raises(NotFoundError, match=f"pack {pack_id} is missing from the store"):
        repo.pack_header(pack_id)


def test_a_pack_header_that_is_not_a_list_of_entries_is_a_format_error(
    provider: LocalKeyProvider,
) -> None:
    objects = MemoryObjectStore()
    repo = Repository.open(objects, provider, create=True)
    pack_id = "cd" * 32
    sealed = repo.keys.seal(b"seven b", b"pack-header:" + pack_id.encode())
    objects.put(pack_key(pack_id), sealed + _PACK_TRAILER.pack(len(sealed), PACK_MAGIC))
    with pytest.raises(StoreFormatError) as info:
        repo.pack_header(pack_id)
    assert str(info.value) == f"the header of pack {pack_id} is not a list of entries"


def test_a_block_whose_content_is_not_its_id_is_an_integrity_error(
    provider: LocalKeyProvider,
) -> None:
    repo = Repository.open(MemoryObjectStore(), provider, create=True)
    claimed = repo.keys.block_id(b"what the manifest says")
    blob = repo.keys.seal(b"what the pack holds", claimed)
    ref = BlockRef(claimed, "ef" * 32, 0, len(blob))
    with pytest.raises(IntegrityError) as info:
        repo.open_block(ref, blob, "block 3 of run r-1 disk 2000")
    assert str(info.value) == "block 3 of run r-1 disk 2000 does not match its hash"


def test_a_server_record_that_names_another_server_is_an_integrity_error(
    provider: LocalKeyProvider,
) -> None:
    repo = Repository.open(MemoryObjectStore(), provider, create=True)
    mine, other = "s-" + "1" * 16, "s-" + "2" * 16
    record = ServerRecord(other, "4210-uuid", "db-01", "2026-12-01T00:00:00Z")
    repo._put_sealed(server_key(mine), record.to_json())  # sealed, but under the wrong name
    with pytest.raises(IntegrityError) as info:
        repo.read_server(mine)
    assert str(info.value) == f"server record servers/{mine} names server {other}"
