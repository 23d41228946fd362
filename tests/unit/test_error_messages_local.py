"""Error paths of local VMs (their disks, snapshot commands and markers), each with the
message the troubleshooting guide documents."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connector.adapters.local import LocalDiskSpec, LocalFileReader, LocalHypervisor, LocalVmSpec
from connector.adapters.nbdkit import NbdkitServer
from connector.errors import ConnectorError, NotFoundError, PermanentError, TransientError
from connector.retry import RetryPolicy

UUID = "11111111-2222-3333-4444-555555555555"


def hypervisor(tmp_path: Path, **vm: object) -> LocalHypervisor:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    spec = LocalVmSpec(
        name="kvm-01",
        uuid=UUID,
        disks=(LocalDiskSpec(key=1, label="disk 1", path=image),),
        **vm,  # type: ignore[arg-type]
    )
    return LocalHypervisor([spec], tmp_path / "state", retry=RetryPolicy(attempts=1))


def snapshot_error(hv: LocalHypervisor) -> str:
    with pytest.raises(ConnectorError) as info:
        hv.create_snapshot(UUID, "connector-r-1", "")
    return str(info.value)


def test_snapshot_commands_that_cannot_run_say_why(tmp_path: Path) -> None:
    what = "the snapshot command of local VM 'kvm-01'"
    missing = hypervisor(tmp_path, snapshot_command=(str(tmp_path / "no-such-command"),))
    assert snapshot_error(missing) == (
        f"{what} ({tmp_path / 'no-such-command'}) does not exist; fix [local] in the config"
    )
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    blocked = hypervisor(tmp_path, snapshot_command=(str(script),))
    assert snapshot_error(blocked).startswith(f"{what} ({script}) could not be started: ")
    slow = hypervisor(tmp_path, snapshot_command=("sleep", "60"), hook_timeout=1.0)
    assert snapshot_error(slow) == f"{what} (sleep) did not finish within 1 s"


def test_a_damaged_snapshot_marker_stops_a_snapshot(tmp_path: Path) -> None:
    hv = hypervisor(tmp_path, quiescent=True)
    marker = tmp_path / "state" / "local-snapshots" / f"{UUID}.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{not json")
    message = snapshot_error(hv)
    assert message.startswith(f"the snapshot marker {marker} is unreadable (")
    assert message.endswith("release the snapshot by hand if one exists, then delete the file")


def test_local_disks_that_cannot_be_found_or_opened(tmp_path: Path) -> None:
    hv = hypervisor(tmp_path, quiescent=True)
    with pytest.raises(NotFoundError, match="local VM 'kvm-01' has no disk 9"):
        hv.disk_spec(UUID, 9)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(PermanentError) as info:
        LocalFileReader(afile / "disk.img", description="disk 1 of kvm-01", retry=RetryPolicy())
    assert str(info.value).startswith(f"disk 1 of kvm-01: cannot open {afile / 'disk.img'}: ")
    bad = LocalHypervisor(
        [
            LocalVmSpec(
                "kvm-02",
                UUID,
                (LocalDiskSpec(key=3, label="disk 3", path=afile / "disk.img"),),
                quiescent=True,
            )
        ],
        tmp_path / "state2",
        retry=RetryPolicy(attempts=1),
    )
    assert snapshot_error(bad).startswith(f"disk 3: cannot open {afile / 'disk.img'}: ")


def test_a_disk_file_that_shrinks_during_a_read_is_a_short_read(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    reader = LocalFileReader(image, description="disk 1 of kvm-01", retry=RetryPolicy())
    try:
        os.truncate(image, 4096)
        with pytest.raises(PermanentError) as info:
            reader.read(0, 8192)
    finally:
        reader.close()
    assert str(info.value) == (
        "short read of disk 1 of kvm-01: 4096 of 8192 bytes at offset 0 (the file shrank?)"
    )


def test_nbdkit_that_is_missing_or_never_listens_is_named(tmp_path: Path) -> None:
    missing = NbdkitServer(
        lambda sock: [str(tmp_path / "no-nbdkit"), str(sock)], tmp_path / "run", what="disk 1"
    )
    with pytest.raises(PermanentError) as info:
        missing.start()
    assert str(info.value) == (
        f"disk 1: {tmp_path / 'no-nbdkit'} is not installed (apt-get install nbdkit)"
    )
    silent = NbdkitServer(
        lambda sock: ["sleep", "60"], tmp_path / "run", what="nbdkit for disk 1", start_timeout=1
    )
    with pytest.raises(TransientError) as slow:
        silent.start()
    assert str(slow.value) == "nbdkit for disk 1 did not accept connections within 1 s: no output"
    assert silent.proc is None or silent.proc.poll() is not None  # stopped, not left behind
