"""`connector check` probes the landing permissions (and says what a landed AMI needs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness.fixtures_landing import LandingMoto
from tests.harness.landing_env import make_env
from tests.integration.test_landing_e2e import cli

pytestmark = pytest.mark.integration


def _result(proc_stdout: str) -> dict[str, object]:
    results = {r["name"]: r for r in json.loads(proc_stdout)}
    found: dict[str, object] = results["aws.landing"]
    return found


def test_check_probes_the_landing_permissions(tmp_path: Path, landing_moto: LandingMoto) -> None:
    env = make_env(tmp_path, landing_moto)
    proc = cli(env, "check", "--only", "aws.landing", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = _result(proc.stdout)
    assert result["status"] == "ok", result
    assert "ENA and NVMe" in str(result["summary"])
    assert landing_moto.calls("StartSnapshot") == []  # nothing was created
    assert landing_moto.calls("RegisterImage") == []

    landing_moto.inject("PutSnapshotBlock", "AccessDeniedException", status=403)
    proc = cli(env, "check", "--only", "aws.landing", "--json")
    assert proc.returncode == 1
    result = _result(proc.stdout)
    assert result["status"] == "failed" and result["missing"] == ["ebs:PutSnapshotBlock"]
    assert "connector iam-policy --landing" in str(result["summary"])


def test_check_skips_landing_when_nothing_lands(tmp_path: Path, landing_moto: LandingMoto) -> None:
    env = make_env(tmp_path, landing_moto, landing={"mode": "never"})
    proc = cli(env, "check", "--only", "aws.landing", "--json")
    assert proc.returncode == 0
    assert _result(proc.stdout)["status"] == "skipped"
