"""`verify --deep` over the fakes: every way a pack's header or trailer can be wrong is a fault."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from connector.pipeline.verify import verify_store
from connector.store.repository import pack_key
from tests.unit.fake_store import Env, MiB, make_env


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def one_pack(env: Env) -> tuple[str, str, str]:
    """One run of blocks 0, 1 and 4 in one pack: (server id, run id, pack id)."""
    uuid = env.hv.add_vm("web", [8 * MiB])
    env.write_blocks(uuid, {i: bytes([i + 7]) * MiB for i in (0, 1, 4)})
    run = env.replicate(uuid)
    (pack_id,) = env.packs()
    return run.server_id, run.id, pack_id


def pack_faults(env: Env, server_id: str) -> list[tuple[int | None, int | None, str | None, str]]:
    report = verify_store(env.repo(), {server_id: None}, deep=True)
    return [(f.disk_key, f.block, f.pack_id, f.reason) for f in report.faults]


def test_an_intact_pack_has_no_fault(env: Env) -> None:
    server_id, _run, _pack = one_pack(env)
    assert pack_faults(env, server_id) == []


def test_a_header_that_authenticates_but_omits_a_block_is_a_fault(env: Env) -> None:
    server_id, _run, pack_id = one_pack(env)
    repo = env.repo()
    key = pack_key(pack_id)
    body = env.objects.objects[key]
    (hlen,) = struct.unpack("<I", body[-8:-4])
    blocks = body[: len(body) - 8 - hlen]
    entries = repo.keys.open(body[-8 - hlen : -8], b"pack-header:" + pack_id.encode(), "header")
    # a header sealed with the right key that lists only the first two blocks (48 bytes each)
    short = repo.keys.seal(entries[: 2 * 48], b"pack-header:" + pack_id.encode())
    env.objects.objects[key] = blocks + short + struct.pack("<I4s", len(short), b"CNP1")
    (fault,) = pack_faults(env, server_id)
    assert fault[:3] == (2000, None, pack_id)
    assert f"the header of pack {pack_id} does not list 1 of the blocks" in fault[3]
    assert verify_store(repo, {server_id: None}, deep=False).ok  # the blocks are intact


def test_a_pack_shorter_than_its_trailer_is_a_fault(env: Env) -> None:
    server_id, _run, pack_id = one_pack(env)
    env.objects.objects[pack_key(pack_id)] = b"CNP"
    faults = pack_faults(env, server_id)
    header = [f for f in faults if f[1] is None and f[2] == pack_id]
    assert len(header) == 1 and "3 bytes, too short for a trailer" in header[0][3]
    # and every block it should hold is a fault of its own, so the disk's root is wrong too
    assert sorted(f[1] for f in faults if f[1] is not None) == [0, 1, 4]
    assert any("Merkle root over the stored data" in f[3] for f in faults)


@pytest.mark.parametrize(
    "offset, words",
    [(-1, "no valid trailer"), (-5, "damaged trailer: it gives a header of"), (-8, "failed")],
)
def test_a_damaged_trailer_is_a_fault(env: Env, offset: int, words: str) -> None:
    server_id, _run, pack_id = one_pack(env)
    key = pack_key(pack_id)
    body = bytearray(env.objects.objects[key])
    body[offset] ^= 0x40
    env.objects.objects[key] = bytes(body)
    (fault,) = pack_faults(env, server_id)
    assert fault[:3] == (2000, None, pack_id) and words in fault[3]
