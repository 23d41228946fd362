"""Temporary staging: after each landing the bucket holds no pack that only landed runs
use (the landed run the next incremental builds on excepted), and the next incremental
still lands exactly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from connector.app import App
from connector.config import load_config
from tests.harness.fixtures_landing import LandingMoto
from tests.harness.landing_env import LandingEnv, MiB, differing_blocks, make_env, read_snapshot
from tests.integration.test_landing_e2e import landing_of, ok_json

pytestmark = pytest.mark.integration


def _packs(env: LandingEnv, moto: LandingMoto) -> set[str]:
    s3 = moto.server.boto3_client("s3")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=env.bucket, Prefix="replicas/packs/"
        )
        for o in page.get("Contents", [])
    ]
    return {k.rsplit("/", 1)[1] for k in keys}


def _referenced(env: LandingEnv, server_id: str, run_id: str) -> set[str]:
    app = App(load_config(env.config))
    try:
        repo = app.repository()
        out = set()
        for key in (2000, 2001):
            full = repo.resolve_map(repo.read_manifest(server_id, run_id, key))
            out |= {ref.pack_id for ref in full.values() if ref is not None}
        return out
    finally:
        app.close()


def test_temporary_staging_keeps_only_what_the_next_incremental_needs(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    env = make_env(tmp_path, landing_moto, landing={"staging": "temporary"})
    before = [b"", b""]
    runs: list[str] = []
    for step in range(3):
        env.write(0, step * MiB, os.urandom(MiB))  # a new store block each run
        env.write(1, 0, os.urandom(300 * 1024 + step))
        now = [env.content(0), env.content(1)]
        run = ok_json(env, "replicate", "web-1")
        runs.append(run["id"])
        landing = landing_of(env, run["id"])
        assert landing["state"] == "LANDED"
        for n, d in enumerate(landing["disks"]):
            assert read_snapshot(landing_moto, d["snapshot_id"], len(now[n])) == now[n]
            assert landing_moto.blocks_sent(d["snapshot_id"]) == differing_blocks(before[n], now[n])
        # The store keeps the landed run as the next incremental's base, and nothing else.
        packs = _packs(env, landing_moto)
        assert packs == _referenced(env, run["server_id"], run["id"])
        states = {r["id"]: r["state"] for r in ok_json(env, "runs", "web-1")}
        assert [states[r] for r in runs[:-1]] == ["DELETED"] * (len(runs) - 1)
        assert states[run["id"]] == "COMPLETED"
        before = now
    # The landed AMIs of the released runs still read back (they live in EBS now).
    first = landing_of(env, runs[0])
    assert first["state"] == "LANDED"
