"""`connector run` as a process, with S3 behind the fault-injecting proxy: a
CreateMultipartUpload whose reply is lost (S3 made the upload, its id never reached
the connector) and an abort that fails leave open uploads; the run still completes
byte-exact, and the running daemon's sweep aborts both within its configured time."""

from __future__ import annotations

import hashlib
import random
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.harness.connector_env import write_config
from tests.harness.daemon import job_doc, start_daemon, wait_for
from tests.harness.s3faults import FaultyS3Proxy

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
SWEEP_INTERVAL = 1.0
STALE_UPLOAD_AGE = 3.0
CONFIG = f"""
[retry]
attempts = 4
base_delay = 0.05
max_delay = 0.2

[daemon]
sync_interval = 0.3
admission_interval = 0.3
discovery_interval = 3600
retry_backoff = 0.1
shutdown_deadline = 10
sweep_interval = {SWEEP_INTERVAL}
stale_upload_age = {STALE_UPLOAD_AGE}
"""


def open_uploads(moto: Any, bucket: str) -> list[dict[str, Any]]:
    """ListMultipartUploads straight on moto_server (not through the proxy)."""
    return list(moto.boto3_client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def upload_id_of(path: str) -> str:
    return parse_qs(urlsplit(path).query)["uploadId"][0]


def test_uploads_left_by_a_lost_reply_and_a_failed_abort_are_aborted_while_running(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str, faulty_s3: FaultyS3Proxy
) -> None:
    env = write_config(
        tmp_path / "c",
        vcsim,
        moto,
        s3_bucket,
        s3={
            "endpoint_url": faulty_s3.url,
            "multipart_threshold": 5 * MiB,
            "multipart_part_size": 5 * MiB,
        },
        extra=CONFIG,
    )
    name = "mpu-sweep"
    uuid = vcsim.add_vm(name, [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    # 8 MiB that do not compress: one pack above the multipart threshold
    vcsim.write(uuid, key, 2 * MiB, random.Random(5).randbytes(8 * MiB))
    expected = hashlib.sha256(vcsim.read_disk(uuid, key)).hexdigest()
    env.cli_json("jobs", "create", name, "--run-once")
    # 1st upload: S3 makes it, the reply is lost. 2nd: a part fails, and so does its
    # abort. 3rd: completes.
    faulty_s3.inject("POST", "?uploads", drop_reply=True, times=1)
    faulty_s3.inject("PUT", "partNumber=", status=500, times=1)
    faulty_s3.inject("DELETE", "uploadId=", status=500, times=1)
    daemon = start_daemon(env)
    try:
        daemon.wait_ready()
        doc = wait_for(
            "the run to end",
            lambda: (
                (d := job_doc(env, name))["runs"]
                and d["runs"][0]["state"] in ("COMPLETED", "FAILED")
                and d
            ),
            timeout=120,
        )
        ended = time.monotonic()
        (run,) = doc["runs"]
        assert run["state"] == "COMPLETED", run["error"]
        creates = faulty_s3.requests("POST", "?uploads")
        assert [c.outcome for c in creates] == [
            "forwarded 200, reply dropped",
            "forwarded 200",
            "forwarded 200",
        ]
        (lost_reply,) = faulty_s3.dropped_replies
        lost = re.search(rb"<UploadId>([^<]+)</UploadId>", lost_reply)
        assert lost is not None
        lost_id = lost.group(1).decode()
        refused = faulty_s3.requests("DELETE", "uploadId=")[0]
        assert refused.outcome == "injected 500"
        unaborted_id = upload_id_of(refused.path)

        # no multipart upload is left open, within the sweep's time, while it runs
        limit = STALE_UPLOAD_AGE + 2 * SWEEP_INTERVAL + 10
        wait_for(
            "every multipart upload to be aborted",
            lambda: not open_uploads(moto, s3_bucket),
            timeout=limit,
        )
        assert time.monotonic() - ended <= limit
        assert daemon.proc.poll() is None  # not by a restart
        aborted = {
            upload_id_of(d.path)
            for d in faulty_s3.requests("DELETE", "uploadId=")
            if d.outcome.startswith("forwarded 2")
        }
        assert {lost_id, unaborted_id} <= aborted
    finally:
        assert daemon.terminate() == 0, daemon.log()
    log = daemon.log()
    assert "multipart uploads aborted" in log
    out = tmp_path / "restored.img"
    restored = env.cli_json(
        "restore", name, "--run", run["id"], "--disk", str(key), "--to", str(out)
    )
    assert restored["sha256"] == expected
    assert hashlib.sha256(out.read_bytes()).hexdigest() == expected
