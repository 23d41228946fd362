"""`connector support-bundle` through the command: the tarball holds the logs, the
config, state summaries, the status and version info, and none of the secrets
planted in config values, secret files, the environment and the logs."""

from __future__ import annotations

import json
import stat
import tarfile
from pathlib import Path

import pytest

from connector import __version__
from connector.store.keys import generate_key_file
from tests.harness.connector_env import write_config
from tests.harness.moto import MotoServer
from tests.harness.vcsim import Simulator

pytestmark = pytest.mark.integration

S3_SECRET_ENV = "CONNECTOR_BUNDLE_S3_SECRET"
UNKNOWN_ENV_SECRET = "env-only-secret-0a9f3c77e1"  # in a variable the config does not name
API_TOKEN = "api-token-5d1c0b8e44aa90f2"
LOG_PASSWORD = "typed-into-a-log-77c1e0"  # only ever written as password=...


def test_the_bundle_has_its_members_and_no_secret(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    api_token = tmp_path / "api-token"
    api_token.write_text(API_TOKEN + "\n")
    api_token.chmod(0o600)
    env = write_config(
        tmp_path / "c",
        vcsim,
        moto,
        s3_bucket,
        s3={"secret_access_key_file": None, "secret_access_key_env": S3_SECRET_ENV},
        extra=(
            f"# the old vCenter password was {vcsim.password}\n"
            "[api]\n"
            f'cert_file = "{tmp_path / "api.crt"}"\n'
            f'key_file = "{tmp_path / "api.key"}"\n'
            f'token_file = "{api_token}"\n'
        ),
    )
    (tmp_path / "api.key").write_text("-----BEGIN PRIVATE KEY-----\nMIIEvQplantedkeybody\n")
    (tmp_path / "api.key").chmod(0o600)
    (tmp_path / "api.crt").write_text("certificate\n")
    store_key = env.workdir / "state" / "store.key"
    store_key.parent.mkdir(parents=True)
    generate_key_file(store_key)
    key_text = store_key.read_text().strip()
    log = tmp_path / "connector.log"
    log.write_text(
        "2026-12-01T02:00:00Z [info] vcenter.login user=connector\n"
        f"2026-12-01T02:00:01Z [error] a library echoed {vcsim.password} and {moto.secret_key}\n"
        f"2026-12-01T02:00:02Z [debug] request with password={LOG_PASSWORD}\n"
        f"2026-12-01T02:00:03Z [debug] GET https://b.s3.amazonaws.com/k?X-Amz-Signature=abc123def456\n"
        f"2026-12-01T02:00:04Z [debug] header Authorization: Bearer {API_TOKEN}\n"
        f"2026-12-01T02:00:05Z [debug] store key {key_text}\n"
    )
    secrets = {
        "vCenter password": vcsim.password,
        "S3 secret key": moto.secret_key,
        "S3 access key id": moto.access_key,
        "API token": API_TOKEN,
        "store key": key_text,
        "API private key": "MIIEvQplantedkeybody",
        "log password": LOG_PASSWORD,
        "signature": "abc123def456",
        "unknown env secret": UNKNOWN_ENV_SECRET,
    }
    target = tmp_path / "bundle.tar.gz"
    proc = env.cli(
        "support-bundle", "--output", str(target), "--log", str(log), "--no-journal",
        env={S3_SECRET_ENV: moto.secret_key, "CONNECTOR_PLANTED_TOKEN": UNKNOWN_ENV_SECRET},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wrote" in proc.stdout and str(target) in proc.stdout
    assert stat.S_IMODE(target.stat().st_mode) == 0o600

    with tarfile.open(target) as tar:
        names = tar.getnames()
        texts = {}
        for member in tar.getmembers():
            f = tar.extractfile(member)
            assert f is not None
            texts[member.name.split("/", 1)[1]] = f.read().decode()
    expected = {
        "README.txt",
        "version.json",
        "config.json",
        "environment.json",
        "state.json",
        "status.json",
        "logs/connector.log",
        "logs/audit.jsonl",
    }
    assert expected <= set(texts), names
    everything = "\n".join(texts.values()) + "\n".join(names)
    for what, value in secrets.items():
        assert value not in everything, f"the {what} is in the bundle"
        assert value not in proc.stdout + proc.stderr

    version = json.loads(texts["version.json"])
    assert version["connector"] == __version__ and version["python"]
    config = json.loads(texts["config.json"])
    assert config["s3"]["bucket"] == s3_bucket
    assert config["s3"]["access_key_id"] == "**********"
    assert config["s3"]["secret_access_key_env"] == S3_SECRET_ENV  # the reference stays
    assert config["vcenter"]["password_file"] == str(vcsim.password_file)
    environment = json.loads(texts["environment.json"])
    assert environment["CONNECTOR_PLANTED_TOKEN"] == "(set)"
    assert environment["CONNECTOR_CONFIG"] == str(env.config_file)
    state = json.loads(texts["state.json"])
    assert set(state) >= {"servers", "runs", "jobs", "retention_settings"}
    status = json.loads(texts["status.json"])
    assert status["version"] == __version__ and "healthy" in status
    assert "vcenter.login user=connector" in texts["logs/connector.log"]
    assert "password=**********" in texts["logs/connector.log"]
    assert "config.load" in texts["logs/audit.jsonl"]
    # making a bundle is an audited action
    assert "support.bundle" in (env.workdir / "state" / "audit.jsonl").read_text()


def test_the_bundle_refuses_an_existing_file_and_a_missing_log(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket)
    existing = tmp_path / "old.tar.gz"
    existing.write_bytes(b"keep me")
    proc = env.cli("support-bundle", "--output", str(existing), "--no-journal")
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert existing.read_bytes() == b"keep me"
    proc = env.cli(
        "support-bundle", "--output", str(tmp_path / "new.tar.gz"), "--log", str(tmp_path / "no")
    )
    assert proc.returncode == 2 and "is not a file" in proc.stderr
    assert not (tmp_path / "new.tar.gz").exists()
    nowhere = tmp_path / "no-such-folder" / "b.tar.gz"
    proc = env.cli("support-bundle", "--output", str(nowhere), "--no-journal")
    assert proc.returncode == 2
    assert "does not exist; create it or give another --output" in " ".join(proc.stderr.split())
    assert not nowhere.parent.exists()


def test_the_bundle_takes_the_service_journal(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    """With journalctl (systemd is in .ci/install's packages) the unit's journal is a
    member, or a note says why it could not be read."""
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket)
    target = tmp_path / "b.tar.gz"
    proc = env.cli("support-bundle", "-o", str(target), "--since", "1", "--no-status")
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(target) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames()}
        notes = ""
        if "NOTES.txt" in names:
            f = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("NOTES.txt")))
            assert f is not None
            notes = f.read().decode()
    assert "logs/journal.txt" in names or "journal:" in notes
    assert "status.json" not in names  # --no-status
