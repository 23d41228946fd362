"""The pure rules of `connector check`: clock skew, free space, secret file modes,
and how an error's advice becomes the fix."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from connector.check import (
    MIN_FREE_BYTES,
    clock_result,
    permissions_result,
    space_result,
    split_advice,
)

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def test_clock_skew_under_five_minutes_passes_either_way() -> None:
    for skew in (dt.timedelta(0), dt.timedelta(minutes=4, seconds=59), -dt.timedelta(minutes=4)):
        assert clock_result(NOW + skew, NOW).status == "ok"
    assert "ahead of S3" in clock_result(NOW + dt.timedelta(seconds=30), NOW).summary


def test_clock_skew_of_five_minutes_or_more_fails_with_the_fix() -> None:
    behind = clock_result(NOW - dt.timedelta(minutes=7), NOW)
    assert behind.status == "failed"
    assert "420 s behind S3" in behind.summary
    assert "NTP" in behind.fix
    assert clock_result(NOW + dt.timedelta(minutes=5), NOW).status == "failed"


def test_free_space_below_the_minimum_fails(tmp_path: Path) -> None:
    low = space_result(tmp_path, tmp_path, MIN_FREE_BYTES - 1)
    assert low.status == "failed" and f"df -h {tmp_path}" in low.fix
    enough = space_result(tmp_path / "state", tmp_path, MIN_FREE_BYTES)
    assert enough.status == "ok" and "not created yet" in enough.summary


def test_a_secret_open_to_group_or_others_fails_with_chmod(tmp_path: Path) -> None:
    private, group, world = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for path, mode in ((private, 0o600), (group, 0o640), (world, 0o604)):
        path.write_text("s\n")
        path.chmod(mode)
    result = permissions_result([("one", private), ("two", group), ("three", world)])
    assert result.status == "failed"
    assert result.fix == f"chmod 600 {group}; chmod 600 {world}"
    assert str(private) not in result.summary
    ok = permissions_result([("one", private), ("missing", tmp_path / "x"), ("cred", None)])
    assert ok.status == "ok"
    assert any("does not exist yet" in d for d in ok.details)
    assert any("systemd credential" in d for d in ok.details)


def test_advice_after_the_first_semicolon_is_the_fix() -> None:
    assert split_advice("the file X does not exist; create it (mode 0600)") == (
        "the file X does not exist",
        "create it (mode 0600)",
    )
    assert split_advice("no advice here") == ("no advice here", "")
