"""The HTTPS server of the API: uvicorn in a background thread, on a socket bound early.

- TLS 1.2 or later only; TLS 1.2 with ECDHE key exchange and AEAD ciphers only
  (connector.tls.server_context, handed to uvicorn as its SSL context);
  certificate and key from [api].
- Handshakes run in the server's event loop, never blocking other clients, and
  idle connections time out, so a slow or hostile client cannot stall the API.
- The socket is bound when the server is made, so a taken port is a clear
  ConfigError at once and `port` is known before it serves.

The composition root builds it (`App.api_server`); the standalone `connector
api` command serves it in the foreground, and the daemon starts it once it is
ready and stops it first when stopping.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from prometheus_client import Counter
from prometheus_client.registry import Collector

from connector.daemon.api.routes import ApiServices
from connector.daemon.api.web import build_app
from connector.errors import ConfigError
from connector.logging import get_logger, register_secret
from connector.secrets import Secret

if TYPE_CHECKING:
    from connector.config import ApiConfig

log = get_logger(__name__)

MIN_TOKEN_LENGTH = 24
IDLE_TIMEOUT = 30.0
START_TIMEOUT = 30.0


class ApiServer:
    """The HTTPS API on one address, served by a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        ctx: ssl.SSLContext,
        token: Secret,
        services: ApiServices,
        collectors: Sequence[Collector] = (),
    ) -> None:
        """`collectors`: more metrics for /metrics (the object store's, from the app)."""
        if len(token.reveal()) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"the API token is too short: use at least {MIN_TOKEN_LENGTH} random characters "
                "(e.g. `openssl rand -hex 32`)"
            )
        register_secret(token)  # scrubbed from logs, even if a client sends it in a URL
        self.services = services
        for collector in collectors:
            services.registry.register(collector)
        self.requests = Counter(
            "connector_api_requests",
            "Requests to the connector's API by route and status",
            ["path", "status"],
            registry=services.registry,
        )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(128)
        except OSError as exc:
            self._sock.close()
            raise ConfigError(f"cannot listen on {host}:{port} for the API: {exc}") from exc
        self._sock.setblocking(False)
        self._address: tuple[str, int] = self._sock.getsockname()[:2]
        config = uvicorn.Config(
            build_app(services, token, self.requests),
            log_config=None,
            access_log=False,
            server_header=False,
            headers=[("server", "connector")],
            timeout_keep_alive=int(IDLE_TIMEOUT),
            ssl_context_factory=lambda _config, _default: ctx,
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._address[1]

    @property
    def host(self) -> str:
        return str(self._address[0])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self) -> ApiServer:
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name="connector-api",
            daemon=True,
        )
        self._thread.start()
        started = threading.Event()

        def wait() -> bool:
            return self._server.started or not (self._thread and self._thread.is_alive())

        deadline = time.monotonic() + START_TIMEOUT
        while not wait() and time.monotonic() < deadline:
            started.wait(0.02)
        if not self._server.started:
            self._server.should_exit = True
            raise ConfigError(f"the API could not start on {self.url}; see the log above")
        log.info("api.listening", url=self.url)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sock.close()
        log.info("api.stopped", url=self.url)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def probe_health(cfg: ApiConfig, token: Secret, timeout: float = 5.0) -> str:
    """GET /healthz of the local API over verified TLS with the token; the answer's
    status, or raise.

    For container health checks: it connects to the listen address and trusts
    exactly the API's own certificate (the one in cert_file), checked against a
    name the certificate carries, so no CA and no DNS are needed.
    """
    from cryptography import x509

    try:
        pem = Path(cfg.cert_file).read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the API certificate {cfg.cert_file}: {exc}") from None
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
        names += sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        raise ConfigError(f"the API certificate {cfg.cert_file} names no host (no subjectAltName)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=pem.decode("ascii", errors="replace"))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # A wildcard listen address is probed on the loopback address.
    wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104
    host = wildcard.get(cfg.host, cfg.host)
    with (
        socket.create_connection((host, cfg.port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=names[0]) as tls,
    ):
        tls.sendall(
            f"GET /healthz HTTP/1.1\r\nHost: {names[0]}\r\nConnection: close\r\n"
            f"Authorization: Bearer {token.reveal()}\r\n\r\n".encode()
        )
        response = b""
        while chunk := tls.recv(4096):
            response += chunk
    status_line = response.split(b"\r\n", 1)[0].decode("latin-1")
    body = response.partition(b"\r\n\r\n")[2]
    if " 200 " not in f"{status_line} ":
        raise ConfigError(f"the API answered {status_line!r} to /healthz")
    status: str = json.loads(body).get("status", "")
    return status
