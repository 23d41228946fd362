"""The vddk transport: nbdkit's vddk plugin serves a snapshot's disk, read over NBD.

VMware's VDDK (Virtual Disk Development Kit) is proprietary and not shipped
with the connector: the user unpacks it in a directory (`[transport.vddk]
libdir`), or mounts it there in the container. For each disk of a run the
connector starts nbdkit with the vddk plugin on a private Unix socket, reads
the snapshot through the NBD reader, and stops nbdkit when the disk is done
(see nbdkit.py). The exact command line is built by `vddk_command` and
documented in docs/transports.md; the password goes in a file
(`password=+FILE`), never on the command line.
"""

from __future__ import annotations

import glob
import hashlib
import socket
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from connector.adapters.nbd import DEFAULT_IN_FLIGHT, NbdReader
from connector.adapters.nbdkit import NbdkitServer, nbdkit_command
from connector.domain.model import DiskInfo, SnapshotInfo, VmInfo
from connector.errors import (
    ConnectorError,
    NotFoundError,
    PermanentError,
    TLSTrustError,
    TransientError,
    UnreachableError,
    UnsupportedSourceError,
)
from connector.retry import RetryPolicy
from connector.tls import describe_ssl_error

MiB = 1024 * 1024


@dataclass(frozen=True)
class VddkParams:
    """What the vddk plugin needs besides the VM, the snapshot and the disk."""

    libdir: Path
    server: str
    user: str
    thumbprint: str  # SHA-1, colon-separated (VDDK's format)
    transports: tuple[str, ...] = ("file", "san", "hotadd", "nbdssl")
    port: int | None = None  # None: 443
    config_file: Path | None = None
    nbdkit: str = "nbdkit"
    plugin: str = "vddk"


def vddk_command(
    config: VddkParams,
    vm_moref: str,
    snapshot_moref: str,
    file_name: str,
    socket_path: Path,
    password_file: Path,
) -> list[str]:
    """The nbdkit command line that serves one disk of one snapshot, read-only.

    nbdkit --exit-with-parent --readonly --foreground --unix SOCKET --pidfile PIDFILE
           vddk libdir=LIBDIR server=SERVER [port=PORT] thumbprint=THUMBPRINT user=USER
           password=+PASSWORD_FILE vm=moref=VM snapshot=SNAPSHOT transports=T1:T2:...
           [config=CONFIG_FILE] file=FILE
    """
    params = [
        f"libdir={config.libdir}",
        f"server={config.server}",
        *([f"port={config.port}"] if config.port not in (None, 443) else []),
        f"thumbprint={config.thumbprint}",
        f"user={config.user}",
        f"password=+{password_file}",
        f"vm=moref={vm_moref}",
        f"snapshot={snapshot_moref}",
        f"transports={':'.join(config.transports)}",
        *([f"config={config.config_file}"] if config.config_file is not None else []),
        f"file={file_name}",
    ]
    return nbdkit_command(config.nbdkit, socket_path, config.plugin, params)


def sha1_thumbprint(host: str, port: int, context: ssl.SSLContext, timeout: float = 30.0) -> str:
    """The SHA-1 fingerprint (VDDK's thumbprint format) of a server's certificate.

    The certificate is taken from a handshake verified by `context` (the same
    trust as every other vCenter connection), so the fingerprint only names a
    certificate that is already trusted.
    """
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLError as exc:
        raise TLSTrustError(describe_ssl_error(host, exc)) from exc
    except OSError as exc:
        raise UnreachableError(f"cannot reach {host}:{port} for its thumbprint: {exc}") from exc
    # A handshake verified by `context` (CERT_REQUIRED, no anonymous ciphers) cannot
    # complete without the server's certificate: a host that presents none fails above.
    assert der, "a verified handshake carries the server's certificate"
    digest = hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


# ---------------------------------------------------------------------------- checks


def vddk_library(libdir: Path) -> Path | None:
    """The VDDK shared library under an unpacked VDDK directory, if there is one."""
    found = sorted(glob.glob(str(libdir / "lib64" / "libvixDiskLib.so*")))
    return Path(found[0]) if found else None


