"""A [fleet] section the connector cannot use is refused as a user meets it: `connector
fleet status` exits 2 with the message of docs/troubleshooting.md, and no password given
in the config ever shows in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SECRET = "db-Pa55word-fleet-refused-0123"
BASE = """
[vcenter]
url = "https://vc.example/sdk"
user = "svc@vsphere.local"
password_env = "VC_PASSWORD"

[s3]
bucket = "staging-bucket"

[state]
path = "state/state.db"

[fleet]
{fleet}
"""


def fleet_status(tmp_path: Path, fleet: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "connector.toml"
    config.write_text(BASE.format(fleet=fleet))
    env = {**os.environ, "CONNECTOR_CONFIG": str(config), "COLUMNS": "200", "DB_PW": SECRET}
    env.pop("CREDENTIALS_DIRECTORY", None)
    return subprocess.run(
        [sys.executable, "-m", "connector", "fleet", "status"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(
    ("fleet", "message"),
    [
        (
            'database_url = "postgresql://connector@:5432/fleet"',
            "[fleet] database_url has no host name",
        ),
        (
            'database_url = "postgresql://connector@db.example:0/fleet"',
            "[fleet] database_url has a port out of range",
        ),
        (
            'database_url = "postgresql://connector@db.example:99999/fleet"',
            "[fleet] database_url cannot be read: Port out of range 0-65535",
        ),
        (
            'database_url = "postgresql://connector@db.example/fleet"\n'
            'password_file = "db-password"\npassword_env = "DB_PW"',
            "[fleet] takes password_file or password_env, not both",
        ),
        (
            f'database_url = "postgresql://connector:{SECRET}@db.example/fleet"',
            "[fleet] database_url must not carry a password; remove it from the URL and put "
            "it in password_file (a file or credential:NAME) or password_env",
        ),
    ],
)
def test_a_fleet_section_that_cannot_be_used_is_refused(
    tmp_path: Path, fleet: str, message: str
) -> None:
    (tmp_path / "db-password").write_text(SECRET + "\n")
    proc = fleet_status(tmp_path, fleet)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    stderr = " ".join(proc.stderr.split())
    assert message in stderr, stderr
    assert "Traceback" not in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
