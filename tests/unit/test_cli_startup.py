"""`connector --version` and `connector --help` start without the heavy libraries: the
adapters (boto3, pyVmomi, SQLAlchemy) and the config's validation (pydantic) are
imported by the commands that use them, when they run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("boto3", "botocore", "pyVmomi", "sqlalchemy", "pydantic", "huey", "prometheus_client")


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `python -X importtime -m connector ARGS`; the modules it imported."""
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "connector", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    return proc, modules


@pytest.mark.parametrize("args", [("--version",), ("--help",), ("jobs", "--help")])
def test_version_and_help_import_no_sdk(args: tuple[str, ...]) -> None:
    proc, modules = imported_modules(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "connector.cli" in modules  # the measurement sees the CLI's imports
    heavy = set(HEAVY)
    if args[0] == "jobs":
        heavy.discard("pydantic")  # typer itself validates a subcommand's options with it
    assert not {m for m in modules if m.split(".")[0] in heavy}
    if args == ("--version",):
        assert proc.stdout.strip()[0].isdigit()
    else:
        assert "Usage" in proc.stdout


def test_a_command_that_needs_the_config_still_loads_it(tmp_path) -> None:
    proc, modules = imported_modules("vms", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2
    assert "config file" in proc.stderr and "does not exist" in proc.stderr
    assert "pydantic" in modules  # loaded when the command ran
