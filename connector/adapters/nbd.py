"""A small NBD client and the NBD disk reader.

The client speaks the fixed newstyle handshake (NBD_OPT_GO with block size
information, structured replies, the `base:allocation` meta context, optional
STARTTLS) and, once connected, sends NBD_CMD_READ and NBD_CMD_BLOCK_STATUS
with several requests in flight on one connection, matched to their replies by
handle. Servers tested: nbdkit (file plugin, vddk plugin in production) and
qemu-nbd. The protocol is specified in the NBD project's doc/proto.md.

`NbdReader` implements the `DiskReader` port on top of it: reads are cut to the
server's maximum request size (qemu-nbd refuses more than 32 MiB), kept a few
at a time in flight with bounded memory, retried piece by piece under the
connector's one `RetryPolicy` (from the composition root) on transient errors
(EIO, a dropped connection), and a failure
names the disk and the offset. `allocated_extents` asks the server which ranges
hold data, so a full read can skip what reads as zeros.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import functools
import ipaddress
import os
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from connector.domain.extents import merge
from connector.domain.model import Extent
from connector.errors import (
    ConfigError,
    NotFoundError,
    PermanentError,
    TLSTrustError,
    TransientError,
    UnreachableError,
)
from connector.logging import get_logger
from connector.retry import Retryable, RetryPolicy
from connector.tls import client_context, describe_ssl_error

log = get_logger(__name__)

MiB = 1024 * 1024
DEFAULT_PORT = 10809
# The largest request a client may send when the server does not say (proto.md);
# qemu-nbd refuses anything larger.
DEFAULT_MAX_BLOCK = 32 * MiB
DEFAULT_IN_FLIGHT = 8

# ------------------------------------------------------------------ protocol constants

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OLDSTYLE_MAGIC = 0x00420281861253
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_STARTTLS = 5
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TFLAG_HAS_FLAGS = 1 << 0
TFLAG_READ_ONLY = 1 << 1
TFLAG_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_DISC = 2
CMD_BLOCK_STATUS = 7

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT | 2

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

BASE_ALLOCATION = "base:allocation"

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_STRUCTURED_REST = struct.Struct(">HHQI")  # after the 4-byte magic
_OPT_REQUEST = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

# NBD error numbers (proto.md) and what they mean for a retry.
NBD_ERRNO = {
    1: "EPERM",
    5: "EIO",
    12: "ENOMEM",
    22: "EINVAL",
    28: "ENOSPC",
    75: "EOVERFLOW",
    95: "ENOTSUP",
    108: "ESHUTDOWN",
}
_TRANSIENT_ERRNOS = {5, 12, 108}

_REP_ERRORS = {
    REP_ERR_UNSUP: "unsupported",
    REP_ERR_POLICY: "refused by the server's policy",
    REP_ERR_INVALID: "invalid",
    REP_ERR_PLATFORM: "not supported on the server's platform",
    REP_ERR_TLS_REQD: "TLS is required",
    REP_ERR_UNKNOWN: "unknown export",
    REP_ERR_SHUTDOWN: "the server is shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "block size information is required",
}


# ----------------------------------------------------------------------------- errors


class NbdConnectionLost(Retryable):
    """The connection failed or closed in the middle of a request."""


class NbdServerError(Retryable):
    """The server answered a request with an error; `transient` says if retrying may help."""

    def __init__(self, errno: int, message: str) -> None:
        self.errno = errno
        self.server_message = message
        name = NBD_ERRNO.get(errno, f"error {errno}")
        text = os.strerror(errno) if errno in NBD_ERRNO else "unknown error"
        detail = f": {message}" if message else ""
        super().__init__(f"the server answered {name} ({text}){detail}")

    @property
    def transient(self) -> bool:
        return self.errno in _TRANSIENT_ERRNOS


class NbdProtocolError(PermanentError):
    """The server broke the protocol (or is not an NBD server)."""


# ---------------------------------------------------------------------------- address


@dataclass(frozen=True)
class NbdAddress:
    """Where an export is: a Unix socket, or a host and port (with TLS for nbds://)."""

    export: str = ""
    socket_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    tls: bool = False
    ca_file: Path | None = None

    def __str__(self) -> str:
        name = self.export
        if self.socket_path is not None:
            return f"nbd+unix:///{name}?socket={self.socket_path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{'nbds' if self.tls else 'nbd'}://{host}:{self.port}/{name}"

    @property
    def is_local(self) -> bool:
        """A Unix socket or a loopback address: nothing crosses the network."""
        if self.socket_path is not None:
            return True
        if self.host in ("localhost", "localhost.localdomain"):
            return True
        try:
            return ipaddress.ip_address(self.host or "").is_loopback
        except ValueError:
            return False


def parse_nbd_uri(uri: str, ca_file: Path | None = None) -> NbdAddress:
    """An NBD URI (`nbd://host[:port]/export`, `nbds://...`, `nbd+unix:///export?socket=PATH`).

    Raise ConfigError for anything else, for plain `nbd://` to a host that is
    not this machine (disk data would cross the network unencrypted), and for
    credentials in the URI.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme not in ("nbd", "nbds", "nbd+unix"):
        raise ConfigError(
            f"{uri!r} is not an NBD URI this connector reads: use nbd+unix:///EXPORT?socket=PATH, "
            "nbds://HOST[:PORT]/EXPORT (TLS) or nbd://127.0.0.1[:PORT]/EXPORT"
        )
    if parts.username or parts.password:
        raise ConfigError(f"the NBD URI {uri!r} must not carry a user name or password")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query, keep_blank_values=True)
    if scheme == "nbd+unix":
        unknown = set(query) - {"socket"}
        sockets = query.get("socket", [])
        if parts.netloc:
            raise ConfigError(f"the NBD URI {uri!r} names a host; nbd+unix:/// takes none")
        if len(sockets) != 1 or not sockets[0]:
            raise ConfigError(f"the NBD URI {uri!r} needs exactly one ?socket=PATH")
        if unknown:
            raise ConfigError(f"the NBD URI {uri!r} has unknown parameters: {sorted(unknown)}")
        return NbdAddress(export=export, socket_path=sockets[0])
    if query:
        raise ConfigError(f"the NBD URI {uri!r} has unknown parameters: {sorted(query)}")
    if not parts.hostname:
        raise ConfigError(f"the NBD URI {uri!r} has no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"the NBD URI {uri!r} has an invalid port") from None
    address = NbdAddress(
        export=export, host=parts.hostname, port=port, tls=scheme == "nbds", ca_file=ca_file
    )
    if not address.tls and not address.is_local:
        raise ConfigError(
            f"the NBD URI {uri!r} reaches {parts.hostname} without TLS, so disk data would "
            "cross the network unencrypted; use nbds:// (the server needs TLS certificates) "
            "or a Unix socket"
        )
    return address


# ------------------------------------------------------------------------- connection


@dataclass
class _Request:
    """One request on the wire and what its replies filled in."""

    command: int
    offset: int
    length: int
    buf: bytearray | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)  # (length, flags)
    error: NbdServerError | None = None
    done: bool = False


class NbdConnection:
    """One negotiated connection to one export (not thread-safe)."""

    def __init__(self, sock: socket.socket, address: NbdAddress) -> None:
        self._sock = sock
        self.address = address
        self.size = 0
        self.transmission_flags = 0
        self.min_block = 1
        self.preferred_block = 4096
        self.max_block = DEFAULT_MAX_BLOCK
        self.structured = False
        self.allocation_context: int | None = None
        self._handles = 0
        self._pending: dict[int, _Request] = {}
        self._closed = False

    # -- opening -------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        address: NbdAddress,
        *,
        timeout: float = 60.0,
        block_status: bool = True,
    ) -> NbdConnection:
        """Connect and negotiate. UnreachableError when nothing listens there."""
        try:
            if address.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(address.socket_path)
            else:
                sock = socket.create_connection((address.host, address.port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise UnreachableError(f"cannot connect to the NBD server at {address}: {exc}") from exc
        conn = cls(sock, address)
        try:
            conn._handshake(block_status)
        except ssl.SSLError as exc:
            conn._drop()
            raise TLSTrustError(
                f"{describe_ssl_error(str(address.host), exc)} (for NBD exports: "
                "[transport] nbd_ca_file)"
            ) from exc
        except OSError as exc:
            conn._drop()
            raise NbdConnectionLost(f"handshake with {address} failed: {exc}") from exc
        except BaseException:
            conn._drop()
            raise
        return conn

    def _handshake(self, block_status: bool) -> None:
        magic, second, flags = struct.unpack(">QQH", self._recv_exact(18))
        if magic != NBDMAGIC:
            raise NbdProtocolError(f"{self.address} is not an NBD server (bad magic)")
        if second == OLDSTYLE_MAGIC:
            raise NbdProtocolError(
                f"{self.address} speaks the oldstyle NBD handshake, which is not supported; "
                "run the server in newstyle mode"
            )
        if second != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError(f"{self.address} does not speak the fixed newstyle handshake")
        no_zeroes = bool(flags & FLAG_NO_ZEROES)
        self._sock.sendall(
            _U32.pack(FLAG_C_FIXED_NEWSTYLE | (FLAG_C_NO_ZEROES if no_zeroes else 0))
        )
        if self.address.tls:
            self._starttls()
        rtype, _data = self._option(OPT_STRUCTURED_REPLY, b"")
        self.structured = rtype == REP_ACK
        if self.structured and block_status:
            self._set_meta_context()
        self._go(no_zeroes)

    def _starttls(self) -> None:
        rtype, data = self._option(OPT_STARTTLS, b"")
        if rtype != REP_ACK:
            raise PermanentError(
                f"the NBD server at {self.address} does not offer TLS "
                f"({_rep_text(rtype, data)}); start it with TLS certificates or use a Unix socket"
            )
        ctx = client_context(self.address.ca_file)
        self._sock = ctx.wrap_socket(self._sock, server_hostname=self.address.host)

    def _option(self, option: int, data: bytes) -> tuple[int, bytes]:
        """Send one option and read its single reply (type, data)."""
        self._send_option(option, data)
        return self._option_reply(option)

    def _send_option(self, option: int, data: bytes) -> None:
        self._sock.sendall(_OPT_REQUEST.pack(IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, rtype, length = _OPT_REPLY.unpack(self._recv_exact(_OPT_REPLY.size))
        if magic != OPT_REPLY_MAGIC or opt != option:
            raise NbdProtocolError(f"{self.address} answered option {option} out of order")
        if length > 64 * 1024 * 1024:
            raise NbdProtocolError(f"{self.address} sent an oversized option reply")
        return rtype, self._recv_exact(length)

    def _set_meta_context(self) -> None:
        name = self.address.export.encode()
        query = BASE_ALLOCATION.encode()
        payload = _U32.pack(len(name)) + name + _U32.pack(1) + _U32.pack(len(query)) + query
        self._send_option(OPT_SET_META_CONTEXT, payload)
        while True:
            rtype, data = self._option_reply(OPT_SET_META_CONTEXT)
            if rtype == REP_META_CONTEXT and len(data) >= 4:
                (context_id,) = _U32.unpack_from(data)
                if data[4:].decode(errors="replace") == BASE_ALLOCATION:
                    self.allocation_context = context_id
            elif rtype == REP_ACK:
                return
            elif rtype & REP_FLAG_ERROR:
                log.info("nbd.no_block_status", server=str(self.address), reply_type=rtype)
                self.allocation_context = None
                return
            else:
                raise NbdProtocolError(f"{self.address} answered SET_META_CONTEXT with {rtype}")

    def _go(self, no_zeroes: bool) -> None:
        name = self.address.export.encode()
        payload = _U32.pack(len(name)) + name + _U16.pack(1) + _U16.pack(INFO_BLOCK_SIZE)
        self._send_option(OPT_GO, payload)
        got_export = False
        while True:
            rtype, data = self._option_reply(OPT_GO)
            if rtype == REP_INFO and len(data) >= 2:
                (info,) = _U16.unpack_from(data)
                if info == INFO_EXPORT and len(data) >= 12:
                    self.size, self.transmission_flags = struct.unpack_from(">QH", data, 2)
                    got_export = True
                elif info == INFO_BLOCK_SIZE and len(data) >= 14:
                    self.min_block, self.preferred_block, self.max_block = struct.unpack_from(
                        ">III", data, 2
                    )
            elif rtype == REP_ACK:
                break
            elif rtype == REP_ERR_UNSUP:
                self._export_name(no_zeroes)  # a server older than NBD_OPT_GO
                return
            elif rtype == REP_ERR_UNKNOWN:
                raise NotFoundError(
                    f"the NBD server at {self.address} has no export named "
                    f"{self.address.export!r}{_message(data)}"
                )
            elif rtype == REP_ERR_TLS_REQD:
                raise PermanentError(
                    f"the NBD server at {self.address} requires TLS; use an nbds:// URI"
                )
            elif rtype & REP_FLAG_ERROR:
                raise PermanentError(
                    f"the NBD server at {self.address} refused the export: {_rep_text(rtype, data)}"
                )
        if not got_export:
            raise NbdProtocolError(f"{self.address} did not say how large the export is")
        self._check_block_sizes()

    def _export_name(self, no_zeroes: bool) -> None:
        name = self.address.export.encode()
        self._sock.sendall(_OPT_REQUEST.pack(IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
        self.size, self.transmission_flags = struct.unpack(">QH", self._recv_exact(10))
        if not no_zeroes:
            self._recv_exact(124)

    def _check_block_sizes(self) -> None:
        if self.max_block == 0 or self.max_block == 0xFFFFFFFF:
            self.max_block = DEFAULT_MAX_BLOCK
        if self.min_block == 0:
            self.min_block = 1
        if self.min_block > self.max_block:
            raise NbdProtocolError(f"{self.address} advertises a minimum block above its maximum")

    # -- transmission ----------------------------------------------------------------

    @property
    def can_block_status(self) -> bool:
        return self.allocation_context is not None

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def submit(self, command: int, offset: int, length: int, buf: bytearray | None = None) -> int:
        """Send one request; return its handle.

        A read fills `buf` (at least `length` bytes; its content is overwritten,
        holes included), or a new buffer.
        """
        self._handles += 1
        handle = self._handles
        request = _Request(command, offset, length)
        if command == CMD_READ:
            if buf is not None and len(buf) < length:
                raise ValueError("read buffer smaller than the request")
            request.buf = buf if buf is not None else bytearray(length)
        self._pending[handle] = request
        try:
            self._sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, command, handle, offset, length))
        except OSError as exc:
            raise NbdConnectionLost(f"sending a request to {self.address} failed: {exc}") from exc
        return handle

    def receive(self) -> tuple[int, _Request] | None:
        """Read one reply (or one chunk of a structured reply).

        Returns the handle and its request when that request is complete, else None.
        """
        try:
            return self._receive()
        except OSError as exc:
            raise NbdConnectionLost(f"reading a reply from {self.address} failed: {exc}") from exc

    def _receive(self) -> tuple[int, _Request] | None:
        head = self._recv_exact(4)
        (magic,) = _U32.unpack(head)
        if magic == SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self._recv_exact(12))
            request = self._request(handle)
            if error:
                request.error = NbdServerError(error, "")
            elif request.command == CMD_READ:
                assert request.buf is not None
                self._recv_into(memoryview(request.buf)[: request.length])
            elif request.command == CMD_BLOCK_STATUS:
                raise NbdProtocolError(f"{self.address} answered block status without a chunk")
            return self._finish(handle, request)
        if magic != STRUCTURED_REPLY_MAGIC:
            raise NbdProtocolError(f"{self.address} sent a reply with a bad magic ({magic:#x})")
        flags, rtype, handle, length = _STRUCTURED_REST.unpack(
            self._recv_exact(_STRUCTURED_REST.size)
        )
        request = self._request(handle)
        if rtype == REPLY_TYPE_OFFSET_DATA:
            if length < 8 or request.buf is None:
                raise NbdProtocolError(f"{self.address} sent a malformed data chunk")
            (offset,) = _U64.unpack(self._recv_exact(8))
            start = offset - request.offset
            count = length - 8
            if start < 0 or start + count > request.length:
                raise NbdProtocolError(f"{self.address} sent data outside the requested range")
            self._recv_into(memoryview(request.buf)[start : start + count])
        elif rtype == REPLY_TYPE_OFFSET_HOLE:
            offset, count = struct.unpack(">QI", self._recv_exact(length))
            start = offset - request.offset
            if request.buf is None or start < 0 or start + count > request.length:
                raise NbdProtocolError(f"{self.address} sent a hole outside the requested range")
            memoryview(request.buf)[start : start + count] = _zeros(count)
        elif rtype == REPLY_TYPE_BLOCK_STATUS:
            data = self._recv_exact(length)
            if length < 12 or (length - 4) % 8:
                raise NbdProtocolError(f"{self.address} sent a malformed block status chunk")
            (context,) = _U32.unpack_from(data)
            if context == self.allocation_context:
                request.extents.extend(struct.iter_unpack(">II", data[4:]))
        elif rtype & REPLY_TYPE_ERROR_BIT:
            data = self._recv_exact(length)
            if length < 6:
                raise NbdProtocolError(f"{self.address} sent a malformed error chunk")
            error, msg_len = struct.unpack_from(">IH", data)
            message = data[6 : 6 + msg_len].decode(errors="replace")
            if rtype == REPLY_TYPE_ERROR_OFFSET and len(data) >= 6 + msg_len + 8:
                (where,) = _U64.unpack_from(data, 6 + msg_len)
                message = f"{message} (at offset {where})" if message else f"at offset {where}"
            if request.error is None:
                request.error = NbdServerError(error or errno_mod.EIO, message)
        elif rtype == REPLY_TYPE_NONE:
            if length:
                self._recv_exact(length)
        else:
            raise NbdProtocolError(f"{self.address} sent an unknown reply chunk type {rtype}")
        if flags & REPLY_FLAG_DONE:
            return self._finish(handle, request)
        return None

    def _request(self, handle: int) -> _Request:
        request = self._pending.get(handle)
        if request is None:
            raise NbdProtocolError(f"{self.address} answered a request that was not sent")
        return request

    def _finish(self, handle: int, request: _Request) -> tuple[int, _Request]:
        del self._pending[handle]
        request.done = True
        return handle, request

    def wait(self, handle: int) -> _Request:
        """Read replies until request `handle` is complete (others complete on the way)."""
        done: dict[int, _Request] = {}
        while handle not in done:
            got = self.receive()
            if got is not None:
                done[got[0]] = got[1]
        return done[handle]

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) when the connection is idle, then close it."""
        if self._closed:
            return
        self._closed = True
        if not self._pending:
            with contextlib.suppress(OSError):
                self._sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        self._drop()

    def _drop(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()

    # -- socket helpers ------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        got, n = 0, len(view)
        recv_into = self._sock.recv_into
        while got < n:
            count = recv_into(view[got:], n - got)
            if count == 0:
                raise ConnectionResetError("the server closed the connection")
            got += count


_ZEROS = bytes(4 * MiB)


def _zeros(count: int) -> bytes | memoryview:
    """`count` zero bytes, without allocating for the common sizes."""
    return memoryview(_ZEROS)[:count] if count <= len(_ZEROS) else bytes(count)


def _message(data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return f" ({text})" if text else ""


def _rep_text(rtype: int, data: bytes) -> str:
    return _REP_ERRORS.get(rtype, f"reply {rtype:#x}") + _message(data)


# ----------------------------------------------------------------------------- reader


@dataclass
class _Slot:
    """One extent of a stream: its pieces not yet received, and those received."""

    extent: Extent
    left: int = 0
    parts: list[_Piece] = field(default_factory=list)


@dataclass
class _Piece:
    """One read request of a stream: where it goes and how often it was tried."""

    slot: _Slot  # the extent it belongs to
    offset: int
    length: int
    attempts: int = 0
    handle: int = 0
    buf: bytearray | None = None  # from the reader's pool while the piece is alive
    received: bool = False


class NbdReader:
    """Reads one NBD export; implements `DiskReader`, streaming and allocation queries.

    One connection, several requests in flight. A reader is used by one thread
    at a time. With `capacity`, reads and allocated extents stop there even
    when the export is longer.
    """

    def __init__(
        self,
        address: NbdAddress,
        *,
        description: str,
        capacity: int | None = None,
        retry: RetryPolicy,
        max_request: int = DEFAULT_MAX_BLOCK,
        in_flight: int = DEFAULT_IN_FLIGHT,
        timeout: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if max_request <= 0 or in_flight <= 0:
            raise ValueError("max_request and in_flight must be positive")
        self.address = address
        self.what = description
        self._retry = retry
        self._timeout = timeout
        self._sleep = sleep
        self._on_close = on_close
        self._in_flight = in_flight
        self._conn: NbdConnection | None = None
        self._closed = False
        self._pool: list[bytearray] = []
        self.bytes_read = 0
        self.requests = 0
        self.retries = 0
        try:
            conn = self._connect()
            if capacity is not None and conn.size < capacity:
                raise PermanentError(
                    f"{self.what}: the NBD export at {address} holds {conn.size} bytes, "
                    f"fewer than the disk's {capacity}"
                )
            # the disk ends at its capacity, even if the export goes on
            self._size = conn.size if capacity is None else capacity
            self._request_size = max(
                conn.min_block, min(max_request, conn.max_block, DEFAULT_MAX_BLOCK)
            )
            self._request_size -= self._request_size % conn.min_block
        except BaseException:
            self.close()
            raise

    # -- properties ----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def request_size(self) -> int:
        """The largest read sent in one request."""
        return self._request_size

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- DiskReader ----------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset` (several requests in flight when large)."""
        for _extent, data in self.read_extents([Extent(offset, length)]):
            return data
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        finally:
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> NbdReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- streaming -----------------------------------------------------------------

    def read_extents(self, extents: Iterable[Extent]) -> Iterator[tuple[Extent, bytes]]:
        """Each extent's bytes, in order, with up to `in_flight` requests outstanding.

        Memory stays below about `in_flight` requests plus one extent.
        """
        if self._closed:
            raise ValueError("read on a closed reader")
        source = iter(extents)
        exhausted = False
        window: deque[_Piece] = deque()  # sent, in order, not yet delivered
        unsent: deque[_Piece] = deque()  # cut from an extent, not yet sent
        slots: deque[_Slot] = deque()  # extents not yet delivered, in order
        by_handle: dict[int, _Piece] = {}
        try:
            while True:
                while len(window) < self._in_flight:
                    if unsent:
                        piece = unsent.popleft()
                        piece.buf = self._take_buffer()
                        window.append(piece)
                        self._submit(piece, window, by_handle)
                        continue
                    extent = None if exhausted else next(source, None)
                    if extent is None:
                        exhausted = True
                        break
                    self._check_range(extent)
                    slot = _Slot(extent)
                    slots.append(slot)
                    unsent.extend(self._cut(slot, extent))
                while slots and slots[0].left == 0:
                    done = slots.popleft()
                    data = self._assemble(done.parts)
                    self.bytes_read += len(data)
                    yield done.extent, data
                if not window:
                    if exhausted and not unsent and not slots:
                        return
                    continue
                head = window[0]
                while not head.received:
                    self._step(window, by_handle)
                window.popleft()
                head.slot.parts.append(head)
                head.slot.left -= 1
        finally:
            if by_handle and self._conn is not None:
                # abandoned with replies still due: this connection cannot be reused
                self._conn._drop()
                self._conn = None

    def _assemble(self, pieces: list[_Piece]) -> bytes:
        """The bytes of an extent's pieces; their buffers go back to the pool."""
        views = [memoryview(p.buf)[: p.length] for p in pieces if p.buf is not None]
        data = bytes(views[0]) if len(views) == 1 else b"".join(views)
        for p in pieces:
            if p.buf is not None:
                self._give_buffer(p.buf)
                p.buf = None
        return data

    def _take_buffer(self) -> bytearray:
        return self._pool.pop() if self._pool else bytearray(self._request_size)

    def _give_buffer(self, buf: bytearray) -> None:
        if len(self._pool) <= self._in_flight:
            self._pool.append(buf)

    def _check_range(self, extent: Extent) -> None:
        if extent.offset < 0 or extent.length < 0:
            raise ValueError(f"negative offset or length ({extent.offset}, {extent.length})")
        if extent.end > self._size:
            raise ValueError(
                f"read [{extent.offset}, {extent.end}) beyond the end of {self.what} "
                f"({self._size} bytes)"
            )

    def _cut(self, slot: _Slot, extent: Extent) -> list[_Piece]:
        step = self._request_size
        pieces = [
            _Piece(slot, offset, min(step, extent.end - offset))
            for offset in range(extent.offset, extent.end, step)
        ]
        slot.left = len(pieces)
        return pieces

    def _connection(self) -> NbdConnection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> NbdConnection:
        def attempt() -> NbdConnection:
            return NbdConnection.open(self.address, timeout=self._timeout)

        conn = self._retry.call(
            attempt,
            f"connecting to {self.address} for {self.what}",
            retryable=(UnreachableError, NbdConnectionLost),
            sleep=self._sleep,
        )
        self._conn = conn
        return conn

    def _send(self, piece: _Piece, by_handle: dict[int, _Piece]) -> None:
        piece.attempts += 1
        conn = self._connection()
        piece.handle = conn.submit(CMD_READ, piece.offset, piece.length, piece.buf)
        by_handle[piece.handle] = piece
        self.requests += 1

    def _step(self, window: deque[_Piece], by_handle: dict[int, _Piece]) -> None:
        """Receive one reply; retry a failed piece, or reconnect after a lost connection."""
        conn = self._connection()
        try:
            got = conn.receive()
        except NbdConnectionLost as exc:
            self._reconnect(window, by_handle, exc)
            return
        if got is None:
            return
        handle, request = got
        piece = by_handle.pop(handle, None)
        if piece is None:
            return
        if request.error is None:
            piece.received = True
            return
        error = request.error
        if not error.transient or piece.attempts >= self._retry.attempts:
            raise self._failure(piece, error)
        pause = self._retry.delay(piece.attempts)
        log.info(
            "nbd.read_retry",
            disk=self.what,
            offset=piece.offset,
            attempt=piece.attempts,
            attempts=self._retry.attempts,
            error=str(error),
            pause=round(pause, 3),
        )
        self.retries += 1
        self._sleep(pause)
        self._submit(piece, window, by_handle)

    def _submit(self, piece: _Piece, window: deque[_Piece], by_handle: dict[int, _Piece]) -> None:
        """Send a piece that is in the window; if the connection is gone, reconnect."""
        try:
            self._send(piece, by_handle)
        except NbdConnectionLost as exc:
            self._reconnect(window, by_handle, exc)

    def _reconnect(
        self, window: deque[_Piece], by_handle: dict[int, _Piece], exc: NbdConnectionLost
    ) -> None:
        """Open a new connection and send again every piece still waiting for data."""
        while True:
            if self._conn is not None:
                self._conn._drop()
                self._conn = None
            by_handle.clear()
            waiting = [p for p in window if not p.received]
            worst = max((p.attempts for p in waiting), default=0)
            if worst >= self._retry.attempts:
                first = min(waiting, key=lambda p: p.offset)
                raise self._failure(first, exc)
            pause = self._retry.delay(max(worst, 1))
            log.info(
                "nbd.reconnect",
                server=str(self.address),
                error=str(exc),
                attempt=worst,
                pause=round(pause, 3),
            )
            self.retries += 1
            self._sleep(pause)
            try:
                for piece in waiting:
                    self._send(piece, by_handle)
                return
            except NbdConnectionLost as again:
                exc = again

    def _failure(self, piece: _Piece, error: Exception) -> Exception:
        text = (
            f"reading {self.what} through NBD ({self.address}) failed at offset {piece.offset} "
            f"({piece.length} bytes) after {piece.attempts} attempt"
            f"{'s' if piece.attempts != 1 else ''}: {error}"
        )
        if isinstance(error, NbdServerError) and not error.transient:
            return PermanentError(text)
        return TransientError(text)

    # -- allocation ----------------------------------------------------------------

    def allocated_extents(self) -> list[Extent] | None:
        """The ranges that may hold data (block status `base:allocation`), merged.

        Ranges the server reports as reading zeros (NBD_STATE_ZERO) are left
        out. None when the server offers no block status.
        """
        if self._closed:
            raise ValueError("allocated_extents on a closed reader")
        if not self._connection().can_block_status:
            return None
        out: list[Extent] = []
        offset = 0
        # at most 1 GiB per request: comfortably below the u32 limit and aligned
        step = 1024 * MiB
        while offset < self._size:
            length = min(step, self._size - offset)
            descriptors = self._retry.call(
                functools.partial(self._block_status, offset, length),
                f"block status of {self.what} at offset {offset}",
                retryable=(NbdConnectionLost, _TransientStatus),
                sleep=self._sleep,
            )
            position = offset
            for count, flags in descriptors:
                count = min(count, self._size - position)
                if count <= 0:
                    break
                if not flags & STATE_ZERO:
                    out.append(Extent(position, count))
                position += count
            if position <= offset:
                raise NbdProtocolError(f"{self.address} answered block status with no progress")
            offset = position
        return merge(out)

    def _block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        conn = self._connection()
        try:
            handle = conn.submit(CMD_BLOCK_STATUS, offset, length)
            request = conn.wait(handle)
        except NbdConnectionLost:
            if self._conn is not None:
                self._conn._drop()
                self._conn = None
            raise
        if request.error is not None:
            if request.error.transient:
                raise _TransientStatus(str(request.error))
            raise PermanentError(
                f"block status of {self.what} at offset {offset} failed: {request.error}"
            )
        if not request.extents:
            raise NbdProtocolError(f"{self.address} answered block status with no extents")
        return request.extents


class _TransientStatus(Retryable):
    """A block status request failed with a transient server error."""
