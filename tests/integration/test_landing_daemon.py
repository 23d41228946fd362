"""`connector run` lands a job's runs when the job says so: the land stage runs from
the daemon's queue, after commit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv
from tests.harness.daemon import start_daemon, wait_for
from tests.harness.fixtures_landing import LandingMoto
from tests.harness.landing_env import MiB, make_env, read_snapshot
from tests.integration.test_landing_e2e import ok_json

pytestmark = pytest.mark.integration

FAST = """
[daemon]
sync_interval = 0.3
admission_interval = 0.3
discovery_interval = 3600
retry_backoff = 0.1
retry_backoff_max = 2
shutdown_deadline = 10
"""


def test_the_daemon_lands_a_jobs_run(tmp_path: Path, landing_moto: LandingMoto) -> None:
    env = make_env(tmp_path, landing_moto, landing={"mode": "never"}, extra=FAST)
    env.write(0, 0, os.urandom(MiB + 7))
    env.write(1, 2 * MiB, os.urandom(4096))
    content = [env.content(0), env.content(1)]
    ok_json(env, "jobs", "create", "web-1", "--run-once", "--land", "every", "--staging", "replica")
    daemon = start_daemon(ConnectorEnv(tmp_path, env.config, env.bucket, "replicas"))
    try:
        daemon.wait_ready()

        def landed() -> dict[str, Any] | None:
            for run in ok_json(env, "runs", "web-1"):
                if run["state"] == "COMPLETED" and (run["landing"] or {}).get("state") == "LANDED":
                    found: dict[str, Any] = run
                    return found
            return None

        run = wait_for("the job's run to be landed", landed, timeout=180, every=0.5)
    finally:
        assert daemon.terminate() == 0, daemon.log()
    landing = run["landing"]
    assert landing["image_id"].startswith("ami-")
    for n, d in enumerate(landing["disks"]):
        assert read_snapshot(landing_moto, d["snapshot_id"], len(content[n])) == content[n]
