"""Helpers for the replica store tests against the simulator and moto_server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from connector.adapters.state import RunRow
from connector.app import App
from connector.config import load_config
from connector.pipeline.restore import restore_disk
from tests.harness.connector_env import ConnectorEnv

MiB = 1024 * 1024


def app_for(env: ConnectorEnv) -> App:
    return App(load_config(env.config_file))


def objects(moto: Any, bucket: str) -> dict[str, int]:
    """Every object in the bucket: key -> size."""
    s3 = moto.boto3_client()
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def packs(moto: Any, bucket: str) -> dict[str, int]:
    """Pack id -> size."""
    return {
        key.rsplit("/", 1)[1]: size
        for key, size in objects(moto, bucket).items()
        if "/packs/" in f"/{key}"
    }


def write_blocks(vcsim: Any, uuid: str, key: int, blocks: dict[int, bytes]) -> None:
    for index, data in blocks.items():
        vcsim.write(uuid, key, index * MiB, data)


def disk_sha(vcsim: Any, uuid: str, key: int) -> str:
    return hashlib.sha256(vcsim.read_disk(uuid, key)).hexdigest()


def replicate(app: App, uuid: str) -> RunRow:
    run = app.replicator().replicate(uuid)
    assert run.state == "COMPLETED", run.error
    return run


def restore_sha(app: App, run: RunRow, key: int, out: Path) -> str:
    return restore_disk(app.repository(), run.server_id, run.id, key, out).sha256


def flip_byte(moto: Any, bucket: str, key: str, offset: int) -> None:
    """Change one bit of an object in S3, as storage corruption would."""
    s3 = moto.boto3_client()
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[offset] ^= 0x01
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))


def cli_json_any(env: ConnectorEnv, *args: str) -> tuple[int, Any, str]:
    """Run `connector ARGS --json` whatever its exit status: (status, parsed stdout, stderr)."""
    proc = env.cli(*args, "--json")
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else None, proc.stderr
