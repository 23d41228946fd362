"""The connector run as an unprivileged user (nobody, through setpriv) on a disk image
it may not read: the refusal the guide names, as the process reports it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import _toml
from tests.harness.nbd import write_sparse_image

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
NOBODY = 65534


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder nobody may enter (pytest's own tmp folders are root's alone)."""
    if os.geteuid() != 0:
        pytest.fail("this test runs the connector as nobody, so it needs root to switch user")
    path = Path(tempfile.mkdtemp(prefix="connector-nobody-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def as_nobody(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CONNECTOR_CONFIG=str(config), COLUMNS="200", HOME=str(config.parent))
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-m",
            "connector",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
        cwd=config.parent,
    )


def test_a_disk_image_the_user_may_not_read_is_refused_naming_the_fix(
    open_dir: Path, moto: Any, s3_bucket: str
) -> None:
    image = open_dir / "vda.img"
    write_sparse_image(image, 4 * MiB, [(0, MiB)], seed=5)
    image.chmod(0o600)  # root's alone: nobody may not open it
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
        "bucket": s3_bucket,
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
    proc = as_nobody(config, "replicate", "kvm-web")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (
        f"error: disk 2000: no permission to read {image}; run the connector as a user "
        "that may read it (the disk group for block devices)"
    ) in proc.stderr
    # nothing of the disk was stored
    listed = moto.boto3_client().list_objects_v2(Bucket=s3_bucket, Prefix="replicas/")
    assert not [o["Key"] for o in listed.get("Contents", []) if "/packs/" in o["Key"]]
