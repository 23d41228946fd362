"""A fault-injecting HTTPS reverse proxy in front of moto_server, which has no fault
injection of its own.

The proxy terminates TLS with a certificate from the test CA, reads each HTTP
request, and either forwards it to moto_server (over a verified TLS connection)
or answers it with an injected fault instead:

- an HTTP status with an S3 XML error body (500 InternalError, 503 SlowDown,
  403 AccessDenied...), as S3 itself would send it;
- a connection reset: the proxy reads the whole request, then closes the client
  connection with a TCP RST (SO_LINGER 0), as a dropped connection looks to the
  client while it waits for the answer;
- a lost reply (`drop_reply`): the request is forwarded and moto_server acts on
  it, then the client's connection is reset instead of answered, so the client
  never learns what S3 did (a CreateMultipartUpload whose upload id never
  arrives).

A skewed clock (`date_offset`, seconds): every forwarded answer's Date header is
moved by that much, as a server whose clock differs from the client's would
send it (moto_server's Date comes from this machine's own clock).

A fault matches by method and by a substring of the request path, a number of
times (or always). Every request is recorded with what was done with it, so a
test can prove how often the client asked. Point the connector's [s3]
endpoint_url at `proxy.url` (the same test CA is trusted).

`ResettingConnectProxy` is the other way in: an HTTP CONNECT proxy for the
connector's [network] https_proxy that resets a tunnel in the middle of an
upload, with TLS end to end through it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import http.client
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from tests.harness.ca import IssuedCert

_REASONS = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 503: "Slow Down"}
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
MAX_HEAD = 64 * 1024


@dataclass
class Fault:
    """What to inject, on which requests, how often (`times` None: every time)."""

    method: str  # GET, PUT, HEAD, DELETE, POST, or * for any
    path_contains: str
    status: int | None = None  # an HTTP error, or None with reset=True
    code: str = "InternalError"
    reset: bool = False
    times: int | None = 1
    hits: int = 0
    drop_reply: bool = False  # forward, then reset instead of answering

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        return self.method in ("*", method) and self.path_contains in path


@dataclass(frozen=True)
class Seen:
    """One request the proxy received and what it did: `forwarded <status>`,
    `injected <status>`, or `reset`."""

    method: str
    path: str
    outcome: str


class FaultyS3Proxy:
    """The reverse proxy on 127.0.0.1; `stop()` closes it and every connection."""

    def __init__(self, cert: IssuedCert, upstream_port: int, upstream_ca: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self.ctx.load_cert_chain(cert.cert_file, cert.key_file)
        self.upstream_port = upstream_port
        self.upstream_ctx = ssl.create_default_context(cafile=str(upstream_ca))
        self.faults: list[Fault] = []
        self.seen: list[Seen] = []
        self.dropped_replies: list[bytes] = []  # the bodies the client never got
        self.date_offset = 0.0  # seconds added to each forwarded answer's Date header
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    # -- what the tests call

    def inject(
        self,
        method: str,
        path_contains: str,
        *,
        status: int | None = None,
        code: str = "InternalError",
        reset: bool = False,
        times: int | None = 1,
        drop_reply: bool = False,
    ) -> Fault:
        if [status is not None, reset, drop_reply].count(True) != 1:
            raise ValueError("inject a status, a reset or a dropped reply, one of the three")
        fault = Fault(
            method.upper(), path_contains, status, code, reset, times, drop_reply=drop_reply
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def requests(self, method: str, path_contains: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.method == method and path_contains in s.path]

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
            with contextlib.suppress(OSError):
                conn.close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FaultyS3Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving

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
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        upstream: http.client.HTTPSConnection | None = None
        live = raw
        try:
            raw.settimeout(60)
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                live = self._track(raw, tls)
                reader = tls.makefile("rb")
                while True:
                    request = _read_request(reader, tls)
                    if request is None:
                        return
                    method, path, headers, body = request
                    fault = self._match(method, path)
                    if fault is not None and fault.reset:
                        self._record(method, path, "reset")
                        _reset(tls)
                        return
                    if fault is not None and fault.drop_reply:
                        upstream = upstream or http.client.HTTPSConnection(
                            "127.0.0.1", self.upstream_port, context=self.upstream_ctx, timeout=60
                        )
                        status, _r, _h, out_body = _forward(upstream, method, path, headers, body)
                        self._record(method, path, f"forwarded {status}, reply dropped")
                        with self._lock:
                            self.dropped_replies.append(out_body)
                        _reset(tls)
                        return
                    if fault is not None:
                        assert fault.status is not None
                        self._record(method, path, f"injected {fault.status}")
                        tls.sendall(_error_response(fault.status, fault.code, path, method))
                        continue
                    if upstream is None:
                        upstream = http.client.HTTPSConnection(
                            "127.0.0.1", self.upstream_port, context=self.upstream_ctx, timeout=60
                        )
                    status, reason, out_headers, out_body = _forward(
                        upstream, method, path, headers, body
                    )
                    self._record(method, path, f"forwarded {status}")
                    if self.date_offset:
                        out_headers = _shift_date(out_headers, self.date_offset)
                    tls.sendall(_response(status, reason, out_headers, out_body, method))
        except (OSError, ssl.SSLError, http.client.HTTPException, ValueError):
            return
        finally:
            if upstream is not None:
                upstream.close()
            with self._lock:
                self._conns.discard(live)
                self._conns.discard(raw)
            with contextlib.suppress(OSError):
                live.close()

    def _track(self, raw: socket.socket, tls: socket.socket) -> socket.socket:
        with self._lock:
            self._conns.discard(raw)  # wrapping detached it
            self._conns.add(tls)
        return tls

    def _match(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def _record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.seen.append(Seen(method, path, outcome))


# ------------------------------------------------------------------ HTTP plumbing


def _read_request(
    reader: object, client: socket.socket
) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
    """One HTTP/1.1 request from the client, or None when the client closed.

    An `Expect: 100-continue` is answered at once (the body is always wanted)."""
    readline = reader.readline  # type: ignore[attr-defined]
    read = reader.read  # type: ignore[attr-defined]
    line: bytes = readline(MAX_HEAD)
    while line in (b"\r\n", b"\n"):
        line = readline(MAX_HEAD)
    if not line:
        return None
    method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: list[tuple[str, str]] = []
    while True:
        h: bytes = readline(MAX_HEAD)
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    lowered = {k.lower(): v for k, v in headers}
    if lowered.get("expect", "").lower() == "100-continue":
        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        headers = [(k, v) for k, v in headers if k.lower() != "expect"]
    if "chunked" in lowered.get("transfer-encoding", "").lower():
        body = b""
        while True:
            size = int(readline(MAX_HEAD).split(b";")[0].strip(), 16)
            if size == 0:
                while readline(MAX_HEAD) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            body += read(size)
            readline(MAX_HEAD)
        headers = [(k, v) for k, v in headers if k.lower() != "transfer-encoding"]
        headers.append(("Content-Length", str(len(body))))
    else:
        body = read(int(lowered.get("content-length", "0") or 0))
    return method.upper(), target, headers, body


def _forward(
    upstream: http.client.HTTPSConnection,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
) -> tuple[int, str, list[tuple[str, str]], bytes]:
    upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers:
        if name.lower() != "connection":
            upstream.putheader(name, value)
    upstream.endheaders(body if body else None)
    resp = upstream.getresponse()
    data = resp.read()
    if resp.will_close:
        upstream.close()  # http.client reconnects at the next request
    return resp.status, resp.reason, list(resp.getheaders()), data


def _response(
    status: int, reason: str, headers: list[tuple[str, str]], body: bytes, method: str
) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    length = None
    for name, value in headers:
        if name.lower() == "content-length":
            length = value
        if name.lower() not in _HOP_BY_HOP:
            lines.append(f"{name}: {value}")
    if method == "HEAD":
        # No body; the length is that of the object the GET would return.
        lines.append(f"Content-Length: {length if length is not None else 0}")
        body = b""
    elif status in (204, 304):
        body = b""
    else:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _shift_date(headers: list[tuple[str, str]], seconds: float) -> list[tuple[str, str]]:
    """The headers with their Date moved by `seconds`."""
    shifted = []
    for name, value in headers:
        if name.lower() == "date":
            when = email.utils.parsedate_to_datetime(value) + dt.timedelta(seconds=seconds)
            value = email.utils.format_datetime(when, usegmt=True)
        shifted.append((name, value))
    return shifted


def _error_response(status: int, code: str, path: str, method: str) -> bytes:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by the test proxy ({status})</Message>"
        f"<Resource>{path.split('?')[0]}</Resource><RequestId>fault</RequestId></Error>"
    ).encode()
    reason = _REASONS.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nx-amz-request-id: fault\r\n\r\n"
    ).encode()
    return head if method == "HEAD" else head + body


def _reset(raw: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN."""
    with contextlib.suppress(OSError):
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        raw.close()


