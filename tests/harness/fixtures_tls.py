"""pytest fixtures: local TLS servers with chosen versions and certificates
(tests/harness/tls_servers.py), shared by the transport-security tests."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest

from tests.harness.ca import TestCA
from tests.harness.tls_servers import TLSServer


@pytest.fixture(scope="session")
def tls11_server(test_ca: TestCA) -> Iterator[TLSServer]:
    """An HTTPS server that speaks only TLS 1.1 (certificate from the test CA)."""
    server = TLSServer(test_ca.issue("tls11-only"), ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def wrong_name_server(test_ca: TestCA) -> Iterator[TLSServer]:
    """A TLS 1.2+ server whose certificate (test CA) names elsewhere.example, not 127.0.0.1."""
    server = TLSServer(
        test_ca.issue("elsewhere", hosts=("elsewhere.example",)),
        ssl.TLSVersion.TLSv1_2,
        ssl.TLSVersion.TLSv1_3,
    )
    try:
        yield server
    finally:
        server.stop()
