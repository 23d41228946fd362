"""`connector check` through the command: one table of check, result and fix, and
`--json`; each problem of a live setup is its own failure with its fix, and the
exit status is 0 only when every check passes.

Against the simulator (which can withhold privileges) and moto_server (S3 and KMS).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import json
import os
from pathlib import Path
from typing import Any

import pytest

from connector.policies import VCENTER_PRIVILEGES
from tests.harness.ca import make_ca
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.moto import MotoServer, free_port
from tests.harness.s3faults import FaultyS3Proxy
from tests.harness.vcsim import Simulator

pytestmark = pytest.mark.integration


def results_of(env: ConnectorEnv) -> tuple[int, dict[str, dict[str, Any]]]:
    proc = env.cli("check", "--json")
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, {r["name"]: r for r in json.loads(proc.stdout)}


def encrypt_bucket(moto: MotoServer, bucket: str) -> None:
    moto.boto3_client().put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )


def test_a_healthy_setup_passes_every_check(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    encrypt_bucket(moto, s3_bucket)
    key_id = moto.boto3_client("kms").create_key()["KeyMetadata"]["KeyId"]
    env = write_config(
        tmp_path / "c", vcsim, moto, s3_bucket, extra=f'[store]\nkms_key_id = "{key_id}"\n'
    )
    status, results = results_of(env)
    failed = {n: r for n, r in results.items() if r["status"] == "failed"}
    assert status == 0 and not failed, failed
    expected = {
        "config",
        "secrets",
        "secrets.permissions",
        "vcenter.connect",
        "vcenter.privileges",
        "s3.permissions",
        "s3.encryption",
        "kms",
        "clock",
        "state.space",
        "audit.log",
    }
    assert {n for n, r in results.items() if r["status"] == "ok"} == expected
    assert "AES256" in results["s3.encryption"]["summary"]
    assert key_id in results["kms"]["summary"]
    assert "S3" in results["clock"]["summary"]
    human = env.cli("check")
    assert human.returncode == 0, human.stdout + human.stderr
    header = next(line for line in human.stdout.splitlines() if "check" in line)
    assert "result" in header and "fix" in header
    assert "every check passed" in human.stdout


def test_each_problem_is_its_own_failure_with_its_fix(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    """A missing privilege, a bucket without default encryption, an unreachable KMS and
    a world-readable secret: four failures, four fixes, exit 1."""
    vcsim.add_vm("check-vm", [1024 * 1024])  # privileges on VMs are checked on each VM
    closed = free_port()  # nothing listens there
    env = write_config(
        tmp_path / "c",
        vcsim,
        moto,
        s3_bucket,
        extra=(
            "[store]\n"
            'kms_key_id = "alias/connector-check"\n'
            f'kms_endpoint_url = "https://127.0.0.1:{closed}"\n'
        ),
    )
    secret = env.workdir / "s3-secret"
    secret.chmod(0o644)
    withheld = "VirtualMachine.State.CreateSnapshot"
    vcsim.grant_only(sorted(set(VCENTER_PRIVILEGES) - {withheld}))
    try:
        status, results = results_of(env)
        human = env.cli("check", env={"COLUMNS": "400"})
    finally:
        vcsim.grant_all()
    assert status == 1
    failed = {n for n, r in results.items() if r["status"] == "failed"}
    assert failed == {"vcenter.privileges", "s3.encryption", "kms", "secrets.permissions"}

    privileges = results["vcenter.privileges"]
    assert privileges["missing"] == [withheld]
    assert "docs/permissions.md" in privileges["fix"]

    encryption = results["s3.encryption"]
    assert "no default encryption" in encryption["summary"]
    assert encryption["fix"].startswith(f"aws s3api put-bucket-encryption --bucket {s3_bucket} ")
    rules = json.loads(encryption["fix"].split("'")[1])
    assert rules == {"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}

    kms = results["kms"]
    assert f"127.0.0.1:{closed}" in kms["summary"] + kms["fix"]
    assert kms["fix"]

    permissions = results["secrets.permissions"]
    assert str(secret) in permissions["summary"]
    assert permissions["fix"] == f"chmod 600 {secret}"
    assert any("0644" in d for d in permissions["details"])

    # the others still pass: one failure does not hide or fail them
    for name in ("config", "secrets", "vcenter.connect", "s3.permissions", "clock"):
        assert results[name]["status"] == "ok", results[name]

    assert human.returncode == 1
    rows = human.stdout
    assert f"chmod 600 {secret}" in rows
    assert "aws s3api put-bucket-encryption" in rows
    assert "4 check(s) failed" in rows
    # no secret in either output
    assert moto.secret_key not in human.stdout + json.dumps(results)
    assert vcsim.password not in human.stdout + json.dumps(results)

    # the fix fixes it
    secret.chmod(0o600)
    encrypt_bucket(moto, s3_bucket)
    status, results = results_of(env)
    assert results["secrets.permissions"]["status"] == "ok"
    assert results["s3.encryption"]["status"] == "ok"
    assert results["vcenter.privileges"]["status"] == "ok"
    assert status == 1 and results["kms"]["status"] == "failed"  # still unreachable


def test_a_credential_outside_systemd_is_named_not_read(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    """A `credential:` secret without $CREDENTIALS_DIRECTORY: the permissions check says
    systemd keeps it, and the secrets check says how to run as the service does."""
    env = write_config(
        tmp_path / "c", vcsim, moto, s3_bucket, vcenter={"password_file": "credential:vcenter"}
    )
    assert "CREDENTIALS_DIRECTORY" not in os.environ
    proc = env.cli("check", "--json")
    assert proc.returncode == 1
    results = {r["name"]: r for r in json.loads(proc.stdout)}
    perms = results["secrets.permissions"]
    assert any("systemd credential" in d for d in perms["details"])
    secrets = results["secrets"]
    assert secrets["status"] == "failed"
    assert "CREDENTIALS_DIRECTORY" in secrets["summary"]
    assert "systemd-run" in secrets["fix"] and "--credentials-dir" in secrets["fix"]
    # any command that needs the secret says the same, and exits 2 (a config error)
    vms = env.cli("vms")
    assert vms.returncode == 2
    assert "$CREDENTIALS_DIRECTORY is not set" in vms.stderr
    assert "LoadCredential=vcenter:/etc/connector/credentials/vcenter" in vms.stderr
    assert "connector --credentials-dir /etc/connector/credentials" in vms.stderr


def test_credentials_dir_reads_credentials_as_the_service_does(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    env = write_config(
        tmp_path / "c", vcsim, moto, s3_bucket, vcenter={"password_file": "credential:vcenter"}
    )
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "vcenter").write_text(vcsim.password + "\n")
    (creds / "vcenter").chmod(0o600)
    proc = env.cli("--credentials-dir", str(creds), "check", "--json", "--only", "secrets")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)[0]["status"] == "ok"
    proc = env.cli("--credentials-dir", str(creds), "check", "--only", "vcenter.connect")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    missing = env.cli("--credentials-dir", str(tmp_path / "nowhere"), "check")
    assert missing.returncode == 2
    assert "--credentials-dir" in missing.stderr and "is not a folder" in missing.stderr


def test_an_untrusted_vcenter_certificate_fails_with_its_fix(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    other = make_ca(tmp_path / "other-ca")  # did not sign the simulator's certificate
    env = write_config(
        tmp_path / "c", vcsim, moto, s3_bucket, vcenter={"ca_file": str(other.cert_file)}
    )
    status, results = results_of(env)
    assert status == 1
    connect = results["vcenter.connect"]
    assert connect["status"] == "failed"
    assert "not trusted" in connect["summary"] or "certificate" in connect["summary"]
    assert connect["fix"], connect
    assert results["vcenter.privileges"]["status"] == "failed"  # the same login, refused
    assert results["s3.permissions"]["status"] == "ok"  # the others still run


def test_a_skewed_clock_fails_the_clock_check(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str, faulty_s3: FaultyS3Proxy
) -> None:
    """S3 answers with a Date 7 minutes ahead of this machine (the proxy's skewed clock)."""
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket, s3={"endpoint_url": faulty_s3.url})
    assert results_of(env)[1]["clock"]["status"] == "ok"
    faulty_s3.date_offset = 7 * 60
    proc = env.cli("check", "--json", "--only", "clock")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (clock,) = json.loads(proc.stdout)
    assert clock["status"] == "failed"
    assert "behind S3" in clock["summary"]
    assert "NTP" in clock["fix"]


def test_a_refused_encryption_read_names_the_missing_permission(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str, faulty_s3: FaultyS3Proxy
) -> None:
    """S3 answers GetBucketEncryption with 403: the check names the permission to grant."""
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket, s3={"endpoint_url": faulty_s3.url})
    faulty_s3.inject("GET", "encryption", status=403, code="AccessDenied", times=None)
    proc = env.cli("check", "--json", "--only", "s3.encryption")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (result,) = json.loads(proc.stdout)
    assert result["status"] == "failed"
    assert "was refused (HTTP 403)" in result["summary"]
    assert "allow s3:GetEncryptionConfiguration on the bucket" in result["fix"]


def test_the_proxy_moves_the_date_header(
    moto: MotoServer, s3_bucket: str, faulty_s3: FaultyS3Proxy
) -> None:
    """The harness extension the clock test relies on."""
    client = dataclasses.replace(moto, endpoint_url=faulty_s3.url).boto3_client()

    def server_date() -> dt.datetime:
        head = client.head_bucket(Bucket=s3_bucket)
        return email.utils.parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])

    before = server_date()
    faulty_s3.date_offset = -3600
    moved = server_date()
    assert 3500 <= (before - moved).total_seconds() <= 3700
