"""Id shapes and count ranges (connector.domain.ids), and the key builders that use them."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from connector.domain.ids import (
    MAX_DISK_KEY,
    MAX_KEEP,
    check_disk_key,
    check_job_id,
    check_keep,
    check_pack_id,
    check_purge_id,
    check_run_id,
    check_server_id,
)
from connector.domain.records import new_run_id
from connector.errors import InvalidInputError
from connector.store.repository import (
    commit_key,
    condemned_key,
    lock_key,
    manifest_key,
    pack_key,
)

RUN = "r-20261201T093852123Z-0badc0de"
SERVER = "s-0123456789abcdef"


def test_ids_the_connector_makes_pass() -> None:
    assert check_run_id(new_run_id()).startswith("r-")
    assert check_run_id(RUN) == RUN
    assert check_purge_id("p-20261201T093852123Z-00c0ffee")
    assert check_server_id(SERVER) == SERVER
    assert check_job_id("j-0123456789ab")
    assert check_pack_id("ab" * 32)
    assert check_disk_key(2000) == 2000 and check_disk_key(0) == 0
    assert check_disk_key(MAX_DISK_KEY) == MAX_DISK_KEY
    assert check_keep(0) == 0 and check_keep(MAX_KEEP) == MAX_KEEP


@pytest.mark.parametrize(
    "check, value",
    [
        (check_run_id, "../../config"),
        (check_run_id, RUN + "/commit"),
        (check_run_id, RUN.upper()),
        (check_run_id, RUN + "\n"),
        (check_run_id, "r-20261201T093852Z-0badc0de"),  # no milliseconds
        (check_run_id, ""),
        (check_run_id, None),
        (check_purge_id, RUN),
        (check_server_id, "s-0123"),
        (check_server_id, "../s-0123456789abcdef"),
        (check_job_id, "j-xyz"),
        (check_pack_id, "ab" * 31),
        (check_pack_id, "../" + "a" * 61),
    ],
)
def test_malformed_ids_are_refused_with_their_shape(
    check: Callable[[object], str], value: object
) -> None:
    with pytest.raises(InvalidInputError, match=r"is not a .* id; a .* id looks like"):
        check(value)


@pytest.mark.parametrize("value", [-1, MAX_DISK_KEY + 1, 10**30, True, "2000"])
def test_disk_keys_out_of_range_are_refused(value: object) -> None:
    with pytest.raises(InvalidInputError, match="is not a disk key"):
        check_disk_key(value)


@pytest.mark.parametrize("value", [-1, MAX_KEEP + 1, 10**30, False])
def test_counts_out_of_range_are_refused(value: object) -> None:
    with pytest.raises(InvalidInputError, match=f"from 0 \\(keep all\\) to {MAX_KEEP}"):
        check_keep(value)


def test_key_builders_refuse_malformed_ids() -> None:
    assert commit_key(SERVER, RUN) == f"runs/{SERVER}/{RUN}/commit"
    assert manifest_key(SERVER, RUN, 2000) == f"runs/{SERVER}/{RUN}/disk-2000"
    assert pack_key("ab" * 32) == f"packs/ab/{'ab' * 32}"
    with pytest.raises(InvalidInputError):
        commit_key(SERVER, "../../config")
    with pytest.raises(InvalidInputError):
        manifest_key("..", RUN, 2000)
    with pytest.raises(InvalidInputError):
        manifest_key(SERVER, RUN, -5)
    with pytest.raises(InvalidInputError):
        lock_key("x/../../config")
    with pytest.raises(InvalidInputError):
        condemned_key("p-1")
    with pytest.raises(InvalidInputError):
        pack_key("config")
