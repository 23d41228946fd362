"""The NBD client and reader against real nbdkit and qemu-nbd processes."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

from connector.adapters.nbd import (
    CMD_READ,
    NbdAddress,
    NbdConnection,
    NbdReader,
    parse_nbd_uri,
)
from connector.domain.model import Extent
from connector.errors import (
    ConfigError,
    NotFoundError,
    PermanentError,
    TLSTrustError,
    TransientError,
    UnreachableError,
)
from connector.retry import RetryPolicy
from tests.harness.nbd import (
    NbdServer,
    need,
    start_nbdkit,
    start_nbdkit_tls,
    start_qemu_nbd,
    write_sparse_image,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
FAST = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.005)
REGIONS = [(3 * MiB, 4 * MiB), (20 * MiB + 4096, 12 * MiB), (60 * MiB, MiB)]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need("nbdkit", "qemu-nbd")
    path = tmp_path_factory.mktemp("nbd-image") / "disk.img"
    write_sparse_image(path, 64 * MiB, REGIONS)
    return path


def start(kind: str, image: Path, workdir: Path, servers: list[NbdServer]) -> NbdServer:
    server = start_nbdkit(image, workdir) if kind == "nbdkit" else start_qemu_nbd(image, workdir)
    servers.append(server)
    return server


def reader(server: NbdServer, **kwargs) -> NbdReader:
    kwargs.setdefault("retry", FAST)
    return NbdReader(parse_nbd_uri(server.uri), description="disk 2000 of VM 'web'", **kwargs)


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd"])
def test_negotiates_size_limits_and_block_status(kind, image, tmp_path, nbd_servers):
    server = start(kind, image, tmp_path, nbd_servers)
    conn = NbdConnection.open(parse_nbd_uri(server.uri))
    try:
        assert conn.size == 64 * MiB
        assert conn.max_block == 32 * MiB
        assert conn.structured and conn.can_block_status
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd"])
def test_reads_are_exact_and_cut_to_the_server_maximum(kind, image, tmp_path, nbd_servers):
    server = start(kind, image, tmp_path, nbd_servers)
    data = image.read_bytes()
    with reader(server, max_request=64 * MiB, in_flight=4) as r:
        assert r.request_size == 32 * MiB  # never more than the server (and qemu-nbd) accept
        offset, length = 3 * MiB - 123, 40 * MiB + 7
        assert r.read(offset, length) == data[offset : offset + length]
        assert r.requests == 2
        # a stream of mixed extents, empty and unaligned ones included, comes back in order
        extents = [Extent(0, 5), Extent(7, 0), Extent(20 * MiB, 9 * MiB), Extent(64 * MiB - 1, 1)]
        got = list(r.read_extents(extents))
        assert [e for e, _ in got] == extents
        assert [d for _, d in got] == [data[e.offset : e.end] for e in extents]
        with pytest.raises(ValueError, match="beyond the end"):
            r.read(64 * MiB - 1, 2)


def test_qemu_nbd_refuses_requests_above_32_mib(image, tmp_path, nbd_servers):
    """Why the reader cuts requests: the raw protocol shows qemu-nbd's limit."""
    server = start("qemu-nbd", image, tmp_path, nbd_servers)
    conn = NbdConnection.open(parse_nbd_uri(server.uri))
    try:
        request = conn.wait(conn.submit(CMD_READ, 0, 32 * MiB + 4096))
        assert request.error is not None and request.error.errno == 22  # EINVAL
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd"])
def test_block_status_lists_only_the_data(kind, image, tmp_path, nbd_servers):
    server = start(kind, image, tmp_path, nbd_servers)
    with reader(server) as r:
        assert r.allocated_extents() == [Extent(o, n) for o, n in REGIONS]


def test_a_server_without_extents_reports_everything_allocated(image, tmp_path, nbd_servers):
    server = start_nbdkit(image, tmp_path, filters=["noextents"])
    nbd_servers.append(server)
    with reader(server) as r:
        assert r.allocated_extents() == [Extent(0, 64 * MiB)]


def test_several_requests_are_in_flight(image, tmp_path, nbd_servers):
    server = start_nbdkit(image, tmp_path, filters=["delay"], filter_params=["rdelay=100ms"])
    nbd_servers.append(server)
    extents = [Extent(i * MiB, MiB) for i in range(16)]
    with reader(server, max_request=MiB, in_flight=8) as r:
        t0 = time.monotonic()
        assert sum(len(d) for _, d in r.read_extents(extents)) == 16 * MiB
        parallel = time.monotonic() - t0
    with reader(server, max_request=MiB, in_flight=1) as r:
        t0 = time.monotonic()
        assert sum(len(d) for _, d in r.read_extents(extents)) == 16 * MiB
        serial = time.monotonic() - t0
    assert serial >= 1.5  # 16 reads of 100 ms, one after the other
    assert parallel < serial / 3


def test_transient_eio_is_retried(image, tmp_path, nbd_servers):
    server = start_nbdkit(
        image, tmp_path, filters=["error"], filter_params=["error=EIO", "error-pread-rate=30%"]
    )
    nbd_servers.append(server)
    data = image.read_bytes()
    with reader(server, max_request=MiB, retry=RetryPolicy(12, 0.001, 0.002)) as r:
        got = b"".join(
            d for _, d in r.read_extents(Extent(o, MiB) for o in range(0, 64 * MiB, MiB))
        )
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert r.retries > 0
        assert r.requests == 64 + r.retries


