"""Landing errors through `connector land`: a missing EBS permission and an unknown KMS
key fail clearly and lose nothing; EBS throttling is retried."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness.fixtures_landing import LandingMoto
from tests.harness.landing_env import LandingEnv, MiB, make_env, read_snapshot
from tests.integration.test_landing_e2e import cli, landing_of, ok_json

pytestmark = pytest.mark.integration


def _replicated(tmp_path: Path, moto: LandingMoto, **landing: object) -> tuple[LandingEnv, str]:
    env = make_env(tmp_path, moto, landing={"mode": "on-demand", **landing})
    env.write(0, 0, os.urandom(2 * MiB))
    env.write(1, 0, os.urandom(MiB))
    run = ok_json(env, "replicate", "web-1")
    return env, str(run["id"])


def _landed_exactly(env: LandingEnv, moto: LandingMoto, run_id: str) -> None:
    landing = landing_of(env, run_id)
    assert landing["state"] == "LANDED"
    for n, d in enumerate(landing["disks"]):
        content = env.content(n)
        assert read_snapshot(moto, d["snapshot_id"], len(content)) == content


def test_a_missing_ebs_permission_says_which_and_loses_nothing(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    env, run_id = _replicated(tmp_path, landing_moto)
    landing_moto.inject(
        "StartSnapshot",
        "AccessDeniedException",
        status=403,
        message="User is not authorized to perform: ebs:StartSnapshot",
    )
    proc = cli(env, "land", "web-1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    message = " ".join(proc.stderr.split())
    assert "ebs:StartSnapshot" in message and "connector iam-policy --landing" in message
    landing = landing_of(env, run_id)
    assert landing["state"] == "FAILED" and "ebs:StartSnapshot" in landing["error"]
    assert ok_json(env, "runs", "show", run_id)["state"] == "COMPLETED"  # the replica stays
    assert landing_moto.calls("RegisterImage") == []
    proc = cli(env, "land", "web-1")  # with the permission granted
    assert proc.returncode == 0, proc.stderr
    _landed_exactly(env, landing_moto, run_id)
    # Not on a terminal: plain lines, a closing summary with the bytes, duration and rate.
    assert "\x1b" not in proc.stderr
    summary = [line for line in proc.stderr.splitlines() if line.startswith("landed web-1 (")]
    assert summary and " sent " in summary[0] and "/s)" in summary[0], proc.stderr


def test_an_unknown_kms_key_fails_naming_the_key(tmp_path: Path, landing_moto: LandingMoto) -> None:
    server = landing_moto.server
    bogus = f"arn:aws:kms:{server.region}:123456789012:key/00000000-0000-0000-0000-000000000000"
    env, run_id = _replicated(tmp_path, landing_moto, kms_key_id=bogus)
    proc = cli(env, "land", "web-1")
    assert proc.returncode == 1
    message = " ".join(proc.stderr.split())
    assert bogus in message and "KMS key" in message and "key policy" in message
    assert landing_of(env, run_id)["state"] == "FAILED"
    assert landing_moto.calls("PutSnapshotBlock") == []
    # With a key that exists, the same run lands, encrypted with it.
    key = server.boto3_client("kms").create_key()["KeyMetadata"]["Arn"]
    text = env.config.read_text().replace(bogus, key)
    env.config.write_text(text)
    assert cli(env, "land", "web-1").returncode == 0
    _landed_exactly(env, landing_moto, run_id)
    snap = landing_of(env, run_id)["disks"][0]["snapshot_id"]
    described = server.boto3_client("ec2").describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]
    assert described["Encrypted"] is True and described["KmsKeyId"] == key


def test_ebs_throttling_is_retried(tmp_path: Path, landing_moto: LandingMoto) -> None:
    env, run_id = _replicated(tmp_path, landing_moto)
    landing_moto.inject("PutSnapshotBlock", "ThrottlingException", count=2, status=429)
    landing_moto.inject("StartSnapshot", "RequestThrottledException", count=1)
    proc = cli(env, "land", "web-1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert landing_moto.pending_faults() == {}
    throttled = [c for c in landing_moto.calls() if "fault" in c]
    assert len(throttled) == 3
    _landed_exactly(env, landing_moto, run_id)


def test_throttling_that_does_not_end_fails_the_landing_clearly(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    env, run_id = _replicated(tmp_path, landing_moto)
    landing_moto.inject("CompleteSnapshot", "ThrottlingException", count=50, status=429)
    proc = cli(env, "land", "web-1")
    assert proc.returncode == 1
    message = " ".join(proc.stderr.split())
    assert "throttled" in message and "4 attempts" in message
    assert landing_of(env, run_id)["state"] == "FAILED"
    landing_moto.reset()
    assert cli(env, "land", "web-1").returncode == 0
    _landed_exactly(env, landing_moto, run_id)


def test_a_role_name_lands_with_assumed_credentials_and_no_secret_is_logged(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    from connector.adapters.ebs import EbsTarget
    from connector.secrets import Secret

    server = landing_moto.server
    target = EbsTarget(
        region=server.region,
        endpoint_url=server.endpoint_url,
        ca_file=server.ca_file,
        access_key_id=Secret(server.access_key),
        secret_access_key=Secret(server.secret_key),
        role_name="connector-landing",
    )
    try:
        creds = target.ebs._request_signer._credentials  # the clients sign as the role
        assert creds.access_key != server.access_key and creds.token
        token = creds.token
    finally:
        target.close()
    env, run_id = _replicated(tmp_path, landing_moto, role_name="connector-landing")
    env.config.write_text(env.config.read_text() + '[log]\nlevel = "debug"\n')
    proc = cli(env, "land", "web-1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _landed_exactly(env, landing_moto, run_id)
    logged = proc.stdout + proc.stderr
    assert server.secret_key not in logged
    assert token not in logged


def test_land_refuses_bad_input_clearly(tmp_path: Path, landing_moto: LandingMoto) -> None:
    env = make_env(tmp_path, landing_moto, landing={"mode": "on-demand"})
    proc = cli(env, "land", "web-1")  # nothing replicated yet
    assert proc.returncode == 1
    assert "has no COMPLETED run" in " ".join(proc.stderr.split())
    proc = cli(env, "land", "web-1", "--run", "../../etc")
    assert proc.returncode == 2, proc.stderr
    assert "run id" in proc.stderr
    proc = cli(env, "land", "no-such-vm")
    assert proc.returncode in (1, 2) and "no-such-vm" in proc.stderr
    assert landing_moto.calls() == []  # nothing reached AWS
