"""The `connector` command's own options and output, met as a user meets them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from connector import __version__
from tests.harness.connector_env import ConnectorEnv, write_config

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> ConnectorEnv:
    return write_config(tmp_path / "connector", vcsim, moto, s3_bucket)


def test_version_prints_the_version_and_exits_0(env: ConnectorEnv) -> None:
    proc = env.cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == __version__
    assert "Missing command" not in proc.stderr
