"""A job's landing settings (as AWS SMS had them) through `connector jobs`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.fixtures_landing import LandingMoto
from tests.harness.landing_env import make_env
from tests.integration.test_landing_e2e import cli, ok_json

pytestmark = pytest.mark.integration


def test_job_landing_settings_are_set_shown_changed_and_checked(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    env = make_env(tmp_path, landing_moto, landing={"mode": "never", "keep_amis": 5})
    job = ok_json(env, "jobs", "create", "web-1", "--frequency", "6")
    assert job["landing"]["mode"] == "never" and job["landing"]["keep_amis"] == 5  # defaults
    job = ok_json(
        env,
        "jobs",
        "update",
        job["id"],
        "--land",
        "every",
        "--keep-amis",
        "2",
        "--license-type",
        "aws",
        "--role-name",
        "landing-role",
        "--staging",
        "replica",
    )
    assert job["landing"] == {
        "mode": "every",
        "license_type": "AWS",
        "encrypted": True,
        "kms_key_id": None,
        "role_name": "landing-role",
        "keep_amis": 2,
        "staging": "replica",
    }
    shown = ok_json(env, "jobs", "show", job["id"])
    assert shown["landing"]["keep_amis"] == 2
    job = ok_json(env, "jobs", "update", job["id"], "--role-name", "", "--no-encrypted")
    assert job["landing"]["role_name"] is None and job["landing"]["encrypted"] is False
    for args, says in (
        (("--keep-amis", "0"), "keep 0 AMIs is out of range"),
        (("--land", "sometimes"), "landing 'sometimes' is not one of every, on-demand, never"),
        (("--staging", "forever"), "staging 'forever' is not one of temporary, replica"),
        (("--role-name", "bad role!"), "is not an IAM role name"),
        (("--kms-key-id", "k-1"), "a KMS key id needs encrypted snapshots"),
    ):
        proc = cli(env, "jobs", "update", job["id"], *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert says in " ".join(proc.stderr.split()), (args, proc.stderr)
    assert ok_json(env, "jobs", "show", job["id"])["landing"]["keep_amis"] == 2  # unchanged
