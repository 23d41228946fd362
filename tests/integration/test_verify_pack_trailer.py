"""`verify --deep` authenticates each pack's header and trailer, and names a damaged pack."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config
from tests.integration.store_helpers import MiB, cli_json_any, objects

pytestmark = pytest.mark.integration

VM = "verify-pack-trailer"


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> ConnectorEnv:
    return write_config(tmp_path / "connector", vcsim, moto, s3_bucket)


def _damage(moto: Any, bucket: str, key: str, original: bytes, offset: int) -> None:
    """Put the pack back as written, with one bit flipped at `offset` (from the end if < 0)."""
    body = bytearray(original)
    body[offset] ^= 0x01
    moto.boto3_client().put_object(Bucket=bucket, Key=key, Body=bytes(body))


def test_deep_verify_reports_a_damaged_pack_header_or_trailer(
    env: ConnectorEnv, vcsim: Any, moto: Any
) -> None:
    uuid = vcsim.add_vm(VM, [8 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.write(uuid, key, 0, b"\x11" * MiB)
    vcsim.write(uuid, key, 3 * MiB, b"\x22" * MiB)
    run = env.cli_json("replicate", VM)
    assert run["state"] == "COMPLETED"
    (pack_key,) = [k for k in objects(moto, env.bucket) if "/packs/" in f"/{k}"]
    pack_id = pack_key.rsplit("/", 1)[1]
    s3 = moto.boto3_client()
    original = s3.get_object(Bucket=env.bucket, Key=pack_key)["Body"].read()
    (header_len,) = struct.unpack("<I", original[-8:-4])
    assert original[-4:] == b"CNP1"

    intact = env.cli("verify", "--deep")
    assert intact.returncode == 0, intact.stderr
    assert "no faults" in intact.stdout

    damages = {
        "sealed header": len(original) - 8 - header_len + 20,
        "trailer magic": len(original) - 1,
        "trailer header length": len(original) - 8,
        "trailer header length, high byte": len(original) - 5,
    }
    for what, offset in damages.items():
        _damage(moto, env.bucket, pack_key, original, offset)
        status, report, stderr = cli_json_any(env, "verify", "--deep")
        assert status == 1, what
        assert "Traceback" not in stderr
        (fault,) = report["faults"]
        assert (fault["run_id"], fault["disk_key"], fault["pack_id"]) == (run["id"], key, pack_id)
        assert fault["block"] is None, what  # the blocks themselves still authenticate
        assert f"pack {pack_id} has a damaged header or trailer" in fault["reason"], what
        assert "put the object back from an earlier S3 object version" in fault["reason"]
        text = env.cli("verify", VM, "--deep")
        assert text.returncode == 1
        assert f"fault: {VM} run {run['id']} disk {key}: pack {pack_id} has a damaged" in (
            " ".join(text.stderr.split())
        )
        assert "1 faults" in text.stdout
        # the quick verify reads only the blocks, which are intact; restore needs no header
        assert env.cli("verify", VM).returncode == 0, what

    s3.put_object(Bucket=env.bucket, Key=pack_key, Body=original)
    assert env.cli("verify", "--deep").returncode == 0
