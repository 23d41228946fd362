"""`connector run` as a process: a job's retention that cannot run when its run completes
(another purge holds the state database's purge guard) is recorded, shown by
`connector jobs show`, and tried again until it is applied; two jobs that finish
together both get theirs."""

from __future__ import annotations

import fcntl
import os
import random
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.daemon import job_doc, start_daemon, wait_for
from tests.integration.store_helpers import MiB, app_for, objects, replicate, write_blocks

pytestmark = pytest.mark.integration

FAST = """
[daemon]
sync_interval = 0.3
admission_interval = 0.3
discovery_interval = 3600
retry_backoff = 0.1
retry_backoff_max = 2
retention_retry_backoff = 0.5
shutdown_deadline = 10
"""


def commits(moto: Any, env: ConnectorEnv, server_id: str) -> list[str]:
    """The run ids with a commit object in the store, for one server."""
    return sorted(
        key.split("/")[-2]
        for key in objects(moto, env.bucket)
        if key.startswith(f"{env.prefix}/runs/{server_id}/") and key.endswith("/commit")
    )


def test_two_jobs_finishing_while_the_purge_guard_is_busy_both_get_their_retention(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket, extra=FAST)
    rng = random.Random(12)
    keep = {"ret-one": 1, "ret-three": 3}
    servers = {}
    app = app_for(env)
    try:
        for name, n in keep.items():
            uuid = vcsim.add_vm(name, [8 * MiB])
            (key,) = vcsim.disk_keys(uuid)
            for i in range(n + 1):  # one more committed run than the job keeps
                write_blocks(vcsim, uuid, key, {i: rng.randbytes(MiB)})
                servers[name] = replicate(app, uuid).server_id
    finally:
        app.close()
    for name, n in keep.items():
        assert len(commits(moto, env, servers[name])) == n + 1
        created = env.cli_json("jobs", "create", name, "--run-once", "--retention", str(n))
        assert created["retention_pending"] is None

    # Another purge holds the guard while both runs complete.
    guard = os.open(tmp_path / "c" / "state" / "purge.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(guard, fcntl.LOCK_EX)
    daemon = start_daemon(env)
    try:
        daemon.wait_ready()

        def both_refused() -> dict[str, dict[str, Any]] | None:
            docs = {name: job_doc(env, name) for name in keep}
            owed = {name: d["retention_pending"] for name, d in docs.items()}
            if all(o is not None and o["attempts"] >= 2 for o in owed.values()):
                return docs
            return None

        docs = wait_for("both jobs' retention to be refused twice", both_refused, timeout=120)
        for name, doc in docs.items():
            assert [r["state"] for r in doc["runs"]] == ["COMPLETED"]
            owed = doc["retention_pending"]
            assert owed["state"] == "failed"
            assert "another purge is running" in owed["error"]
            assert owed["next_try"] > owed["since"]
            # nothing was deleted meanwhile: the new run came on top
            assert len(commits(moto, env, servers[name])) == keep[name] + 2
        # what a user sees
        shown = env.cli("jobs", "show", "ret-one")
        assert shown.returncode == 0, shown.stderr
        text = " ".join(shown.stdout.split())
        assert "retention not applied" in text and "another purge is running" in text
        shown_json = env.cli_json("jobs", "show", "ret-three")
        assert shown_json["retention_pending"]["state"] == "failed"

        # The guard is free again: both retentions are applied by the retry.
        fcntl.flock(guard, fcntl.LOCK_UN)

        def settled() -> bool:
            return all(job_doc(env, name)["retention_pending"] is None for name in keep)

        wait_for("both jobs' retention to be applied", settled, timeout=120)
    finally:
        os.close(guard)
        assert daemon.terminate() == 0, daemon.log()
    for name, n in keep.items():
        left = commits(moto, env, servers[name])
        assert len(left) == n, (name, left)
        runs = env.cli_json("runs", name)
        assert [r["state"] for r in runs] == ["DELETED"] * 2 + ["COMPLETED"] * n
        assert left == sorted(r["id"] for r in runs if r["state"] == "COMPLETED")
    assert "retention could not be applied; it is tried again" in daemon.log()
