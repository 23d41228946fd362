"""`connector init` through the command: from flags and through a pseudo-terminal,
the config it writes passes `connector check` against the simulator and
moto_server; it holds no secret, the state folder is 0700, an existing config
is kept unless --force, and a secret given in place of a reference is refused."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from connector.config import load_config
from tests.harness.moto import MotoServer
from tests.harness.pty_session import PtySession
from tests.harness.vcsim import Simulator

pytestmark = pytest.mark.integration


def connector(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.fixture
def encrypted_bucket(moto: MotoServer, s3_bucket: str) -> str:
    moto.boto3_client().put_bucket_encryption(
        Bucket=s3_bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )
    return s3_bucket


def s3_secret_file(tmp_path: Path, moto: MotoServer) -> Path:
    path = tmp_path / "secrets" / "s3-secret"
    path.parent.mkdir(mode=0o700)
    path.write_text(moto.secret_key + "\n")
    path.chmod(0o600)
    return path


def flags(vcsim: Simulator, moto: MotoServer, bucket: str, secret: Path, state: Path) -> list[str]:
    return [
        "--vcenter", vcsim.url,
        "--vcenter-user", vcsim.user,
        "--vcenter-password", f"file:{vcsim.password_file}",
        "--vcenter-ca-file", str(vcsim.ca_file),
        "--bucket", bucket,
        "--region", moto.region,
        "--endpoint-url", moto.endpoint_url,
        "--s3-ca-file", str(moto.ca_file),
        "--access-key-id", moto.access_key,
        "--secret-key", f"file:{secret}",
        "--state-dir", str(state),
    ]  # fmt: skip


def assert_no_secret(text: str, vcsim: Simulator, moto: MotoServer) -> None:
    assert vcsim.password not in text
    assert moto.secret_key not in text


def test_init_from_flags_writes_a_config_that_passes_check(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, encrypted_bucket: str
) -> None:
    config = tmp_path / "etc" / "connector.toml"
    state = tmp_path / "var" / "connector"
    secret = s3_secret_file(tmp_path, moto)
    args = flags(vcsim, moto, encrypted_bucket, secret, state)
    proc = connector("init", "--config", str(config), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every check passed" in proc.stdout
    assert f"wrote {config}" in proc.stdout

    text = config.read_text()
    assert_no_secret(text + proc.stdout + proc.stderr, vcsim, moto)
    assert text.count("\n#") >= 3  # commented
    assert f'password_file = "{vcsim.password_file}"' in text
    assert f'secret_access_key_file = "{secret}"' in text
    cfg = load_config(config)
    assert cfg.vcenter is not None and cfg.vcenter.url == vcsim.url
    assert cfg.s3 is not None and cfg.s3.bucket == encrypted_bucket
    assert cfg.state.path == state / "state.db"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    audit = (state / "audit.jsonl").read_text()
    assert '"config.init"' in audit and str(config) in audit

    # the written config passes `connector check` on its own
    check = connector("--config", str(config), "check")
    assert check.returncode == 0, check.stdout + check.stderr

    # an existing config is kept...
    before = config.read_bytes()
    again = connector("init", "--config", str(config), *args, "--no-check")
    assert again.returncode == 2
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert config.read_bytes() == before
    # ... unless --force, and then the old one is kept beside it
    forced = connector("init", "--config", str(config), *args, "--force", "--no-check")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "etc" / "connector.toml.bak").read_bytes() == before


def test_init_ends_with_the_check_and_its_exit_status(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    """The bucket has no default encryption: init writes the config, shows the failed
    check with its fix, and exits 1."""
    config = tmp_path / "connector.toml"
    secret = s3_secret_file(tmp_path, moto)
    proc = connector(
        "init", "--config", str(config), *flags(vcsim, moto, s3_bucket, secret, tmp_path / "st")
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert config.is_file()
    assert "s3.encryption" in proc.stdout and "put-bucket-encryption" in proc.stdout
    assert "run `connector check` again" in proc.stdout


def test_init_refuses_a_secret_in_place_of_a_reference(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    config = tmp_path / "connector.toml"
    secret = s3_secret_file(tmp_path, moto)
    args = flags(vcsim, moto, s3_bucket, secret, tmp_path / "st")
    for option, value in (
        ("--vcenter-password", vcsim.password),
        ("--secret-key", moto.secret_key),
    ):
        at = args.index(option)
        bad = [*args[:at], option, value, *args[at + 2 :]]
        proc = connector("init", "--config", str(config), *bad, "--no-check")
        assert proc.returncode == 2
        assert f"{option} takes a reference to the secret" in proc.stderr
        assert "file:PATH, env:VARIABLE or credential:NAME" in proc.stderr
        assert value not in proc.stdout + proc.stderr
        assert not config.exists()
        assert not (tmp_path / "st").exists()


def test_init_without_a_terminal_names_the_missing_flag(tmp_path: Path) -> None:
    proc = connector("init", "--config", str(tmp_path / "c.toml"), "--vcenter", "vc.example.com")
    assert proc.returncode == 2
    assert "--vcenter-user is needed" in proc.stderr and "not in a terminal" in proc.stderr
    assert not (tmp_path / "c.toml").exists()


def test_init_credential_and_env_references(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    proc = connector(
        "init", "--config", str(config),
        "--vcenter", "vc.example.com", "--vcenter-user", "svc@vsphere.local",
        "--vcenter-password", "credential:vcenter-password",
        "--vcenter-thumbprint", ":".join(["AB"] * 32),
        "--bucket", "my-replica-staging", "--region", "eu-central-1",
        "--access-key-id", "AKIAEXAMPLE", "--secret-key", "env:CONNECTOR_S3_SECRET",
        "--sse", "aws:kms", "--kms-key-id", "alias/replicas",
        "--state-dir", str(tmp_path / "state"), "--no-check",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(config)
    assert cfg.vcenter is not None and cfg.vcenter.url == "https://vc.example.com/sdk"
    assert str(cfg.vcenter.password_file) == "credential:vcenter-password"
    assert cfg.s3 is not None and cfg.s3.secret_access_key_env == "CONNECTOR_S3_SECRET"
    assert cfg.s3.sse == "aws:kms" and cfg.s3.kms_key_id == "alias/replicas"
    assert "next: connector --config" in proc.stdout


def test_init_in_a_terminal_asks_for_what_the_flags_leave_out(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, encrypted_bucket: str
) -> None:
    config = tmp_path / "connector.toml"
    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # an existing folder is tightened to 0700
    state.chmod(0o755)
    secret = s3_secret_file(tmp_path, moto)
    env = {
        **os.environ,
        "COLUMNS": "200",
        "TERM": "dumb",
        "CONNECTOR_VC_PASSWORD": vcsim.password,
    }
    session = PtySession([sys.executable, "-m", "connector", "init", "--config", str(config)], env)
    answers = [
        ("vCenter host name or URL", vcsim.url),
        ("vCenter user", vcsim.user),
        ("vCenter password, as", "env:CONNECTOR_VC_PASSWORD"),
        ("CA file of vCenter's certificate", str(vcsim.ca_file)),
        ("S3 bucket", encrypted_bucket),
        ("AWS region", moto.region),
        ("S3 endpoint URL", moto.endpoint_url),
        ("CA file of the S3 endpoint", str(moto.ca_file)),
        ("AWS access key id", moto.access_key),
        ("AWS secret access key, as", f"file:{secret}"),
        ("state folder", str(state)),
    ]
    for question, answer in answers:
        session.expect(question)
        session.send(answer)
    status = session.wait()
    assert status == 0, session.output
    assert "every check passed" in session.output
    assert "now 0700" in session.output
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    text = config.read_text()
    assert 'password_env = "CONNECTOR_VC_PASSWORD"' in text
    assert_no_secret(text + session.output, vcsim, moto)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--vcenter-ca-file", "/ca.pem", "--vcenter-thumbprint", "AB"], "not both"),
        (["--sse", "DES"], "give AES256 or aws:kms"),
        (["--sse", "aws:kms"], "--sse aws:kms needs --kms-key-id"),
        (["--access-key-id", "AKIA1"], "--secret-key is needed"),
        (["--secret-key", "env:S"], "--access-key-id and --secret-key together"),
        (["--vcenter", "http://vc.example.com"], "give a host name or an https:// URL"),
    ],
)
def test_init_refuses_settings_that_do_not_fit(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    config = tmp_path / "c.toml"
    base = [
        "init", "--config", str(config), "--vcenter", "vc.example.com",
        "--vcenter-user", "svc", "--vcenter-password", "env:VC", "--bucket", "my-bucket",
        "--state-dir", str(tmp_path / "state"), "--no-check",
    ]  # fmt: skip
    proc = connector(*base, *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not config.exists() and not (tmp_path / "state").exists()