def nbdkit_plugin_dir(nbdkit: str, timeout: float = 30.0) -> Path | None:
    """nbdkit's plugin directory (`nbdkit --dump-config`), None when it cannot be run."""
    try:
        out = subprocess.run(
            [nbdkit, "--dump-config"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        if line.startswith("plugindir="):
            return Path(line.split("=", 1)[1])
    return None


def dump_vddk_plugin(nbdkit: str, libdir: Path, timeout: float = 60.0) -> tuple[bool, str]:
    """Load VDDK through the plugin (`nbdkit vddk libdir=... --dump-plugin`): (ok, detail)."""
    try:
        out = subprocess.run(
            [nbdkit, "vddk", f"libdir={libdir}", "--dump-plugin"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    if out.returncode != 0:
        tail = " | ".join(out.stderr.strip().splitlines()[-4:])
        return False, tail or f"exit code {out.returncode}"
    info = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    version = info.get("vddk_library_version") or info.get("version") or "unknown"
    return True, f"VDDK library version {version}"


# ----------------------------------------------------------------------------- source


class VddkSource:
    """Serves each disk of a run through nbdkit's vddk plugin; implements `DiskSource`."""

    def __init__(
        self,
        params: Callable[[], VddkParams],
        password_file: Path,
        run_dir: Path,
        *,
        retry: RetryPolicy,
        max_request: int = 8 * MiB,
        in_flight: int = DEFAULT_IN_FLIGHT,
        start_timeout: float = 120.0,
        rewrite: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        """`params` is called once, at the first disk (it may fetch the thumbprint).

        `rewrite` turns the vddk command line into the one that is run: tests
        swap the plugin for one that serves a local file, since VDDK cannot be
        shipped, and keep the rest of the lifecycle.
        """
        self._params_factory = params
        self._params: VddkParams | None = None
        self._password_file = password_file
        self._run_dir = run_dir
        self._retry = retry
        self._max_request = max_request
        self._in_flight = in_flight
        self._start_timeout = start_timeout
        self._rewrite = rewrite
        self.servers: list[NbdkitServer] = []  # every server started (for tests and metrics)

    def _build(self, vm: VmInfo, snapshot: SnapshotInfo, disk: DiskInfo, sock: Path) -> list[str]:
        if self._params is None:
            self._params = self._params_factory()
        argv = vddk_command(
            self._params, vm.ref, snapshot.ref, disk.file_name, sock, self._password_file
        )
        return self._rewrite(argv) if self._rewrite is not None else argv

    def open(self, vm: VmInfo, snapshot: SnapshotInfo, disk: DiskInfo) -> NbdReader:
        who = f"VM {vm.name!r} ({vm.uuid})"
        frozen = next((d for d in snapshot.disks if d.key == disk.key), None)
        if frozen is None:
            raise NotFoundError(f"{who}: snapshot {snapshot.name!r} has no disk {disk.key}")
        if frozen.rdm or frozen.independent:
            raise UnsupportedSourceError(
                f"{who}, disk {disk.key}: raw device mappings and independent disks are not "
                "covered by snapshots"
            )
        what = f"disk {disk.key} ({frozen.file_name}) of {who}"
        server = NbdkitServer(
            lambda sock: self._build(vm, snapshot, frozen, sock),
            self._run_dir,
            what=f"nbdkit for {what}",
            start_timeout=self._start_timeout,
        )
        self.servers.append(server)
        address = server.start()
        try:
            return NbdReader(
                address,
                description=what,
                capacity=frozen.capacity,
                retry=self._retry,
                max_request=self._max_request,
                in_flight=self._in_flight,
                on_close=server.stop,
            )
        except ConnectorError as exc:
            tail = server.output_tail()
            server.stop()
            if not tail:
                raise
            cls = TransientError if isinstance(exc, TransientError) else PermanentError
            raise cls(f"{exc}; nbdkit said: {tail}") from exc
        except BaseException:
            server.stop()
            raise
