"""Small TLS servers and proxies on 127.0.0.1 for the transport-security tests.

- `TLSServer`: an HTTPS responder that speaks only a chosen range of TLS
  versions (down to TLS 1.1, which OpenSSL 3 offers only at security level 0).
- `TLSVersionProxy`: terminates TLS with a chosen version range and forwards
  the bytes to a real server (the simulator, moto_server) over a verified TLS
  connection, so a client can be shown to work against a TLS-1.2-only or
  TLS-1.3-only endpoint.
- `ConnectProxy`: an HTTP CONNECT proxy that records the tunnels it opened;
  with `intercept_ca` it behaves like a TLS-inspecting corporate proxy that
  re-issues server certificates from its own CA.

Every server records the TLS versions its handshakes negotiated, and is
stopped by `stop()` (which closes its socket and joins its thread).
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

from tests.harness.ca import IssuedCert, TestCA

# --------------------------------------------------------------------------- helpers


def server_context(
    cert: IssuedCert, min_version: ssl.TLSVersion, max_version: ssl.TLSVersion
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 on purpose
        if min_version < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 needs it for TLS 1.1
        ctx.minimum_version = min_version
        ctx.maximum_version = max_version
    ctx.load_cert_chain(cert.cert_file, cert.key_file)
    return ctx


def legacy_client_context(ca_file: Path) -> ssl.SSLContext:
    """A verifying client context that also speaks TLS 1.0/1.1 (to prove what a server speaks)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


def negotiated_version(port: int, ca_file: Path) -> str:
    """The TLS version a permissive client negotiates with 127.0.0.1:port."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        ctx = legacy_client_context(ca_file)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return str(tls.version())


def _relay(a: socket.socket, b: socket.socket, idle: float = 60.0) -> int:
    """Copy bytes both ways until one side closes; returns the bytes relayed."""
    total = 0
    sockets: list[socket.socket] = [a, b]
    while True:
        ready: list[socket.socket] = [
            s for s in sockets if isinstance(s, ssl.SSLSocket) and s.pending()
        ]
        if not ready:
            ready, _, _ = select.select(sockets, [], [], idle)
            if not ready:
                return total
        for src in ready:
            dst = b if src is a else a
            # Non-blocking read: a readable TLS socket may hold only a handshake
            # message (a TLS 1.3 session ticket) and no application data.
            src.setblocking(False)
            try:
                data = src.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                continue
            except OSError:
                return total
            finally:
                src.settimeout(30)
            if not data:
                return total
            try:
                dst.sendall(data)
            except OSError:
                return total
            total += len(data)


class _Listener:
    """Accept loop on 127.0.0.1 with one thread per connection, each run by `handle`."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._handle = handle
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stopped = False

    def start_listening(self) -> None:
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if self._stopped:
                    conn.close()
                    return
                self._conns.append(conn)
            threading.Thread(target=self._guarded, args=(conn,), daemon=True).start()

    def _guarded(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(30)
            self._handle(conn)
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            conns = list(self._conns)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


# ------------------------------------------------------------------------- servers


class TLSServer(_Listener):
    """A tiny HTTPS responder (HTTP 200, empty body) with a chosen TLS version range."""

    def __init__(
        self, cert: IssuedCert, min_version: ssl.TLSVersion, max_version: ssl.TLSVersion
    ) -> None:
        super().__init__(self.handle)
        self.cert = cert
        self.ctx = server_context(cert, min_version, max_version)
        self.handshakes: list[str] = []
        self.start_listening()

    def handle(self, conn: socket.socket) -> None:
        with self.ctx.wrap_socket(conn, server_side=True) as tls:
            self.handshakes.append(str(tls.version()))
            tls.recv(65536)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


class TLSVersionProxy(_Listener):
    """Terminates TLS (versions pinned) and forwards to an upstream TLS server."""

    def __init__(
        self,
        cert: IssuedCert,
        upstream_port: int,
        upstream_ca: Path,
        min_version: ssl.TLSVersion,
        max_version: ssl.TLSVersion,
    ) -> None:
        super().__init__(self.handle)
        self.ctx = server_context(cert, min_version, max_version)
        self.upstream_port = upstream_port
        self.upstream_ctx = ssl.create_default_context(cafile=str(upstream_ca))
        self.handshakes: list[str] = []
        self.bytes_relayed = 0
        self.start_listening()

    def handle(self, conn: socket.socket) -> None:
        with self.ctx.wrap_socket(conn, server_side=True) as front:
            self.handshakes.append(str(front.version()))
            raw = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
            with self.upstream_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as back:
                self.bytes_relayed += _relay(front, back)


class ConnectProxy(_Listener):
    """An HTTP CONNECT proxy; with `intercept_ca`, a TLS-inspecting one.

    An inspecting proxy answers the client's TLS handshake itself with a
    certificate for the requested host issued by `intercept_ca`, and opens its
    own TLS connection upstream (verified with `upstream_ca`).
    """

    def __init__(self, intercept_ca: TestCA | None = None, upstream_ca: Path | None = None) -> None:
        super().__init__(self.handle)
        self.intercept_ca = intercept_ca
        self.upstream_ca = upstream_ca
        self.tunnels: list[str] = []
        self.intercepted: list[str] = []
        self._issued: dict[str, ssl.SSLContext] = {}
        self.start_listening()

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handle(self, conn: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
            if len(request) > 65536:
                return
        head, _, rest = request.partition(b"\r\n\r\n")
        method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        if method != "CONNECT":
            conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        host, _, port_text = target.rpartition(":")
        self.tunnels.append(target)
        try:
            upstream = socket.create_connection((host.strip("[]"), int(port_text)), timeout=30)
        except OSError:
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with upstream:
            if rest:
                upstream.sendall(rest)
            if self.intercept_ca is None:
                _relay(conn, upstream)
                return
            front_ctx = self._context_for(host.strip("[]"))
            back_ctx = ssl.create_default_context(cafile=str(self.upstream_ca))
            with front_ctx.wrap_socket(conn, server_side=True) as front:
                server_name = host.strip("[]")
                with back_ctx.wrap_socket(upstream, server_hostname=server_name) as back:
                    self.intercepted.append(target)
                    _relay(front, back)

    def _context_for(self, host: str) -> ssl.SSLContext:
        assert self.intercept_ca is not None
        if host not in self._issued:
            cert = self.intercept_ca.issue(f"intercept-{host.replace(':', '_')}", hosts=(host,))
            self._issued[host] = server_context(
                cert, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
            )
        return self._issued[host]
