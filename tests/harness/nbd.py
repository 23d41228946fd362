"""Real NBD servers for tests: nbdkit (file plugin, with filters) and qemu-nbd, on Unix
sockets (or TCP with TLS), started and stopped by the tests."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

MiB = 1024 * 1024


@dataclass
class NbdServer:
    name: str
    proc: subprocess.Popen[bytes]
    socket_path: Path | None
    uri: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _wait_ready(server: NbdServer, host_port: tuple[str, int] | None, timeout: float = 30) -> None:
    """Poll until the server accepts connections, or fail with its output."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited early: {server.output()}")
        try:
            if host_port is not None:
                with socket.create_connection(host_port, timeout=1):
                    return
            elif server.socket_path is not None and server.socket_path.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(server.socket_path))
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{server.name} did not start: {server.output()}")
        time.sleep(0.02)


def start_nbdkit(
    image: Path,
    workdir: Path,
    *,
    filters: Sequence[str] = (),
    filter_params: Sequence[str] = (),
    extra: Sequence[str] = (),
    plugin: str = "file",
) -> NbdServer:
    """nbdkit serving `image` read-only on a Unix socket, with optional filters."""
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / f"nbdkit-{os.urandom(3).hex()}.sock"
    log = workdir / f"{sock.stem}.log"
    argv = [
        "nbdkit",
        "--foreground",
        "--readonly",
        "--unix",
        str(sock),
        *extra,
        *(f"--filter={f}" for f in filters),
        plugin,
        f"file={image}",
        *filter_params,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    server = NbdServer("nbdkit", proc, sock, f"nbd+unix:///?socket={sock}", log)
    _wait_ready(server, None)
    return server


def start_qemu_nbd(image: Path, workdir: Path) -> NbdServer:
    """qemu-nbd serving a raw `image` read-only on a Unix socket (several clients)."""
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / f"qemu-nbd-{os.urandom(3).hex()}.sock"
    log = workdir / f"{sock.stem}.log"
    argv = [
        "qemu-nbd",
        "--read-only",
        "--format=raw",
        "--persistent",
        "--shared=8",
        f"--socket={sock}",
        str(image),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    server = NbdServer("qemu-nbd", proc, sock, f"nbd+unix:///?socket={sock}", log)
    _wait_ready(server, None)
    return server


def start_nbdkit_tls(image: Path, workdir: Path, certs: Path) -> tuple[NbdServer, int]:
    """nbdkit requiring TLS on a TCP port of 127.0.0.1 (certificates from `certs`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = workdir / f"nbdkit-tls-{port}.log"
    argv = [
        "nbdkit",
        "--foreground",
        "--readonly",
        "--ipaddr",
        "127.0.0.1",
        "--port",
        str(port),
        "--tls=require",
        f"--tls-certificates={certs}",
        "file",
        f"file={image}",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    server = NbdServer("nbdkit-tls", proc, None, f"nbds://localhost:{port}/", log)
    _wait_ready(server, ("127.0.0.1", port))
    return server, port


def write_sparse_image(
    path: Path, size: int, regions: Sequence[tuple[int, int]], seed: int = 1
) -> None:
    """A sparse raw image of `size` bytes with random data in the (offset, length) regions."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in regions:
            f.seek(offset)
            f.write(rng.randbytes(length))


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: run .ci/install "
            "(apt-get install nbdkit qemu-utils)"
        )


@pytest.fixture
def nbd_servers() -> Iterator[list[NbdServer]]:
    """Servers a test starts are appended here and stopped after it."""
    servers: list[NbdServer] = []
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()
