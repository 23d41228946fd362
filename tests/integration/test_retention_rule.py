"""One retention rule, through the command: a VM keeps its own setting (set by
`jobs create/update --retention N` or by `connector retention VM N`, the same
value), else `[retention] keep` (default 0: all). `jobs show` and `connector
retention` always agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.moto import MotoServer
from tests.harness.vcsim import Simulator

pytestmark = pytest.mark.integration


def keeps(env: ConnectorEnv, vm: str) -> tuple[Any, Any, Any, Any]:
    """(jobs show's retention, its source, connector retention's keep, its source)."""
    job = env.cli_json("jobs", "show", vm)
    (setting,) = env.cli_json("retention", vm)
    return job["retention"], job["retention_from"], setting["keep"], setting["source"]


def test_a_job_and_the_vm_setting_are_one_retention(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    vcsim.add_vm("rule-a", [1024 * 1024])
    vcsim.add_vm("rule-b", [1024 * 1024])
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket, extra="[retention]\nkeep = 3\n")
    env.cli("jobs", "create", "rule-a", "--frequency", "12", check=True)
    assert keeps(env, "rule-a") == (3, "default", 3, "default")

    env.cli("jobs", "update", "rule-a", "--retention", "2", check=True)
    assert keeps(env, "rule-a") == (2, "vm", 2, "vm")

    env.cli("retention", "rule-a", "4", check=True)
    assert keeps(env, "rule-a") == (4, "vm", 4, "vm")
    assert "keeps 4 runs" in env.cli("jobs", "show", "rule-a", check=True).stdout

    env.cli("retention", "rule-a", "--reset", check=True)
    assert keeps(env, "rule-a") == (3, "default", 3, "default")

    env.cli("jobs", "create", "rule-b", "--run-once", "--retention", "0", check=True)
    assert keeps(env, "rule-b") == (0, "vm", 0, "vm")  # 0 keeps all, here too
    assert "keeps all runs" in env.cli("jobs", "show", "rule-b", check=True).stdout

    bad = env.cli("jobs", "update", "rule-b", "--retention", "-1")
    assert bad.returncode == 2 and "or 0 to keep all" in bad.stderr


def test_without_settings_every_run_is_kept(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    vcsim.add_vm("rule-c", [1024 * 1024])
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket)
    env.cli("jobs", "create", "rule-c", "--frequency", "6", check=True)
    assert keeps(env, "rule-c") == (0, "default", 0, "default")
    assert "keeps all runs" in env.cli("jobs", "show", "rule-c", check=True).stdout
