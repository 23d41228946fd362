"""Error paths of the API's certificate, address and health probe, of `check --only`, of
NBD URIs and of VDDK's thumbprint, each with the message the troubleshooting guide
documents."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from connector.adapters.nbd import parse_nbd_uri
from connector.adapters.vddk import sha1_thumbprint
from connector.check import run_checks
from connector.config import ApiConfig
from connector.daemon.api import ApiServer, probe_health
from connector.errors import ConfigError, UnreachableError
from connector.secrets import Secret


def api_config(tmp_path: Path, cert: Path) -> ApiConfig:
    return ApiConfig(
        listen="127.0.0.1:1", cert_file=cert, key_file=tmp_path / "k", token_file=tmp_path / "t"
    )


def test_the_health_probe_needs_a_readable_certificate_that_names_a_host(tmp_path: Path) -> None:
    missing = tmp_path / "api.crt"
    with pytest.raises(ConfigError) as info:
        probe_health(api_config(tmp_path, missing), Secret("t" * 40))
    assert str(info.value).startswith(f"cannot read the API certificate {missing}: ")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    bare = tmp_path / "bare.crt"
    bare.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError) as info:
        probe_health(api_config(tmp_path, bare), Secret("t" * 40))
    assert str(info.value) == f"the API certificate {bare} names no host (no subjectAltName)"


def test_an_api_address_in_use_is_refused_with_the_address() -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        with pytest.raises(ConfigError) as info:
            ApiServer(
                "127.0.0.1",
                port,
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER),
                Secret("t" * 40),
                cast(Any, SimpleNamespace(registry=CollectorRegistry())),
            )
    finally:
        busy.close()
    assert str(info.value).startswith(f"cannot listen on 127.0.0.1:{port} for the API: ")


def test_check_only_names_the_known_checks() -> None:
    with pytest.raises(ValueError) as info:
        run_checks(cast(Any, None), ["no-such-check"])
    assert str(info.value).startswith("unknown check(s): no-such-check; known: ")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (
            "nbd+unix://host/disk?socket=/run/nbd.sock",
            "the NBD URI 'nbd+unix://host/disk?socket=/run/nbd.sock' names a host; "
            "nbd+unix:/// takes none",
        ),
        ("nbds:///disk", "the NBD URI 'nbds:///disk' has no host"),
    ],
)
def test_malformed_nbd_uris_are_refused(uri: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_nbd_uri(uri)
    assert str(info.value) == message


def test_a_host_that_cannot_be_reached_for_its_vddk_thumbprint_is_named() -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(UnreachableError) as info:
        sha1_thumbprint("127.0.0.1", port, ssl.create_default_context(), timeout=5)
    assert str(info.value).startswith(f"cannot reach 127.0.0.1:{port} for its thumbprint: ")
