"""The connector run as an unprivileged user (nobody, through setpriv) on a disk image
it may not read: the refusal the guide names, as the process reports it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import _toml
from tests.harness.nbd import write_sparse_image
from tests.messages import record

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
NOBODY = 65534
PAUSE_TIMEOUT = 120.0


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder nobody may enter (pytest's own tmp folders are root's alone).

    The session's record of error messages (tests/messages) is root's: the connector
    run as nobody records into `seen/` here instead, merged into it afterwards."""
    if os.geteuid() != 0:
        pytest.fail("this test runs the connector as nobody, so it needs root to switch user")
    path = Path(tempfile.mkdtemp(prefix="connector-nobody-"))
    path.chmod(0o755)
    seen = path / "seen"
    seen.mkdir()
    os.chown(seen, NOBODY, NOBODY)
    try:
        yield path
    finally:
        session_record = os.environ.get(record.ENV)
        if session_record:
            for part in seen.glob("*.jsonl"):
                shutil.copyfile(part, Path(session_record) / f"nobody-{part.name}")
        shutil.rmtree(path, ignore_errors=True)


def _nobody_env(config: Path) -> dict[str, str]:
    env = dict(os.environ, CONNECTOR_CONFIG=str(config), COLUMNS="200", HOME=str(config.parent))
    if record.ENV in env:
        env[record.ENV] = str(config.parent / "seen")
    return env


def _nobody_argv(*args: str) -> list[str]:
    return [
        "setpriv",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        sys.executable,
        "-m",
        "connector",
        *args,
    ]


def as_nobody_started(config: Path, extra: dict[str, str], *args: str) -> subprocess.Popen[str]:
    env = {**_nobody_env(config), **extra}
    return subprocess.Popen(
        _nobody_argv(*args),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=config.parent,
    )


def as_nobody(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = _nobody_env(config)
    return subprocess.run(
        _nobody_argv(*args),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
        cwd=config.parent,
    )


def nobody_setup(open_dir: Path, moto: Any, bucket: str, image: Path) -> Path:
    """A config for a local VM of `image`, every file of it readable by nobody (the
    S3 secret its own, the state folder writable by it); returns the config file."""
    secret = open_dir / "s3-secret"
    secret.write_text(moto.secret_key + "\n")
    secret.chmod(0o600)
    os.chown(secret, NOBODY, NOBODY)
    ca = open_dir / "ca.pem"
    shutil.copyfile(moto.ca_file, ca)
    ca.chmod(0o644)
    state = open_dir / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    values = {
        "bucket": bucket,
        "prefix": "replicas",
        "region": moto.region,
        "endpoint_url": moto.endpoint_url,
        "ca_file": str(ca),
        "access_key_id": moto.access_key,
        "secret_access_key_file": str(secret),
    }
    config = open_dir / "connector.toml"
    config.write_text(
        "[s3]\n"
        + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
        + f"[state]\npath = {_toml(str(state / 'state.db'))}\n"
        + '[transport]\nkind = "local"\n'
        + '[[local.vms]]\nname = "kvm-web"\nquiescent = true\n'
        + f"[[local.vms.disks]]\npath = {_toml(str(image))}\n"
    )
    config.chmod(0o644)
    return config


def packs(moto: Any, bucket: str) -> list[str]:
    listed = moto.boto3_client().list_objects_v2(Bucket=bucket, Prefix="replicas/")
    return [o["Key"] for o in listed.get("Contents", []) if "/packs/" in o["Key"]]


def test_a_disk_image_the_user_may_not_read_is_refused_naming_the_fix(
    open_dir: Path, moto: Any, s3_bucket: str
) -> None:
    image = open_dir / "vda.img"
    write_sparse_image(image, 4 * MiB, [(0, MiB)], seed=5)
    image.chmod(0o600)  # root's alone: nobody may not open it
    config = nobody_setup(open_dir, moto, s3_bucket, image)
    proc = as_nobody(config, "replicate", "kvm-web")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (
        f"error: disk 2000: no permission to read {image}; run the connector as a user "
        "that may read it (the disk group for block devices)"
    ) in proc.stderr
    assert packs(moto, s3_bucket) == []  # nothing of the disk was stored


def test_a_disk_made_unreadable_after_its_snapshot_is_refused_when_read(
    open_dir: Path, moto: Any, s3_bucket: str
) -> None:
    """The run is held at its snapshot-created point (connector/faults.py) while the
    image loses its read permission: the reader's own open is refused, by name."""
    image = open_dir / "vda.img"
    write_sparse_image(image, 4 * MiB, [(0, MiB)], seed=6)
    image.chmod(0o644)
    config = nobody_setup(open_dir, moto, s3_bucket, image)
    pauses = open_dir / "pauses"
    pauses.mkdir()
    os.chown(pauses, NOBODY, NOBODY)
    pause_file = pauses / "paused"
    env = {
        "CONNECTOR_TEST_PAUSE_AT": "snapshot-created:1",
        "CONNECTOR_TEST_PAUSE_FILE": str(pause_file),
    }
    proc = as_nobody_started(config, env, "replicate", "kvm-web")
    try:
        deadline = time.monotonic() + PAUSE_TIMEOUT
        # the point writes "<pid> <point>\n" (not atomically): wait for the whole line
        while not (pause_file.exists() and pause_file.read_text().endswith("\n")):
            if proc.poll() is not None:
                pytest.fail(f"the run ended before its snapshot: {proc.communicate()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not reach snapshot-created in {PAUSE_TIMEOUT:.0f} s")
            time.sleep(0.05)
        assert pause_file.read_text().split()[1] == "snapshot-created"
        image.chmod(0o600)  # from now on, nobody may not open it
        pause_file.unlink()
        _out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert (
        f"disk 2000 of VM 'kvm-web': no permission to read {image}; run the connector as a "
        "user that may read it (the disk group for block devices)"
    ) in " ".join(err.split())
    assert packs(moto, s3_bucket) == []
