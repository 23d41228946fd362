"""Restoring onto a file system that cannot size a new file: an rclone mount without its
VFS cache (a real FUSE file system, over a local folder) refuses ftruncate, as
streaming network mounts do. The `connector restore` process must say so, name the
path, and leave nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import _toml
from tests.harness.nbd import write_sparse_image

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
MOUNT_TIMEOUT = 60.0


@pytest.fixture
def streaming_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(mount point, the folder it serves): `rclone mount --vfs-cache-mode off`."""
    for tool in ("rclone", "fusermount"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install rclone fuse)")
    backing = tmp_path / "backing"
    mount = tmp_path / "mnt"
    backing.mkdir()
    mount.mkdir()
    log = tmp_path / "rclone.log"
    proc = subprocess.Popen(
        [
            "rclone", "mount", str(backing), str(mount),
            "--vfs-cache-mode", "off", "--config", os.devnull, "--log-file", str(log),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mount):
            if proc.poll() is not None:
                pytest.fail(f"rclone mount exited {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"rclone did not mount {mount} within {MOUNT_TIMEOUT:.0f} s")
            time.sleep(0.05)
        yield mount, backing
    finally:
        subprocess.run(["fusermount", "-u", str(mount)], check=False, capture_output=True)
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CONNECTOR_CONFIG=str(config), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def test_restore_onto_a_mount_that_cannot_size_the_file_is_refused_and_leaves_nothing(
    tmp_path: Path, moto: Any, s3_bucket: str, streaming_mount: tuple[Path, Path]
) -> None:
    mount, backing = streaming_mount
    image = tmp_path / "vda.img"
    write_sparse_image(image, 8 * MiB, [(MiB, MiB)], seed=31)
    secret = tmp_path / "s3-secret"
    secret.write_text(moto.secret_key + "\n")
    secret.chmod(0o600)
    values = {
        "bucket": s3_bucket,
        "prefix": "replicas",
        "region": moto.region,
        "endpoint_url": moto.endpoint_url,
        "ca_file": str(moto.ca_file),
        "access_key_id": moto.access_key,
        "secret_access_key_file": str(secret),
    }
    config = tmp_path / "connector.toml"
    config.write_text(
        "[s3]\n"
        + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
        + '[state]\npath = "state/state.db"\n[transport]\nkind = "local"\n'
        + '[[local.vms]]\nname = "kvm-fuse"\nquiescent = true\n'
        + f"[[local.vms.disks]]\npath = {_toml(str(image))}\n"
    )
    replicated = cli(config, "replicate", "kvm-fuse", "--json")
    assert replicated.returncode == 0, replicated.stderr
    run = json.loads(replicated.stdout)

    target = mount / "restored.img"
    proc = cli(
        config, "restore", "kvm-fuse", "--run", run["id"], "--disk", "2000", "--to", str(target)
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())
    assert (
        f"cannot make {target} {8 * MiB} bytes long: Operation not permitted; give another path"
    ) in text
    assert os.listdir(mount) == [] and os.listdir(backing) == []  # no partial file left