class ResettingConnectProxy:
    """An HTTP CONNECT proxy (the connector's [network] https_proxy) that resets tunnels.

    TLS runs end to end through it, so it cannot see requests; it counts bytes.
    Once a tunnel has carried more than `reset_after` bytes from the client (an
    upload under way), the proxy closes the client's side with a TCP RST and drops
    the upstream side, `resets` times in all; every other tunnel is relayed as is.
    """

    def __init__(self, reset_after: int, resets: int = 1) -> None:
        self.reset_after = reset_after
        self.resets_left = resets
        self.tunnels: list[str] = []
        self.reset_tunnels: list[str] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
                self._conns.add(conn)
            threading.Thread(target=self._tunnel, args=(conn,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(60)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk or len(head) > MAX_HEAD:
                    return
                head += chunk
            request, _, rest = head.partition(b"\r\n\r\n")
            method, target, _v = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            host, _, port = target.rpartition(":")
            upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=60)
            with self._lock:
                self.tunnels.append(target)
                self._conns.add(upstream)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                upstream.sendall(rest)
            back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
            back.start()
            sent = len(rest)
            while data := client.recv(65536):
                sent += len(data)
                if sent > self.reset_after and self._take_reset(target):
                    _reset(client)
                    return
                upstream.sendall(data)
        except OSError:
            return
        finally:
            for s in (client, upstream):
                if s is None:
                    continue
                with self._lock:
                    self._conns.discard(s)
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def _take_reset(self, target: str) -> bool:
        with self._lock:
            if self.resets_left <= 0:
                return False
            self.resets_left -= 1
            self.reset_tunnels.append(target)
            return True


def _copy(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
