"""`connector health` against an API that answers badly: the message names the answer."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def responder(test_ca: Any) -> Iterator[Callable[[bytes], tuple[int, Any]]]:
    """Start TLS servers that answer every request with one fixed response."""
    cert = test_ca.issue("api")
    stops: list[tuple[socket.socket, threading.Thread]] = []

    def start(response: bytes) -> tuple[int, Any]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert.cert_file, cert.key_file)
        listener = socket.create_server(("127.0.0.1", 0))

        def serve() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                try:
                    with ctx.wrap_socket(conn, server_side=True) as tls:
                        tls.recv(65536)
                        tls.sendall(response)
                except OSError:
                    pass

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        stops.append((listener, thread))
        return listener.getsockname()[1], cert

    yield start
    for listener, thread in stops:
        listener.close()
        thread.join(timeout=10)


def env_for(
    tmp_path: Path, vcsim: Any, moto: Any, bucket: str, port: int, cert: Any
) -> ConnectorEnv:
    token = tmp_path / "api.token"
    token.write_text("t" * 40)
    token.chmod(0o600)
    extra = (
        f'[api]\nlisten = "127.0.0.1:{port}"\ncert_file = "{cert.cert_file}"\n'
        f'key_file = "{cert.key_file}"\ntoken_file = "{token}"\n'
    )
    return write_config(tmp_path / f"c{port}", vcsim, moto, bucket, extra=extra)


def test_health_names_a_bad_answer_of_the_api(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str, responder: Any
) -> None:
    port, cert = responder(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    proc = env_for(tmp_path, vcsim, moto, s3_bucket, port, cert).cli("health")
    assert proc.returncode == 2, proc.stderr
    assert "error: the API answered 'HTTP/1.1 503 Service Unavailable' to /healthz" in proc.stderr
    body = b'{"status": "starting"}'
    port, cert = responder(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    proc = env_for(tmp_path, vcsim, moto, s3_bucket, port, cert).cli("health")
    assert proc.returncode == 1, proc.stderr
    assert f"error: the API at 127.0.0.1:{port} reports 'starting'" in proc.stderr
