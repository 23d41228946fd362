"""The connector's own HTTPS API: health, metrics and read-only state.

- TLS 1.2 or later only; TLS 1.2 with ECDHE key exchange and AEAD ciphers only
  (connector.tls.server_context); certificate and key from [api].
- Every endpoint except `/healthz` needs `Authorization: Bearer <token>`, the
  token coming from a file, a systemd credential or the environment. Tokens
  are compared in constant time. `/healthz` answers `{"status": "ok"}` and
  nothing else, so it can serve load-balancer and container health checks.
- Endpoints: GET /healthz, /metrics (Prometheus text format: the state store's
  numbers, the API's requests, and the object store's operations, bytes, errors
  and latency in this process), /v1/servers, /v1/runs[?server=<server id>].
- Handshakes happen in the request's thread, not the accept loop, and idle
  connections time out, so a slow or hostile client cannot stall the API.

The composition root builds it (`App.api_server`); the standalone `connector
api` command serves it in the foreground, and the daemon starts it once it is
ready and stops it first when stopping.
"""

from __future__ import annotations

import hmac
import http.server
import json
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from connector import __version__
from connector.domain.jobs import RUN_COMPLETED
from connector.errors import ConfigError
from connector.logging import get_logger, register_secret
from connector.ports import Catalog, Runs
from connector.secrets import Secret

if TYPE_CHECKING:
    from connector.config import ApiConfig

log = get_logger(__name__)

MIN_TOKEN_LENGTH = 24
IDLE_TIMEOUT = 30.0
_ROUTES = ("/healthz", "/metrics", "/v1/servers", "/v1/runs")


class ApiState(Catalog, Runs, Protocol):
    """What the API reads: the catalog and the runs."""


class _StateCollector:
    """Prometheus metrics read from the state store at scrape time."""

    def __init__(self, state: ApiState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("connector", "The connector's version")
        info.add_metric([], {"version": __version__})
        yield info
        servers = self._state.servers()
        yield GaugeMetricFamily(
            "connector_servers", "VMs in the server catalog", value=len(servers)
        )
        runs = self._state.runs()
        by_state = GaugeMetricFamily(
            "connector_runs", "Replication runs by state", labels=["state"]
        )
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.state] = counts.get(run.state, 0) + 1
        for state, count in sorted(counts.items()):
            by_state.add_metric([state], count)
        yield by_state
        read = GaugeMetricFamily(
            "connector_run_bytes_read", "Bytes read from the source by completed runs"
        )
        read.add_metric(
            [], sum(d.bytes_read for r in runs if r.state == RUN_COMPLETED for d in r.disks)
        )
        yield read


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "connector"
    sys_version = ""
    timeout = IDLE_TIMEOUT
    server: _TLSServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api.request", client=self.client_address[0], line=format % args)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        route = parts.path.rstrip("/") or "/"
        if route == "/healthz":
            self._json(200, {"status": "ok"}, route)
            return
        if not self._authorized():
            self._count(route, 401)
            self._send(
                401,
                b'{"error": "a bearer token is required"}',
                "application/json",
                {"WWW-Authenticate": 'Bearer realm="connector"'},
            )
            return
        api = self.server.api
        if route == "/metrics":
            self._count(route, 200)
            self._send(200, generate_latest(api.registry), CONTENT_TYPE_LATEST)
        elif route == "/v1/servers":
            self._json(200, [asdict(s) for s in api.state.servers()], route)
        elif route == "/v1/runs":
            server = parse_qs(parts.query).get("server", [None])[0]
            self._json(200, [asdict(r) for r in api.state.runs(server)], route)
        else:
            self._json(404, {"error": "no such endpoint"}, route)

    def _refuse_method(self) -> None:
        self._send(
            405, b'{"error": "read-only API: GET only"}', "application/json", {"Allow": "GET"}
        )

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse_method

    def do_HEAD(self) -> None:
        self._refuse_method()

    def _authorized(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        expected = self.server.api.token.reveal().encode()
        ok = hmac.compare_digest(presented.strip().encode(), expected) and scheme == "Bearer"
        if not ok:
            log.warning("api.unauthorized", client=self.client_address[0], path=self.path[:100])
        return ok

    def _json(self, status: int, body: Any, route: str) -> None:
        self._count(route, status)
        self._send(status, json.dumps(body, indent=1).encode(), "application/json")

    def _count(self, route: str, status: int) -> None:
        self.server.api.requests.labels(route if route in _ROUTES else "other", str(status)).inc()

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Strict-Transport-Security", "max-age=31536000")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _TLSServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    api: ApiServer

    def __init__(self, address: tuple[str, int], ctx: ssl.SSLContext) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)
        # The handshake runs on the first read, in the request's thread.
        self.socket = ctx.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed handshakes (old protocols, scanners) and dropped connections.
        log.debug("api.connection_error", client=str(client_address[0]))


class ApiServer:
    """The HTTPS API on one address, served by a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        ctx: ssl.SSLContext,
        token: Secret,
        state: ApiState,
        collectors: Sequence[Collector] = (),
    ) -> None:
        """`collectors`: more metrics for /metrics (the object store's, from the app)."""
        if len(token.reveal()) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"the API token is too short: use at least {MIN_TOKEN_LENGTH} random characters "
                "(e.g. `openssl rand -hex 32`)"
            )
        register_secret(token)  # scrubbed from logs, even if a client sends it in a URL
        self.token = token
        self.state = state
        self.registry = CollectorRegistry()
        self.registry.register(_StateCollector(state))
        for collector in collectors:
            self.registry.register(collector)
        self.requests = Counter(
            "connector_api_requests",
            "Requests to the connector's API",
            ["path", "status"],
            registry=self.registry,
        )
        try:
            self._httpd = _TLSServer((host, port), ctx)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} for the API: {exc}") from exc
        self._httpd.api = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        port: int = self._httpd.server_address[1]
        return port

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self) -> ApiServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="connector-api", daemon=True
        )
        self._thread.start()
        log.info("api.listening", url=self.url)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        log.info("api.stopped", url=self.url)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def probe_health(cfg: ApiConfig, timeout: float = 5.0) -> str:
    """GET /healthz of the local API over verified TLS; the answer's status, or raise.

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
            f"GET /healthz HTTP/1.1\r\nHost: {names[0]}\r\nConnection: close\r\n\r\n".encode()
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
