"""Read throughput of the connector's NBD client next to libnbd's, side by side.

Starts nbdkit's file plugin on a Unix socket over a file of random data and
reads all of it with each client, several times, in the same run:

- connector: `NbdReader.read_extents` (the reader the transports use), with
  `--in-flight` requests of `--request` bytes outstanding;
- libnbd (Debian's python3-libnbd, when importable): `aio_pread` with the same
  number of requests in flight, and plain synchronous `pread`.

    python bench/nbd_read.py [--size-mib 256] [--request-mib 4] [--in-flight 8]
                             [--rounds 3] [--delay-ms 0]

`--delay-ms` adds server latency to every read (nbdkit's delay filter), as a
disk read through VDDK over the network has; without it the socket and the
page cache are so fast that only CPU cost per byte shows.

Prints MiB/s per client (best and median of the rounds). The data is hashed by
neither client, so the numbers are the transport alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connector.adapters.nbd import NbdReader, parse_nbd_uri
from connector.domain.model import Extent
from connector.retry import RetryPolicy

MiB = 1024 * 1024


def start_nbdkit(image: Path, sock: Path, delay_ms: int) -> subprocess.Popen[bytes]:
    argv = ["nbdkit", "--foreground", "--readonly", "--unix", str(sock)]
    params = [f"file={image}"]
    if delay_ms:
        argv.append("--filter=delay")
        params.append(f"rdelay={delay_ms}ms")
    proc = subprocess.Popen([*argv, "file", *params])
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("nbdkit did not start")
        time.sleep(0.02)
    return proc


def connector_read(sock: Path, size: int, request: int, in_flight: int) -> int:
    reader = NbdReader(
        parse_nbd_uri(f"nbd+unix:///?socket={sock}"),
        description="bench",
        retry=RetryPolicy(),
        max_request=request,
        in_flight=in_flight,
    )
    total = 0
    try:
        extents = (Extent(o, min(request, size - o)) for o in range(0, size, request))
        for _extent, data in reader.read_extents(extents):
            total += len(data)
    finally:
        reader.close()
    return total


def libnbd_aio_read(sock: Path, size: int, request: int, in_flight: int) -> int:
    import nbd

    h = nbd.NBD()
    h.set_pread_initialize(False)  # skip libnbd's defensive memset, as the connector does
    h.connect_unix(str(sock))
    done: deque[Any] = deque()
    total = 0
    offset = 0
    pending = 0

    def completion(buf: Any) -> Callable[[int], int]:
        def cb(error: int) -> int:
            done.append(buf)
            return 1  # retire the command

        return cb

    while offset < size or pending:
        while offset < size and pending < in_flight:
            n = min(request, size - offset)
            buf = nbd.Buffer(n)
            h.aio_pread(buf, offset, completion(buf))
            pending += 1
            offset += n
        h.poll(-1)
        while done:
            total += len(done.popleft().to_bytearray())  # one copy, as the connector's bytes()
            pending -= 1
    h.shutdown()
    return total


def libnbd_sync_read(sock: Path, size: int, request: int, _in_flight: int) -> int:
    import nbd

    h = nbd.NBD()
    h.set_pread_initialize(False)
    h.connect_unix(str(sock))
    total = 0
    for offset in range(0, size, request):
        total += len(h.pread(min(request, size - offset), offset))
    h.shutdown()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--request-mib", type=int, default=4)
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--delay-ms",
        type=int,
        default=0,
        help="server latency per read (nbdkit's delay filter), as over a network or VDDK",
    )
    args = ap.parse_args()
    if shutil.which("nbdkit") is None:
        raise SystemExit("nbdkit is not installed (apt-get install nbdkit)")
    size = args.size_mib * MiB
    request = args.request_mib * MiB
    clients: list[tuple[str, Callable[[Path, int, int, int], int]]] = [
        ("connector NbdReader", connector_read)
    ]
    try:
        import nbd

        clients += [
            (f"libnbd {nbd.NBD().get_version()} aio_pread", libnbd_aio_read),
            ("libnbd pread (one in flight)", libnbd_sync_read),
        ]
    except ImportError:
        print("libnbd: not importable (apt-get install python3-libnbd; .ci/install links it)")
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "disk.img"
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        sock = Path(tmp) / "nbdkit.sock"
        proc = start_nbdkit(image, sock, args.delay_ms)
        try:
            print(
                f"{args.size_mib} MiB over a Unix socket from nbdkit {nbdkit_version()}, "
                f"{args.delay_ms} ms per read, requests of {args.request_mib} MiB, "
                f"{args.in_flight} in flight, "
                f"{args.rounds} rounds, Python {sys.version.split()[0]}"
            )
            results: dict[str, list[float]] = {name: [] for name, _ in clients}
            for _ in range(args.rounds):
                for name, fn in clients:  # interleaved, so drift hits every client alike
                    t0 = time.perf_counter()
                    got = fn(sock, size, request, args.in_flight)
                    elapsed = time.perf_counter() - t0
                    if got != size:
                        raise SystemExit(f"{name} read {got} bytes, not {size}")
                    results[name].append(size / MiB / elapsed)
            width = max(len(n) for n in results)
            print(f"{'client':<{width}}  {'best MiB/s':>10}  {'median MiB/s':>12}")
            for name, rates in results.items():
                print(f"{name:<{width}}  {max(rates):>10.0f}  {statistics.median(rates):>12.0f}")
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def nbdkit_version() -> str:
    out = subprocess.run(["nbdkit", "--version"], capture_output=True, text=True, check=False)
    return out.stdout.split()[-1] if out.stdout else "?"


if __name__ == "__main__":
    main()
