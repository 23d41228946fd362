"""`connector replicate` as a process, against the simulator and moto_server behind the
fault-injecting proxy (tests/harness/s3faults.py): a transient S3 failure is retried
and the run completes with a byte-exact restore; a permanent one fails the run at
once, says why, and leaves nothing behind."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.s3faults import FaultyS3Proxy

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
DISK = 16 * MiB
PACKS = "/replicas/packs/"
FAST_RETRY = "[retry]\nattempts = 4\nbase_delay = 0.05\nmax_delay = 0.2\n"


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str, faulty_s3: FaultyS3Proxy) -> Any:
    return write_config(
        tmp_path / "connector",
        vcsim,
        moto,
        s3_bucket,
        s3={"endpoint_url": faulty_s3.url},
        extra=FAST_RETRY,
    )


def vm_with_data(vcsim: Any, name: str, seed: int) -> tuple[str, int, str]:
    """A VM with one small disk holding some random data: (uuid, disk key, disk sha256)."""
    rng = random.Random(seed)
    uuid = vcsim.add_vm(name, [DISK])
    (key,) = vcsim.disk_keys(uuid)
    for _ in range(6):
        length = rng.randrange(4096, 128 * 1024)
        vcsim.write(uuid, key, rng.randrange(0, DISK - length), rng.randbytes(length))
    return uuid, key, hashlib.sha256(vcsim.read_disk(uuid, key)).hexdigest()


def bucket_keys(moto: Any, bucket: str) -> list[str]:
    s3 = moto.boto3_client()
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def our_snapshots(vcsim: Any, uuid: str) -> list[str]:
    return [s for s in vcsim.snapshot_names(uuid) if s.startswith("connector-")]


def replicate_and_restore(env: ConnectorEnv, name: str, key: int, out: Path) -> Any:
    proc = env.cli("replicate", name)
    assert proc.returncode == 0, proc.stderr
    runs = env.cli_json("runs", name)
    assert [r["state"] for r in runs] == ["COMPLETED"]
    restored = env.cli_json(
        "restore", name, "--run", runs[0]["id"], "--disk", str(key), "--to", str(out)
    )
    return proc, restored


@pytest.mark.parametrize("fault", ["http-500", "connection-reset"])
def test_a_transient_s3_failure_is_retried_and_the_run_restores_byte_exact(
    fault: str, env: ConnectorEnv, vcsim: Any, faulty_s3: FaultyS3Proxy, tmp_path: Path
) -> None:
    name = f"retry-{fault}"
    uuid, key, expected = vm_with_data(vcsim, name, seed=len(fault))
    if fault == "http-500":
        faulty_s3.inject("PUT", PACKS, status=500, code="InternalError", times=1)
        first = "injected 500"
    else:
        faulty_s3.inject("PUT", PACKS, reset=True, times=1)
        first = "reset"
    out = tmp_path / "restored.img"
    proc, restored = replicate_and_restore(env, name, key, out)
    # the first pack upload failed once and was sent again, to the same key
    puts = faulty_s3.requests("PUT", PACKS)
    assert puts[0].outcome == first
    assert puts[1].path == puts[0].path and puts[1].outcome == "forwarded 200"
    assert [p.outcome for p in puts[1:]] == ["forwarded 200"] * (len(puts) - 1)
    # the retry was logged, naming what was retried and why
    retry_lines = [line for line in proc.stderr.splitlines() if "retry.again" in line]
    assert len(retry_lines) == 1, proc.stderr
    assert "packs/" in retry_lines[0] and "TransientError" in retry_lines[0]
    assert restored["sha256"] == expected
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
    assert our_snapshots(vcsim, uuid) == []


def test_a_permanent_s3_refusal_fails_the_run_at_once_and_leaves_nothing(
    env: ConnectorEnv, vcsim: Any, moto: Any, faulty_s3: FaultyS3Proxy
) -> None:
    uuid, _key, _sha = vm_with_data(vcsim, "retry-403", seed=403)
    faulty_s3.inject("PUT", PACKS, status=403, code="AccessDenied", times=None)
    proc = env.cli("replicate", "retry-403")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "AccessDenied" in proc.stderr
    assert "IAM policy" in proc.stderr  # says what to check
    assert "retry.again" not in proc.stderr
    # no pack was asked for twice: a refusal is not retried
    paths = [p.path for p in faulty_s3.requests("PUT", PACKS)]
    assert paths and len(paths) == len(set(paths))
    assert {p.outcome for p in faulty_s3.requests("PUT", PACKS)} == {"injected 403"}
    # nothing left behind: no snapshot, no pack, no run record in the store
    assert our_snapshots(vcsim, uuid) == []
    keys = bucket_keys(moto, env.bucket)
    assert not [k for k in keys if "/packs/" in k or "/runs/" in k], keys
    runs = env.cli_json("runs", "retry-403")
    assert [r["state"] for r in runs] == ["FAILED"]
    assert "AccessDenied" in (runs[0]["error"] or "")


def test_a_tunnel_reset_mid_upload_through_the_configured_proxy_is_retried(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    from tests.harness.s3faults import ResettingConnectProxy

    proxy = ResettingConnectProxy(reset_after=512 * 1024, resets=1)
    try:
        env = write_config(
            tmp_path / "connector",
            vcsim,
            moto,
            s3_bucket,
            extra=FAST_RETRY + f'\n[network]\nhttps_proxy = "{proxy.proxy_url}"\n',
        )
        uuid, key, _ = vm_with_data(vcsim, "retry-tunnel-reset", seed=7)
        # a pack of more than the threshold: 1 MiB that does not compress
        vcsim.write(uuid, key, 4 * MiB, random.Random(8).randbytes(MiB))
        expected = hashlib.sha256(vcsim.read_disk(uuid, key)).hexdigest()
        out = tmp_path / "restored.img"
        proc, restored = replicate_and_restore(env, "retry-tunnel-reset", key, out)
        assert proxy.reset_tunnels == [f"127.0.0.1:{moto.port}"]
        retry_lines = [line for line in proc.stderr.splitlines() if "retry.again" in line]
        assert len(retry_lines) == 1 and "packs/" in retry_lines[0], proc.stderr
        # a transient class (how the reset surfaces depends on where the upload was)
        assert any(
            f"error_class={c}" in retry_lines[0] for c in ("TransientError", "UnreachableError")
        )
        assert restored["sha256"] == expected
        assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
        assert our_snapshots(vcsim, uuid) == []
    finally:
        proxy.stop()


def test_a_transient_failure_of_the_access_check_before_the_snapshot_is_retried(
    env: ConnectorEnv, vcsim: Any, s3_bucket: str, faulty_s3: FaultyS3Proxy, tmp_path: Path
) -> None:
    name = "retry-head-bucket"
    uuid, key, expected = vm_with_data(vcsim, name, seed=7)
    # A first command fills the state database, so replicate's first request to S3 is
    # the access check (HeadBucket), not a look for a store to rebuild the state from.
    assert env.cli("vms").returncode == 0
    faulty_s3.inject("HEAD", f"/{s3_bucket}", status=503, code="SlowDown", times=1)
    out = tmp_path / "restored.img"
    proc, restored = replicate_and_restore(env, name, key, out)
    heads = [h for h in faulty_s3.requests("HEAD") if h.path.rstrip("/") == f"/{s3_bucket}"]
    assert heads[0].outcome == "injected 503"
    assert heads[1].outcome == "forwarded 200"
    assert any("checking access to S3" in line for line in proc.stderr.splitlines()), proc.stderr
    assert restored["sha256"] == expected
    assert our_snapshots(vcsim, uuid) == []
