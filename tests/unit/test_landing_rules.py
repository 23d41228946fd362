"""The pure rules of landing (connector.domain.landing)."""

from __future__ import annotations

import pytest

from connector.domain.landing import (
    EBS_BLOCK,
    LANDING_DELETED,
    LANDING_LANDED,
    SNAP_COMPLETED,
    GiB,
    LandedDisk,
    LandingRow,
    LandingSpec,
    ami_retention,
    architecture,
    boot_mode,
    changed_ebs_blocks,
    client_token,
    covering,
    device_names,
    image_name,
    must_send,
    parent_of,
    volume_size_gib,
)
from connector.domain.manifest import BlockRef
from connector.errors import InvalidInputError

MiB = 1024 * 1024


def ref(n: int) -> BlockRef:
    return BlockRef(bytes([n]) * 32, "p" * 64, 0, 10)


def test_volume_size_is_rounded_up_to_whole_gib() -> None:
    assert volume_size_gib(1) == 1
    assert volume_size_gib(GiB) == 1
    assert volume_size_gib(GiB + 1) == 2
    with pytest.raises(InvalidInputError):
        volume_size_gib(0)
    with pytest.raises(InvalidInputError, match="64 TiB"):
        volume_size_gib(64 * 1024 * GiB + 1)


def test_client_tokens_are_stable_opaque_and_differ_by_disk_and_attempt() -> None:
    token = client_token("r-1", 2000)
    assert token == client_token("r-1", 2000, 0)
    assert len(token) <= 64 and "r-1" not in token
    assert len({token, client_token("r-1", 2001), client_token("r-1", 2000, 1)}) == 3


def test_architecture_boot_mode_names_and_devices() -> None:
    assert architecture("ubuntu64Guest") == "x86_64"
    assert architecture("arm-ubuntu64Guest") == "arm64"
    assert architecture(None) == "x86_64"
    assert boot_mode("efi") == "uefi" and boot_mode("bios") == "legacy-bios"
    assert boot_mode(None) == "legacy-bios"
    assert image_name("s-1", "r-2") == "connector-s-1-r-2"
    assert device_names(2) == ("/dev/xvda", "/dev/xvdb")
    with pytest.raises(InvalidInputError):
        device_names(27)


def test_changed_blocks_of_a_first_snapshot_are_its_non_zero_blocks() -> None:
    # 1 MiB store blocks: each covers two EBS blocks; a 3.5 MiB disk has 7 EBS blocks
    # (the last store block's second half lies past the disk's end).
    current = {0: ref(1), 3: ref(2)}
    assert changed_ebs_blocks(None, current, MiB, 3 * MiB + 512 * 1024) == [0, 1, 6]
    assert changed_ebs_blocks(None, {3: ref(2)}, MiB, 4 * MiB) == [6, 7]


def test_changed_blocks_against_a_parent_include_blocks_that_became_zero() -> None:
    parent = {0: ref(1), 1: ref(2), 2: ref(3)}
    current = {0: ref(1), 1: ref(9), 3: ref(4)}  # 1 changed, 2 became zero, 3 new
    assert changed_ebs_blocks(parent, current, MiB, 4 * MiB) == [2, 3, 4, 5, 6, 7]


def test_small_store_blocks_group_into_one_ebs_block() -> None:
    bs = 256 * 1024
    assert covering(1, bs) == [(2, 0, bs), (3, 0, bs)]
    assert covering(1, MiB) == [(0, EBS_BLOCK, 2 * EBS_BLOCK)]
    assert changed_ebs_blocks({}, {3: ref(1), 4: ref(2)}, bs, 4 * MiB) == [1, 2]
    with pytest.raises(InvalidInputError):
        covering(0, 300 * 1024)


def test_a_block_is_sent_when_it_differs_or_the_parent_is_unknown() -> None:
    data = b"a" * EBS_BLOCK
    assert must_send(data, None)
    assert not must_send(data, data)
    assert must_send(bytes(EBS_BLOCK), data)  # became zero


def _landing(run: str, snaps: list[str], state: str = LANDING_LANDED) -> LandingRow:
    return LandingRow(
        run_id=run,
        server_id="s-1",
        state=state,
        image_name=f"n-{run}",
        image_id=f"ami-{run}",
        attempt=0,
        started_at="t",
        finished_at="t",
        error=None,
        disks=[
            LandedDisk(run, 2000 + i, s, SNAP_COMPLETED, "t", None, MiB)
            for i, s in enumerate(snaps)
        ],
    )


def test_ami_retention_keeps_the_newest_and_never_a_snapshot_in_use() -> None:
    rows = [
        _landing("r-1", ["snap-a", "snap-shared"]),
        _landing("r-2", ["snap-b", "snap-shared"]),
        _landing("r-3", ["snap-c", "snap-d"]),
        _landing("r-0", ["snap-z"], state=LANDING_DELETED),
    ]
    removal = ami_retention(rows, keep=2)
    assert removal.runs == ("r-1",)
    assert removal.images == ("ami-r-1",)
    assert removal.snapshots == ("snap-a",)  # snap-shared: r-2 keeps it
    assert ami_retention(rows, keep=3).runs == ()
    with pytest.raises(InvalidInputError):
        ami_retention(rows, keep=0)


def test_the_parent_is_the_newest_completed_snapshot_of_the_same_capacity() -> None:
    rows = [_landing("r-1", ["snap-a"]), _landing("r-2", ["snap-b"])]
    parent = parent_of(rows, 2000, MiB)
    assert parent is not None and parent.snapshot_id == "snap-b"
    assert parent_of(rows, 2000, 2 * MiB) is None  # resized: a new chain
    assert parent_of(rows, 2001, MiB) is None  # a new disk


def test_landing_specs_check_their_fields_and_round_trip() -> None:
    spec = LandingSpec(mode="every", kms_key_id="k", keep_amis=2, role_name="r.1")
    assert LandingSpec.from_json(spec.to_json()) == spec
    assert LandingSpec.from_json(None) == LandingSpec()
    for bad in (
        {"mode": "often"},
        {"staging": "x"},
        {"license_type": "GPL"},
        {"keep_amis": 0},
        {"encrypted": False, "kms_key_id": "k"},
        {"role_name": "a b"},
    ):
        with pytest.raises(InvalidInputError):
            LandingSpec(**bad)
