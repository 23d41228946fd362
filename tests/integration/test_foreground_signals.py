"""`connector replicate` in the foreground, stopped by SIGTERM, SIGHUP or SIGINT mid-run.

Each run is held at a named point of its transfer (CONNECTOR_TEST_PAUSE_AT, see
connector/faults.py) while the test sends the signal, so the signal lands
there, not before or after. The run must end rolled back: no `connector-*`
snapshot on the VM, the run FAILED with the signal as its reason, no open
multipart upload, exit status 128 + the signal; the next run of the VM is
exact.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.daemon import wait_for

pytestmark = pytest.mark.integration

MiB = 1024 * 1024

# 1 MiB reads: the 6 MiB of data take six reads; the pack (above the 5 MiB
# threshold) goes up as a multipart upload of two parts.
TRANSPORT = """
[transport]
max_request = 1048576
"""


def make_env(workdir: Path, vcsim: Any, moto: Any, bucket: str) -> ConnectorEnv:
    return write_config(
        workdir,
        vcsim,
        moto,
        bucket,
        s3={"multipart_threshold": 5 * MiB, "multipart_part_size": 5 * MiB},
        extra=TRANSPORT,
    )


def connector_snapshots(vcsim: Any, uuid: str) -> list[str]:
    return [s for s in vcsim.snapshot_names(uuid) if s.startswith("connector-")]


def open_uploads(moto: Any, bucket: str) -> list[Any]:
    uploads: list[Any] = (
        moto.boto3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    )
    return uploads


class PausedReplicate:
    """`connector replicate VM` as a process that pauses at the named points."""

    def __init__(self, env: ConnectorEnv, vm: str, points: str) -> None:
        self.marker = env.workdir / "paused"
        self.marker.unlink(missing_ok=True)
        self.stderr_file = env.workdir / "replicate.stderr"
        self.stderr = self.stderr_file.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connector", "replicate", vm],
            env=dict(
                os.environ,
                CONNECTOR_CONFIG=str(env.config_file),
                CONNECTOR_TEST_PAUSE_AT=points,
                CONNECTOR_TEST_PAUSE_FILE=str(self.marker),
            ),
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )

    def wait_paused_at(self, point: str) -> None:
        def paused() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"replicate exited {self.proc.returncode}:\n{self.err()}")
            try:
                return self.marker.read_text().split()[1:] == [point]
            except (FileNotFoundError, IndexError):
                return False

        wait_for(f"replicate to pause at {point}", paused, timeout=120, every=0.02)

    def release(self) -> None:
        self.marker.unlink()

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=120)
        finally:
            self.stderr.close()

    def err(self) -> str:
        return self.stderr_file.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.stderr.close()


@pytest.mark.parametrize(
    ("sig", "point"),
    [
        (signal.SIGTERM, "block-read:2"),  # between two reads
        (signal.SIGHUP, "multipart-part:1"),  # inside the pack's multipart upload
        (signal.SIGINT, "block-read:3"),
    ],
    ids=["SIGTERM", "SIGHUP", "SIGINT"],
)
def test_a_signal_during_the_transfer_rolls_the_run_back_and_the_next_run_is_exact(
    sig: signal.Signals,
    point: str,
    tmp_path: Path,
    vcsim: Any,
    moto: Any,
    s3_bucket: str,
) -> None:
    env = make_env(tmp_path / "c", vcsim, moto, s3_bucket)
    name = f"sig-{sig.name.lower()}"
    uuid = vcsim.add_vm(name, [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.write(uuid, key, 1 * MiB, random.Random(sig).randbytes(6 * MiB))
    expected = hashlib.sha256(vcsim.read_disk(uuid, key)).hexdigest()

    run = PausedReplicate(env, name, point)
    try:
        run.wait_paused_at(point.split(":")[0])
        assert connector_snapshots(vcsim, uuid)  # the run holds its snapshot here
        run.proc.send_signal(sig)
        run.release()
        code = run.wait()
    finally:
        run.kill()
    stderr = run.err()
    assert code == 128 + sig, stderr
    assert f"{sig.name} received; stopping the run" in stderr
    assert f"FAILED: stopped by {sig.name}" in stderr
    assert f"replicate it again with `connector replicate {name}`" in stderr
    assert "Traceback" not in stderr
    assert connector_snapshots(vcsim, uuid) == []
    assert open_uploads(moto, s3_bucket) == []
    (stopped,) = env.cli_json("runs", name)
    assert stopped["state"] == "FAILED"
    assert stopped["error"].startswith(f"stopped by {sig.name}")
    assert stopped["finished_at"]

    env.cli("replicate", name, check=True)
    runs = env.cli_json("runs", name)
    assert [r["state"] for r in runs] == ["FAILED", "COMPLETED"]
    out = tmp_path / "disk.img"
    restored = env.cli_json(
        "restore", name, "--run", runs[1]["id"], "--disk", str(key), "--to", str(out)
    )
    assert restored["sha256"] == expected
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
    assert connector_snapshots(vcsim, uuid) == []


def test_a_second_signal_during_the_rollback_does_not_cut_it_short(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = make_env(tmp_path / "c", vcsim, moto, s3_bucket)
    uuid = vcsim.add_vm("sig-twice", [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.write(uuid, key, 1 * MiB, random.Random(5).randbytes(2 * MiB))
    run = PausedReplicate(env, "sig-twice", "block-read:1,snapshot-remove:1")
    try:
        run.wait_paused_at("block-read")
        run.proc.send_signal(signal.SIGTERM)
        run.release()
        run.wait_paused_at("snapshot-remove")  # the rollback is removing the snapshot
        run.proc.send_signal(signal.SIGINT)
        run.release()
        code = run.wait()
    finally:
        run.kill()
    stderr = run.err()
    assert code == 128 + signal.SIGTERM, stderr
    assert "SIGINT received; still rolling back the run after SIGTERM" in stderr
    assert "Traceback" not in stderr
    assert connector_snapshots(vcsim, uuid) == []
    (stopped,) = env.cli_json("runs", "sig-twice")
    assert stopped["state"] == "FAILED" and stopped["error"].startswith("stopped by SIGTERM")


def test_a_signal_after_the_commit_lets_the_run_complete(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = make_env(tmp_path / "c", vcsim, moto, s3_bucket)
    uuid = vcsim.add_vm("sig-late", [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.write(uuid, key, 1 * MiB, random.Random(6).randbytes(2 * MiB))
    run = PausedReplicate(env, "sig-late", "after-commit:1")
    try:
        run.wait_paused_at("after-commit")
        run.proc.send_signal(signal.SIGTERM)
        run.release()
        code = run.wait()
    finally:
        run.kill()
    stderr = run.err()
    assert code == 0, stderr
    assert "note: SIGTERM came after the run was committed; it completed" in stderr
    assert connector_snapshots(vcsim, uuid) == []
    (done,) = env.cli_json("runs", "sig-late")
    assert done["state"] == "COMPLETED" and not done["error"]
