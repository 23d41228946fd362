"""The demo's ready environment: `--up` leaves the simulator and the local S3
endpoint running with a config, the README's commands work against it as
processes, and `--down` stops every process by its pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.demo import REPO, _alive

pytestmark = pytest.mark.integration


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.harness.demo", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def connector(config: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "CONNECTOR_CONFIG": config, "COLUMNS": "200"},
    )  # fmt: skip


def test_up_leaves_a_ready_environment_and_down_stops_it(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    started = demo("--up", "--dir", str(folder))
    ready_file = folder / "demo.json"
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        ready = json.loads(ready_file.read_text())
        config = ready["config"]
        assert f"export CONNECTOR_CONFIG={config}" in started.stdout
        assert "[vcenter]" in started.stdout  # the config is printed
        assert f"--down --dir {folder}" in started.stdout
        pids = [ready["pid"], ready["simulator_pid"], ready["s3_pid"]]
        assert all(_alive(p) for p in pids)
        assert int((folder / "demo.pid").read_text()) == ready["pid"]

        again = demo("--up", "--dir", str(folder))
        assert again.returncode == 2 and "already running" in again.stderr

        check = connector(config, "check")
        assert check.returncode == 0, check.stdout + check.stderr
        vms = connector(config, "vms")
        assert vms.returncode == 0 and "demo-web" in vms.stdout, vms.stderr
        run = connector(config, "replicate", "demo-web")
        assert run.returncode == 0, run.stdout + run.stderr
        runs = json.loads(connector(config, "runs", "demo-web", "--json").stdout)
        assert [r["state"] for r in runs] == ["COMPLETED"]
    finally:
        stopped = demo("--down", "--dir", str(folder))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "stopped the demo environment" in stopped.stdout
    assert not any(_alive(p) for p in pids)
    assert not (folder / "demo.pid").exists()
    assert Path(config).is_file()  # the folder is kept

    gone = demo("--down", "--dir", str(folder))
    assert gone.returncode == 1 and "no demo environment is running" in gone.stderr
