"""The NBD client against a scripted server on a Unix socket (handshake, replies, block
status): each way a server can break the protocol gives the message the
troubleshooting guide documents."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connector.adapters import nbd
from connector.adapters.nbd import NbdConnection, NbdReader, parse_nbd_uri
from connector.errors import ConnectorError
from connector.retry import RetryPolicy

Script = Callable[[socket.socket], None]
GREETING = struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, nbd.FLAG_FIXED_NEWSTYLE)


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    return data


def read_option(conn: socket.socket) -> int:
    _magic, option, length = struct.unpack(">QII", recv_exact(conn, 16))
    recv_exact(conn, length)
    return int(option)


def reply(conn: socket.socket, option: int, rtype: int, data: bytes = b"") -> None:
    conn.sendall(struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, option, rtype, len(data)) + data)


def negotiated(conn: socket.socket) -> None:
    """Greeting, client flags, structured replies refused: the client goes on to GO."""
    conn.sendall(GREETING)
    recv_exact(conn, 4)
    reply(conn, read_option(conn), nbd.REP_ERR_UNSUP)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Script], str]]:
    threads: list[threading.Thread] = []
    servers: list[socket.socket] = []

    def start(script: Script) -> str:
        path = str(tmp_path / f"nbd-{len(servers)}.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        servers.append(server)

        def run() -> None:
            conn, _ = server.accept()
            with conn:
                try:
                    script(conn)
                    conn.recv(1)  # hold the connection until the client drops it
                except OSError:
                    pass

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return f"nbd+unix:///disk?socket={path}"

    yield start
    for server in servers:
        server.close()
    for thread in threads:
        thread.join(timeout=10)


def open_error(uri: str) -> str:
    with pytest.raises(ConnectorError) as info:
        NbdConnection.open(parse_nbd_uri(uri), timeout=10)
    return str(info.value)


def test_a_server_that_is_not_nbd_or_too_old(serve: Callable[[Script], str]) -> None:
    uri = serve(lambda c: c.sendall(bytes(18)))
    assert open_error(uri).endswith("is not an NBD server (bad magic)")
    uri = serve(lambda c: c.sendall(struct.pack(">QQH", nbd.NBDMAGIC, nbd.OLDSTYLE_MAGIC, 0)))
    assert open_error(uri).endswith(
        "speaks the oldstyle NBD handshake, which is not supported; run the server in newstyle mode"
    )
    uri = serve(lambda c: c.sendall(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 0)))
    assert open_error(uri).endswith("does not speak the fixed newstyle handshake")
    uri = serve(lambda c: c.shutdown(socket.SHUT_RDWR))  # accepts, then hangs up
    message = open_error(uri)
    assert message.startswith("handshake with ") and message.endswith(
        "failed: the server closed the connection"
    )


def test_option_replies_that_break_the_protocol(serve: Callable[[Script], str]) -> None:
    def out_of_order(c: socket.socket) -> None:
        c.sendall(GREETING)
        recv_exact(c, 4)
        reply(c, read_option(c) + 1, nbd.REP_ACK)

    assert open_error(serve(out_of_order)).endswith(
        f"answered option {nbd.OPT_STRUCTURED_REPLY} out of order"
    )

    def oversized(c: socket.socket) -> None:
        c.sendall(GREETING)
        recv_exact(c, 4)
        option = read_option(c)
        c.sendall(struct.pack(">QIII", nbd.OPT_REPLY_MAGIC, option, nbd.REP_ACK, 65 << 20))

    assert open_error(serve(oversized)).endswith("sent an oversized option reply")

    def bad_meta_context(c: socket.socket) -> None:
        c.sendall(GREETING)
        recv_exact(c, 4)
        reply(c, read_option(c), nbd.REP_ACK)  # structured replies: yes
        reply(c, read_option(c), 99)  # SET_META_CONTEXT: a reply type that does not exist

    assert open_error(serve(bad_meta_context)).endswith("answered SET_META_CONTEXT with 99")


def test_go_replies_that_refuse_or_describe_no_export(serve: Callable[[Script], str]) -> None:
    def refused(c: socket.socket) -> None:
        negotiated(c)
        reply(c, read_option(c), nbd.REP_ERR_POLICY, b"not for you")

    message = open_error(serve(refused))
    assert " refused the export: " in message and "not for you" in message

    def no_size(c: socket.socket) -> None:
        negotiated(c)
        reply(c, read_option(c), nbd.REP_ACK)

    assert open_error(serve(no_size)).endswith("did not say how large the export is")

    def bad_block_sizes(c: socket.socket) -> None:
        negotiated(c)
        option = read_option(c)
        export = struct.pack(">HQH", nbd.INFO_EXPORT, 1 << 20, nbd.TFLAG_HAS_FLAGS)
        sizes = struct.pack(">HIII", nbd.INFO_BLOCK_SIZE, 4096, 4096, 512)
        reply(c, option, nbd.REP_INFO, export)
        reply(c, option, nbd.REP_INFO, sizes)
        reply(c, option, nbd.REP_ACK)

    assert open_error(serve(bad_block_sizes)).endswith(
        "advertises a minimum block above its maximum"
    )


def test_a_server_without_tls_for_an_nbds_uri() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def run() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(GREETING)
            recv_exact(conn, 4)
            reply(conn, read_option(conn), nbd.REP_ERR_POLICY)
            conn.recv(1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        message = open_error(f"nbds://127.0.0.1:{port}/disk")
    finally:
        server.close()
        thread.join(timeout=10)
    assert message.startswith("the NBD server at ")
    assert "does not offer TLS" in message
    assert message.endswith("start it with TLS certificates or use a Unix socket")


def handshake_with_structured_replies(c: socket.socket) -> None:
    """Structured replies, base:allocation as context 1, and a 1 MiB export."""
    c.sendall(GREETING)
    recv_exact(c, 4)
    reply(c, read_option(c), nbd.REP_ACK)
    option = read_option(c)
    reply(c, option, nbd.REP_META_CONTEXT, struct.pack(">I", 1) + b"base:allocation")
    reply(c, option, nbd.REP_ACK)
    option = read_option(c)
    reply(c, option, nbd.REP_INFO, struct.pack(">HQH", nbd.INFO_EXPORT, 1 << 20, 1))
    reply(c, option, nbd.REP_ACK)


def chunk(handle: int, rtype: int, payload: bytes, flags: int = nbd.REPLY_FLAG_DONE) -> bytes:
    rest = struct.pack(">HHQI", flags, rtype, handle, len(payload))
    return struct.pack(">I", nbd.STRUCTURED_REPLY_MAGIC) + rest + payload


Reply = Callable[[int, int], bytes]  # (handle, offset) -> what the server sends

REPLIES: list[tuple[int, Reply, str]] = [
    (nbd.CMD_READ, lambda h, o: bytes(16), "sent a reply with a bad magic (0x0)"),
    (
        nbd.CMD_READ,
        lambda h, o: chunk(h, nbd.REPLY_TYPE_OFFSET_DATA, b"abcd"),
        "sent a malformed data chunk",
    ),
    (
        nbd.CMD_READ,
        lambda h, o: chunk(h, nbd.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", o + 4096) + bytes(16)),
        "sent data outside the requested range",
    ),
    (
        nbd.CMD_READ,
        lambda h, o: chunk(h, nbd.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", o, 8192)),
        "sent a hole outside the requested range",
    ),
    (
        nbd.CMD_BLOCK_STATUS,
        lambda h, o: chunk(h, nbd.REPLY_TYPE_BLOCK_STATUS, bytes(8)),
        "sent a malformed block status chunk",
    ),
    (
        nbd.CMD_READ,
        lambda h, o: chunk(h, nbd.REPLY_TYPE_ERROR, bytes(4)),
        "sent a malformed error chunk",
    ),
    (nbd.CMD_READ, lambda h, o: chunk(h, 77, b""), "sent an unknown reply chunk type 77"),
    (nbd.CMD_READ, lambda h, o: chunk(h + 1, 0, b""), "answered a request that was not sent"),
    (
        nbd.CMD_BLOCK_STATUS,
        lambda h, o: struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, h),
        "answered block status without a chunk",
    ),
]


@pytest.mark.parametrize(("command", "answer", "message"), REPLIES)
def test_replies_that_break_the_protocol_name_the_server(
    serve: Callable[[Script], str], command: int, answer: Reply, message: str
) -> None:
    def script(c: socket.socket) -> None:
        handshake_with_structured_replies(c)
        _magic, _flags, _cmd, handle, offset, _length = struct.unpack(">IHHQQI", recv_exact(c, 28))
        c.sendall(answer(handle, offset))

    uri = serve(script)
    conn = NbdConnection.open(parse_nbd_uri(uri), timeout=10)
    try:
        buf = bytearray(4096) if command == nbd.CMD_READ else None
        handle = conn.submit(command, 0, 4096, buf)
        with pytest.raises(ConnectorError) as info:
            conn.wait(handle)
    finally:
        conn.close()
    assert str(info.value) == f"{parse_nbd_uri(uri)} {message}"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (lambda h: chunk(h, nbd.REPLY_TYPE_NONE, b""), "answered block status with no extents"),
        (
            lambda h: chunk(h, nbd.REPLY_TYPE_BLOCK_STATUS, struct.pack(">III", 1, 0, 0)),
            "answered block status with no progress",
        ),
    ],
)
def test_block_status_answers_without_extents_or_progress_are_refused(
    serve: Callable[[Script], str], answer: Callable[[int], bytes], message: str
) -> None:
    def script(c: socket.socket) -> None:
        handshake_with_structured_replies(c)
        handle = struct.unpack(">IHHQQI", recv_exact(c, 28))[3]
        c.sendall(answer(handle))

    uri = serve(script)
    reader = NbdReader(parse_nbd_uri(uri), description="disk 1", retry=RetryPolicy(attempts=1))
    try:
        with pytest.raises(ConnectorError) as info:
            reader.allocated_extents()
    finally:
        reader.close()
    assert str(info.value) == f"{parse_nbd_uri(uri)} {message}"


def test_a_block_status_the_server_refuses_names_the_disk_and_offset(
    serve: Callable[[Script], str],
) -> None:
    def script(c: socket.socket) -> None:
        handshake_with_structured_replies(c)
        handle = struct.unpack(">IHHQQI", recv_exact(c, 28))[3]
        c.sendall(chunk(handle, nbd.REPLY_TYPE_ERROR, struct.pack(">IH", 1, 4) + b"nope"))

    reader = NbdReader(
        parse_nbd_uri(serve(script)), description="disk 1", retry=RetryPolicy(attempts=1)
    )
    try:
        with pytest.raises(ConnectorError) as info:
            reader.allocated_extents()
    finally:
        reader.close()
    assert str(info.value).startswith("block status of disk 1 at offset 0 failed: the server ")
    assert str(info.value).endswith(": nope")


def test_a_server_gone_between_two_requests_is_named_at_the_next_send(
    serve: Callable[[Script], str],
) -> None:
    """The server closes the connection after answering the handshake: on a Unix socket,
    the next request the client sends fails at once (EPIPE), with no timing involved."""
    closed = threading.Event()

    def script(c: socket.socket) -> None:
        handshake_with_structured_replies(c)
        c.close()
        closed.set()

    uri = serve(script)
    conn = NbdConnection.open(parse_nbd_uri(uri), timeout=10)
    try:
        assert closed.wait(timeout=30), "the scripted server never closed"
        with pytest.raises(nbd.NbdConnectionLost) as info:
            conn.submit(nbd.CMD_READ, 0, 4096, bytearray(4096))
    finally:
        conn.close()
    assert str(info.value) == (
        f"sending a request to {parse_nbd_uri(uri)} failed: [Errno 32] Broken pipe"
    )
