"""The bucket read raw with boto3: no plaintext, and no VM name in keys, tags or metadata.

The store uses the KMS key provider here (the local key file is covered by the
other tests), and holds every kind of object: config, packs, manifests, run
records, the server record (which holds the VM's name and instance UUID, sealed),
a run lock and a condemned-packs record.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

import pytest

from connector.store.repository import RunLock
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.integration.store_helpers import (
    MiB,
    app_for,
    disk_sha,
    replicate,
    restore_sha,
    write_blocks,
)

pytestmark = pytest.mark.integration

CANARY = b"CANARY-7f3a9-THIS-PLAINTEXT-MUST-NEVER-REACH-THE-BUCKET"
VM_NAME = "payroll-ledger-vm-zq7"


def test_bucket_holds_no_plaintext_and_no_vm_name(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    kms = moto.boto3_client("kms")
    key_id = kms.create_key(Description="plaintext test")["KeyMetadata"]["KeyId"]
    env: ConnectorEnv = write_config(
        tmp_path / "connector",
        vcsim,
        moto,
        s3_bucket,
        extra=f'[store]\nkms_key_id = "{key_id}"\n',
    )
    rng = random.Random(61)
    uuid = vcsim.add_vm(VM_NAME, [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    # the canary in a block of its own, repeated (compressible), and inside random data
    write_blocks(vcsim, uuid, key, {0: CANARY * (MiB // len(CANARY))})
    noisy = bytearray(rng.randbytes(MiB))
    noisy[4096 : 4096 + len(CANARY)] = CANARY
    write_blocks(vcsim, uuid, key, {5: bytes(noisy)})
    app = app_for(env)
    try:
        first = replicate(app, uuid)
        # run 2 rewrites both blocks of run 1 (so purge condemns run 1's pack), adds one
        changes = {0: rng.randbytes(MiB), 5: rng.randbytes(MiB), 7: CANARY + rng.randbytes(5000)}
        write_blocks(vcsim, uuid, key, changes)
        second = replicate(app, uuid)
        assert restore_sha(app, second, key, tmp_path / "r.img") == disk_sha(vcsim, uuid, key)
        # a lock of a run in flight, and a purge that condemns run 1's pack while it waits
        repo = app.repository()
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        in_flight = "r-20260101T000000000Z-00f11e00"
        repo.write_lock(RunLock(in_flight, second.server_id, now, "connector-host", 4242))
    finally:
        app.close()
    report = env.cli_json("purge", VM_NAME, "--keep", "1")
    assert report["retention"][0]["deleted"] == [first.id]
    assert report["gc"]["condemned"] and report["gc"]["pending"]

    s3 = moto.boto3_client()
    listed = s3.list_objects_v2(Bucket=s3_bucket)["Contents"]
    keys = [o["Key"] for o in listed]
    kinds = {k.split("/")[1] for k in keys}
    assert kinds == {"config", "servers", "packs", "runs", "locks", "condemned"}, kinds
    config = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"{env.prefix}/config")["Body"].read())
    assert config["key"]["provider"] == "kms"
    master = kms.decrypt(
        CiphertextBlob=base64.b64decode(config["key"]["wrapped"]),
        EncryptionContext={"store": config["store_id"]},
    )["Plaintext"]
    secrets = [CANARY, CANARY[:24], VM_NAME.encode(), uuid.encode(), master]
    for k in keys:
        assert VM_NAME not in k and uuid not in k and "payroll" not in k
        obj = s3.get_object(Bucket=s3_bucket, Key=k)
        body = obj["Body"].read()
        for secret in secrets:
            assert secret not in body, (k, secret[:16])
        meta = json.dumps(obj.get("Metadata", {}))
        tags = json.dumps(s3.get_object_tagging(Bucket=s3_bucket, Key=k).get("TagSet", []))
        for text in (meta, tags):
            assert VM_NAME not in text and uuid not in text
        assert obj.get("ServerSideEncryption") == "AES256"
