"""A connector configured to replicate local disk images and land them in the extended
moto_server (tests/harness/motoext.py), and helpers to read landed snapshots back."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.connector_env import _toml
from tests.harness.fixtures_landing import LandingMoto

EBS_BLOCK = 512 * 1024
MiB = 1024 * 1024


@dataclass
class LandingEnv:
    config: Path
    moto: LandingMoto
    bucket: str
    images: list[Path]

    def write(self, disk: int, offset: int, data: bytes) -> None:
        fd = os.open(self.images[disk], os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def content(self, disk: int) -> bytes:
        return self.images[disk].read_bytes()


def make_env(
    tmp_path: Path,
    moto: LandingMoto,
    sizes: tuple[int, ...] = (4 * MiB, 3 * MiB),
    landing: dict[str, Any] | None = None,
    extra: str = "",
) -> LandingEnv:
    server = moto.server
    bucket = f"t-{uuid.uuid4().hex[:20]}"
    server.boto3_client("s3").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": server.region}
    )
    images = []
    for n, size in enumerate(sizes):
        image = tmp_path / f"disk{n}.img"
        with image.open("wb") as f:
            f.truncate(size)
        images.append(image)
    secret = tmp_path / "s3-secret"
    secret.write_text(server.secret_key + "\n")
    secret.chmod(0o600)
    s3 = {
        "bucket": bucket,
        "prefix": "replicas",
        "region": server.region,
        "endpoint_url": server.endpoint_url,
        "ca_file": str(server.ca_file),
        "access_key_id": server.access_key,
        "secret_access_key_file": str(secret),
    }
    land: dict[str, Any] = {"mode": "every", "staging": "replica", "keep_amis": 3}
    land.update(landing or {})
    text = "[s3]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in s3.items())
    text += "[landing]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in land.items())
    text += f"[state]\npath = {_toml(str(tmp_path / 'state' / 'state.db'))}\n"
    text += (
        '[transport]\nkind = "local"\n[retry]\nattempts = 4\nbase_delay = 0.01\nmax_delay = 0.05\n'
    )
    text += extra
    text += '[[local.vms]]\nname = "web-1"\nquiescent = true\n'
    text += 'guest_id = "ubuntu64Guest"\nfirmware = "efi"\n'
    for image in images:
        text += f"[[local.vms.disks]]\npath = {_toml(str(image))}\n"
    config = tmp_path / "connector.toml"
    config.write_text(text)
    return LandingEnv(config, moto, bucket, images)


def read_snapshot(moto: LandingMoto, snapshot_id: str, size: int) -> bytes:
    """A landed snapshot's first `size` bytes, block by block (ListSnapshotBlocks and
    GetSnapshotBlock); blocks it does not list read as zeros."""
    ebs = moto.server.boto3_client("ebs")
    listed: dict[int, str] = {}
    token = None
    while True:
        args: dict[str, Any] = {"SnapshotId": snapshot_id}
        if token:
            args["NextToken"] = token
        resp = ebs.list_snapshot_blocks(**args)
        listed.update({b["BlockIndex"]: b["BlockToken"] for b in resp["Blocks"]})
        token = resp.get("NextToken")
        if not token:
            break
    out = bytearray(-(-size // EBS_BLOCK) * EBS_BLOCK)
    for index, block_token in listed.items():
        if index * EBS_BLOCK >= len(out):
            assert not any(
                ebs.get_snapshot_block(
                    SnapshotId=snapshot_id, BlockIndex=index, BlockToken=block_token
                )["BlockData"].read()
            ), f"block {index} beyond the disk holds data"
            continue
        data = ebs.get_snapshot_block(
            SnapshotId=snapshot_id, BlockIndex=index, BlockToken=block_token
        )["BlockData"].read()
        out[index * EBS_BLOCK : (index + 1) * EBS_BLOCK] = data
    return bytes(out[:size])


def differing_blocks(old: bytes, new: bytes) -> set[int]:
    """The 512 KiB blocks whose bytes differ (`old` empty: the non-zero blocks of `new`)."""
    out = set()
    for i in range(-(-len(new) // EBS_BLOCK)):
        a = old[i * EBS_BLOCK : (i + 1) * EBS_BLOCK] if old else b""
        b = new[i * EBS_BLOCK : (i + 1) * EBS_BLOCK]
        if (a or bytes(len(b))) != b:
            out.add(i)
    return out
