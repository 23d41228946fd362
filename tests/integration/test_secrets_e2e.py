"""End to end: after replication, restore (and every other command) with debug
logging everywhere, the vCenter password, the AWS secret key and the local store
key appear in no log line, no error message, no audit record, no S3 object key,
tag, metadata or content, and not in the state database. Every object in the
bucket reports server-side encryption, and the audit chain verifies.

Secrets come from where production takes them: the vCenter password from a
systemd credential ($CREDENTIALS_DIRECTORY), the AWS secret key from an
environment variable, the store key from its 0600 file.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from connector.audit import read_records, verify
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.moto import MotoServer
from tests.harness.vcsim import Simulator

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
S3_SECRET_ENV = "CONNECTOR_E2E_S3_SECRET"


def bucket_objects(moto: MotoServer, bucket: str) -> list[dict[str, Any]]:
    """Every object with its key, metadata, tags, encryption and content."""
    s3 = moto.boto3_client()
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            head = s3.head_object(Bucket=bucket, Key=key)
            found.append(
                {
                    "key": key,
                    "metadata": head.get("Metadata", {}),
                    "sse": head.get("ServerSideEncryption"),
                    "kms_key": head.get("SSEKMSKeyId"),
                    "tags": s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"],
                    "content": s3.get_object(Bucket=bucket, Key=key)["Body"].read(),
                }
            )
    return found


@pytest.fixture
def setup(
    tmp_path: Path,
    vcsim: Simulator,
    moto: MotoServer,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[ConnectorEnv, dict[str, str], str]:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "vcenter-password").write_text(vcsim.password + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv(S3_SECRET_ENV, moto.secret_key)
    kms_arn = moto.boto3_client("kms").create_key(Description="staging")["KeyMetadata"]["Arn"]
    env = write_config(
        tmp_path / "connector",
        vcsim,
        moto,
        s3_bucket,
        vcenter={"password_file": "credential:vcenter-password"},
        s3={
            "secret_access_key_file": None,
            "secret_access_key_env": S3_SECRET_ENV,
            "sse": "aws:kms",
            "kms_key_id": kms_arn,
        },
        extra='[log]\nlevel = "debug"\nlibrary_level = "debug"\njson = true\n',
    )
    # The secret file write_config leaves beside the config is not used by this config.
    (env.workdir / "s3-secret").unlink()
    secrets = {"vCenter password": vcsim.password, "AWS secret key": moto.secret_key}
    return env, secrets, kms_arn


def test_no_secret_reaches_logs_audit_or_s3(
    setup: tuple[ConnectorEnv, dict[str, str], str],
    vcsim: Simulator,
    moto: MotoServer,
    tmp_path: Path,
) -> None:
    env, secrets, kms_arn = setup
    rng = random.Random(7)
    uuid = vcsim.add_vm("secret-e2e", [8 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    for _ in range(3):
        vcsim.write(uuid, key, rng.randrange(0, 7 * MiB), rng.randbytes(rng.randrange(1, 64_000)))
    expected = hashlib.sha256(vcsim.read_disk(uuid, key)).hexdigest()

    outputs: list[subprocess.CompletedProcess[str]] = []

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = env.cli(*args)
        outputs.append(proc)
        assert (proc.returncode == 0) == ok, (args, proc.stdout[-2000:], proc.stderr[-4000:])
        return proc

    first = json.loads(run("replicate", "secret-e2e", "--json").stdout)
    vcsim.write(uuid, key, 3 * MiB, b"changed" * 1000)
    expected_second = hashlib.sha256(vcsim.read_disk(uuid, key)).hexdigest()
    second = json.loads(run("replicate", "secret-e2e", "--json").stdout)
    assert (first["state"], second["state"]) == ("COMPLETED", "COMPLETED")
    assert second["disks"][0]["mode"] == "incremental"
    target = tmp_path / "restored.img"
    restored = json.loads(
        run(
            "restore", "secret-e2e", "--run", second["id"], "--disk", str(key),
            "--to", str(target), "--json",
        ).stdout
    )  # fmt: skip
    assert restored["sha256"] == expected_second != expected
    # An error path prints a message too.
    run("restore", "secret-e2e", "--run", "r-20000101T000000000Z-00000000", "--disk", str(key),
        "--to", str(tmp_path / "x.img"), ok=False)  # fmt: skip
    run("check", "--only", "secrets", "--only", "vcenter.connect", "--only", "s3.permissions")
    # purge: add `run("purge", ...)` here when the command exists.

    store_key = (env.workdir / "state" / "store.key").read_text().strip()
    secrets["local store key"] = store_key
    logs = "".join(p.stdout + p.stderr for p in outputs)
    assert '"level": "debug"' in logs and '"logger": "botocore' in logs  # really at debug
    audit_file = env.workdir / "state" / "audit.jsonl"
    audit_text = audit_file.read_text() + audit_file.with_name("audit.jsonl.head").read_text()
    state_db = (env.workdir / "state" / "state.db").read_bytes()
    objects = bucket_objects(moto, env.bucket)
    assert len(objects) >= 6  # config, packs, manifests, commits

    for what, secret in secrets.items():
        assert secret not in logs, f"{what} in a log line or message"
        assert secret not in audit_text, f"{what} in the audit log"
        assert secret.encode() not in state_db, f"{what} in the state database"
        for obj in objects:
            assert secret not in obj["key"], f"{what} in an object key"
            assert secret not in json.dumps(obj["metadata"]), f"{what} in object metadata"
            assert secret not in json.dumps(obj["tags"]), f"{what} in object tags"
            assert secret.encode() not in obj["content"], f"{what} in object content"

    # Every object reports server-side encryption with the configured key.
    for obj in objects:
        assert obj["sse"] == "aws:kms" and obj["kms_key"] == kms_arn, obj["key"]
    # Object keys carry opaque ids, never the VM's name.
    assert not any("secret-e2e" in obj["key"] for obj in objects)

    # The audit trail: a config load per command, both runs, the restores; it verifies.
    assert verify(audit_file).ok
    records = read_records(audit_file)
    actions = [(r["action"], r["outcome"]) for r in records]
    assert actions.count(("config.load", "success")) == len(outputs)
    assert actions.count(("run.start", "started")) == 2
    assert actions.count(("run.finish", "success")) == 2
    assert actions.count(("restore", "success")) == 1
    assert actions.count(("restore", "failure")) == 1
    assert all(r["object"] == f"vm {uuid}" for r in records if r["action"].startswith("run."))
    finished = [r for r in records if r["action"] == "run.finish"]
    assert [r["details"]["run"] for r in finished] == [first["id"], second["id"]]
