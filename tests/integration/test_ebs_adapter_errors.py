"""The EBS/EC2 adapter against the extended moto_server: what it says when it has no
credentials, when the endpoint cannot be reached, when TLS to it fails, and when AWS
throttles a call (the messages of docs/troubleshooting.md, never a secret)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from connector.adapters.ebs import EbsTarget
from connector.errors import AuthenticationError, TLSTrustError, TransientError, UnreachableError
from connector.secrets import Secret
from tests.harness.ca import make_ca
from tests.harness.fixtures_landing import LandingMoto
from tests.harness.postgres import free_port

pytestmark = pytest.mark.integration

SNAPSHOT = "snap-0123456789abcdef0"


def target(moto: LandingMoto, **overrides: object) -> EbsTarget:
    server = moto.server
    args: dict[str, object] = {
        "region": server.region,
        "endpoint_url": server.endpoint_url,
        "ca_file": server.ca_file,
        "access_key_id": Secret(server.access_key),
        "secret_access_key": Secret(server.secret_key),
    }
    args.update(overrides)
    return EbsTarget(**args)  # type: ignore[arg-type]


def test_no_credentials_says_where_to_give_them(
    landing_moto: LandingMoto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    ebs = target(landing_moto, access_key_id=None, secret_access_key=None)
    try:
        with pytest.raises(AuthenticationError) as err:
            ebs.snapshot_state(SNAPSHOT)
    finally:
        ebs.close()
    assert str(err.value) == (
        "no AWS credentials for DescribeSnapshots; set [landing] access_key_id and its "
        "secret, or give the connector an instance or container role"
    )
    assert landing_moto.calls() == []


def test_an_endpoint_that_cannot_be_reached_is_named(landing_moto: LandingMoto) -> None:
    endpoint = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    ebs = target(landing_moto, endpoint_url=endpoint)
    try:
        with pytest.raises(UnreachableError) as err:
            ebs.snapshot_state(SNAPSHOT)
    finally:
        ebs.close()
    text = str(err.value)
    assert text.startswith(f"AWS endpoint {endpoint} cannot be reached for DescribeSnapshots: ")
    assert landing_moto.server.secret_key not in text


def test_a_certificate_from_another_ca_is_a_tls_error(
    landing_moto: LandingMoto, tmp_path: Path
) -> None:
    other = make_ca(tmp_path / "other-ca", "another-ca")
    ebs = target(landing_moto, ca_file=other.cert_file)
    try:
        with pytest.raises(TLSTrustError) as err:
            ebs.snapshot_state(SNAPSHOT)
    finally:
        ebs.close()
    endpoint = landing_moto.server.endpoint_url
    assert re.match(
        rf"TLS to {re.escape(endpoint)} failed: the certificate of .+ is not trusted",
        str(err.value),
    ), str(err.value)
    assert "ca_file" in str(err.value)


def test_a_throttled_call_says_to_try_again(landing_moto: LandingMoto) -> None:
    landing_moto.inject("StartSnapshot", "ThrottlingException", status=429, message="Rate exceeded")
    ebs = target(landing_moto)
    try:
        with pytest.raises(TransientError) as err:
            ebs.start_snapshot(
                volume_size=1,
                client_token="t" * 64,
                parent_snapshot_id=None,
                encrypted=False,
                kms_key_id=None,
                tags={},
                description="throttled",
                timeout_minutes=60,
            )
    finally:
        ebs.close()
    assert str(err.value).startswith("AWS StartSnapshot")
    assert "was throttled or failed; try again (ThrottlingException: Rate exceeded)" in str(
        err.value
    )
    assert landing_moto.pending_faults() == {}
