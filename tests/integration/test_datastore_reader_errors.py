"""What the datastore HTTPS reader says when the datastore answers a ranged GET wrongly,
against a local HTTPS server with a certificate of the test CA."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from connector.adapters.datastore_reader import DatastoreHttpsReader
from connector.errors import ConnectorError
from connector.retry import RetryPolicy
from connector.tls import client_context

pytestmark = pytest.mark.integration

WHAT = "disk 2000 of web-01"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        first, last = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        body = bytes(last - first + 1)
        answers = {
            "/missing": (404, None, b""),
            "/beyond": (416, None, b""),
            "/elsewhere": (206, f"bytes {first + 512}-{last + 512}/1048576", body),
            "/teapot": (418, None, b""),
            "/short": (206, f"bytes {first}-{last}/1048576", body[:100]),
        }
        status, content_range, data = answers[self.path]
        self.send_response(status)
        if content_range:
            self.send_header("Content-Range", content_range)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Session:
    """The few things the reader asks of the vSphere client."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx

    def ssl_context(self) -> ssl.SSLContext:
        return self.ctx

    def session_cookie(self) -> str:
        return "vmware_soap_session=test"

    def session_generation(self) -> int:
        return 0

    def relogin(self, generation: int | None = None) -> None:
        return None


@pytest.fixture
def server(test_ca: Any) -> Iterator[tuple[int, Session]]:
    cert = test_ca.issue("datastore")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert_file, cert.key_file)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], Session(client_context(test_ca.cert_file))
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/missing", f"{WHAT} was not found on the datastore (HTTP 404)"),
        (
            "/beyond",
            f"short read of {WHAT}: [4096, 8192) is beyond the end of the file (HTTP 416)",
        ),
        (
            "/elsewhere",
            f"reading {WHAT}: the server answered a different range ('bytes 4608-8703/1048576') "
            "than asked (4096-8191)",
        ),
        ("/teapot", f"reading {WHAT}: unexpected HTTP 418 I'm a Teapot to a range request"),
        ("/short", f"short read of {WHAT}: asked 4096 bytes at 4096, got 100"),
    ],
)
def test_wrong_answers_to_a_ranged_get_are_named(
    server: tuple[int, Session], path: str, message: str
) -> None:
    port, session = server
    reader = DatastoreHttpsReader(
        session,  # type: ignore[arg-type]
        f"https://127.0.0.1:{port}{path}",
        1 << 20,
        retry=RetryPolicy(attempts=1),
        description=WHAT,
    )
    try:
        with pytest.raises(ConnectorError) as info:
            reader.read(4096, 4096)
    finally:
        reader.close()
    assert str(info.value) == message