def test_eio_on_every_read_names_the_disk_and_the_offset(image, tmp_path, nbd_servers):
    server = start_nbdkit(
        image, tmp_path, filters=["error"], filter_params=["error=EIO", "error-pread-rate=100%"]
    )
    nbd_servers.append(server)
    with reader(server, max_request=MiB) as r:
        with pytest.raises(TransientError) as info:
            r.read(5 * MiB, 2 * MiB)
        message = str(info.value)
        assert "disk 2000 of VM 'web'" in message
        # two requests of 1 MiB were in flight; the one that ran out of attempts is named
        assert f"at offset {5 * MiB} (" in message or f"at offset {6 * MiB} (" in message
        assert "after 4 attempts" in message and "EIO" in message
        # the reader is still usable: block status is not affected by the filter
        assert r.allocated_extents() == [Extent(o, n) for o, n in REGIONS]


def test_a_lost_connection_is_reopened(image, tmp_path, nbd_servers):
    first = start_nbdkit(image, tmp_path, filters=["delay"], filter_params=["rdelay=20ms"])
    nbd_servers.append(first)
    data = image.read_bytes()
    assert first.socket_path is not None
    address = NbdAddress(socket_path=str(first.socket_path))
    r = NbdReader(address, description="disk 2000", retry=FAST, max_request=MiB, in_flight=4)
    stream = r.read_extents(Extent(o, MiB) for o in range(0, 16 * MiB, MiB))
    got = [next(stream)[1]]
    first.proc.kill()  # the server dies with requests in flight
    first.proc.wait()
    first.socket_path.unlink(missing_ok=True)
    second = start_nbdkit(image, tmp_path, extra=[])
    nbd_servers.append(second)
    assert second.socket_path is not None
    second.socket_path.rename(first.socket_path)  # the same address as before
    got += [d for _, d in stream]
    r.close()
    assert b"".join(got) == data[: 16 * MiB]
    assert r.retries >= 1


def test_nothing_listening_is_unreachable(tmp_path):
    address = NbdAddress(socket_path=str(tmp_path / "absent.sock"))
    with pytest.raises(TransientError, match=r"absent\.sock") as info:
        NbdReader(address, description="disk 2000", retry=FAST)
    assert isinstance(info.value.__cause__, UnreachableError)


def test_unknown_export_is_named(image, tmp_path, nbd_servers):
    server = start("qemu-nbd", image, tmp_path, nbd_servers)
    assert server.socket_path is not None
    address = NbdAddress(export="nope", socket_path=str(server.socket_path))
    with pytest.raises(NotFoundError, match="no export named 'nope'"):
        NbdReader(address, description="disk 2000", retry=FAST)


def test_export_smaller_than_the_disk_is_refused(image, tmp_path, nbd_servers):
    server = start("nbdkit", image, tmp_path, nbd_servers)
    with pytest.raises(PermanentError, match="fewer than the disk's"):
        reader(server, capacity=65 * MiB)


def test_tls_export_is_read_with_verified_certificates(image, tmp_path, nbd_servers, test_ca):
    issued = test_ca.issue("nbd-server", hosts=("localhost", "127.0.0.1"))
    certs = tmp_path / "certs"
    certs.mkdir()
    shutil.copy(test_ca.cert_file, certs / "ca-cert.pem")
    shutil.copy(issued.cert_file, certs / "server-cert.pem")
    shutil.copy(issued.key_file, certs / "server-key.pem")
    server, port = start_nbdkit_tls(image, tmp_path, certs)
    nbd_servers.append(server)
    address = parse_nbd_uri(f"nbds://localhost:{port}/", ca_file=test_ca.cert_file)
    with NbdReader(address, description="disk 2000", retry=FAST) as r:
        assert r.read(3 * MiB, MiB) == image.read_bytes()[3 * MiB : 4 * MiB]
        assert r.allocated_extents() == [Extent(o, n) for o, n in REGIONS]
    with pytest.raises(PermanentError, match="requires TLS; use an nbds:// URI"):
        NbdConnection.open(parse_nbd_uri(f"nbd://127.0.0.1:{port}/"))
    with pytest.raises(TLSTrustError, match="not trusted"):  # the system store lacks the test CA
        NbdConnection.open(parse_nbd_uri(f"nbds://localhost:{port}/"))


def test_uris():
    assert parse_nbd_uri("nbd+unix:///?socket=/run/a.sock") == NbdAddress(socket_path="/run/a.sock")
    assert parse_nbd_uri("nbd+unix:///disk%201?socket=/run/a.sock").export == "disk 1"
    a = parse_nbd_uri("nbd://127.0.0.1:10900/exp")
    assert (a.host, a.port, a.export, a.tls) == ("127.0.0.1", 10900, "exp", False)
    assert parse_nbd_uri("nbds://backup.example.com/x").tls
    assert parse_nbd_uri("nbd://localhost/").port == 10809
    for bad, why in [
        ("nbd://backup.example.com/x", "without TLS"),
        ("nbd://user:pw@127.0.0.1/x", "user name or password"),
        ("nbd+unix:///x", "socket=PATH"),
        ("nbd+unix:///x?socket=/a&tls=on", "unknown parameters"),
        ("http://127.0.0.1/", "not an NBD URI"),
        ("nbd://127.0.0.1:99999/", "invalid port"),
    ]:
        with pytest.raises(ConfigError, match=why):
            parse_nbd_uri(bad)
