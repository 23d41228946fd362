"""The vddk transport: the nbdkit command line, and the lifecycle of the nbdkit process.

Debian has no vddk plugin and VDDK cannot be shipped, so the lifecycle runs the
very command line the connector builds for VDDK with the plugin swapped for
nbdkit's eval plugin, which accepts any parameter and serves a local image.
"""

from __future__ import annotations

import os
import signal
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from connector.adapters.local import LocalDiskSpec, LocalHypervisor, LocalVmSpec, local_vm_uuid
from connector.adapters.nbdkit import NbdkitServer, nbdkit_command
from connector.adapters.vddk import VddkParams, VddkSource, sha1_thumbprint
from connector.errors import PermanentError, TransientError
from connector.retry import RetryPolicy
from connector.tls import client_context
from tests.harness.nbd import need, write_sparse_image
from tests.harness.pipeline import file_sha, make_pipeline

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
PASSWORD = "s3cret-Passw0rd!"
FAST = RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.002)

DOC_PARAMS = VddkParams(
    libdir=Path("/opt/vmware-vix-disklib-distrib"),
    server="vcenter.example.com",
    user="svc-connector@vsphere.local",
    thumbprint="B2:31:BD:DE:9F:DB:9D:E0:78:EF:30:42:8A:41:B0:28:92:93:C8:DD",
)


# ------------------------------------------------------------------------- lifecycle


def via_eval(image: Path, seen: list[list[str]] | None = None) -> Any:
    """Run the connector's vddk command line with the plugin swapped for nbdkit's eval
    plugin, whose scripts serve `image` and accept every vddk parameter."""

    def rewrite(argv: list[str]) -> list[str]:
        if seen is not None:
            seen.append(list(argv))
        at = argv.index("vddk")
        scripts = [
            "config=exit 0",  # accept libdir=, server=, ... as the vddk plugin would
            f"get_size=stat -L -c %s {image}",
            f"pread=dd if={image} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        ]
        return [*argv[:at], "eval", *scripts, *argv[at + 1 :]]

    return rewrite


@pytest.fixture
def vm_setup(tmp_path: Path):
    need("nbdkit")
    image = tmp_path / "web-01-flat.img"
    write_sparse_image(image, 8 * MiB, [(MiB, 3 * MiB)], seed=11)
    password_file = tmp_path / "vcenter.password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    spec = LocalVmSpec(
        name="web-01",
        uuid=local_vm_uuid("web-01"),
        disks=(LocalDiskSpec(2000, "Hard disk 1", path=image),),
        quiescent=True,
    )
    hv = LocalHypervisor([spec], tmp_path / "state", retry=FAST)
    return image, password_file, hv, spec


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def test_nbdkit_serves_one_disk_on_a_private_socket_and_is_gone_after(tmp_path, vm_setup) -> None:
    image, password_file, hv, spec = vm_setup
    run_dir = tmp_path / "state" / "nbd"
    source = VddkSource(
        lambda: DOC_PARAMS,
        password_file,
        run_dir,
        retry=FAST,
        rewrite=via_eval(image),
    )
    vm = hv.get_vm(spec.uuid)
    snap = hv.create_snapshot(spec.uuid, "connector-r-1", "")
    reader = source.open(vm, snap, snap.disks[0])
    (server,) = source.servers
    assert server.proc is not None and server.socket_path is not None
    pid = server.proc.pid
    sock = server.socket_path
    # the socket is private: mode 0600, in a 0700 directory under the state directory
    assert sock.parent.parent == run_dir
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    # the real vddk parameters, with the password only as a file name
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert f"password=+{password_file}".encode() in cmdline
    assert b"vm=moref=local:web-01" in cmdline and b"snapshot=connector-r-1" in cmdline
    assert b"--exit-with-parent" in cmdline and b"--readonly" in cmdline
    assert PASSWORD.encode() not in b" ".join(cmdline)
    try:
        assert reader.read(MiB, 3 * MiB) == image.read_bytes()[MiB : 4 * MiB]
    finally:
        reader.close()
    assert gone(pid)
    assert not sock.exists() and not sock.parent.exists()
    assert list(run_dir.iterdir()) == []


def test_a_run_through_nbdkit_restores_exactly_and_cleans_up(tmp_path, vm_setup) -> None:
    image, password_file, hv, spec = vm_setup
    run_dir = tmp_path / "state" / "nbd"
    source = VddkSource(
        lambda: DOC_PARAMS, password_file, run_dir, retry=FAST, rewrite=via_eval(image)
    )
    p = make_pipeline(tmp_path / "pipeline", hv, source)
    run = p.replicator.replicate(spec.uuid)
    assert run.state == "COMPLETED"
    (server,) = source.servers
    assert server.proc is None and list(run_dir.iterdir()) == []
    assert p.restore_sha(run, 2000, "r.img") == file_sha(image)


def test_failing_reads_fail_the_run_and_still_stop_nbdkit(tmp_path, vm_setup) -> None:
    image, password_file, hv, spec = vm_setup
    run_dir = tmp_path / "state" / "nbd"

    def failing(argv: list[str]) -> list[str]:  # nbdkit's file plugin, failing every read
        sock = Path(argv[argv.index("--unix") + 1])
        params = [f"file={image}", "error=EIO", "error-pread-rate=100%"]
        return nbdkit_command("nbdkit", sock, "file", params, filters=["error"])

    source = VddkSource(lambda: DOC_PARAMS, password_file, run_dir, retry=FAST, rewrite=failing)
    p = make_pipeline(tmp_path / "pipeline", hv, source)
    with pytest.raises(TransientError, match=f"at offset {MiB}"):
        p.replicator.replicate(spec.uuid)
    (server,) = source.servers
    assert server.proc is None
    assert list(run_dir.iterdir()) == []
    assert p.object_keys("runs/") == []


def test_nbdkit_that_cannot_start_is_reported_and_cleaned_up(tmp_path, vm_setup) -> None:
    _image, password_file, hv, spec = vm_setup
    run_dir = tmp_path / "state" / "nbd"

    def broken(argv: list[str]) -> list[str]:
        sock = Path(argv[argv.index("--unix") + 1])
        return nbdkit_command("nbdkit", sock, "file", [f"file={tmp_path / 'missing.img'}"])

    source = VddkSource(lambda: DOC_PARAMS, password_file, run_dir, retry=FAST, rewrite=broken)
    vm = hv.get_vm(spec.uuid)
    snap = hv.create_snapshot(spec.uuid, "connector-r-2", "")
    with pytest.raises(PermanentError, match=r"exited with code 1 .*missing\.img"):
        source.open(vm, snap, snap.disks[0])
    assert list(run_dir.iterdir()) == []


def test_nbdkit_exits_with_a_killed_connector_and_its_directory_is_swept(tmp_path) -> None:
    need("nbdkit")
    image = tmp_path / "img"
    write_sparse_image(image, MiB, [(0, MiB)])
    run_dir = tmp_path / "nbd"
    script = f"""
import sys, time
from pathlib import Path
from connector.adapters.nbdkit import NbdkitServer, nbdkit_command
server = NbdkitServer(
    lambda sock: nbdkit_command("nbdkit", sock, "file", ["file={image}"]), Path("{run_dir}"),
    what="nbdkit")
server.start()
print(server.proc.pid, flush=True)
time.sleep(120)
"""
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        os.kill(pid, 0)  # nbdkit runs
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert gone(pid)  # --exit-with-parent
    (stale,) = list(run_dir.iterdir())
    assert (stale / "nbd.sock").exists()  # nobody removed it...
    server = NbdkitServer(
        lambda sock: nbdkit_command("nbdkit", sock, "file", [f"file={image}"]), run_dir, what="x"
    )
    server.start()  # ...until the next start sweeps it
    try:
        assert not stale.exists()
    finally:
        server.stop()
    assert list(run_dir.iterdir()) == []


def test_sha1_thumbprint_comes_from_the_verified_certificate(vcsim: Any) -> None:
    import hashlib
    from urllib.parse import urlsplit

    parts = urlsplit(vcsim.url)
    host, port = parts.hostname, parts.port
    assert host is not None and port is not None
    thumb = sha1_thumbprint(host, port, client_context(Path(vcsim.ca_file)))
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((host, port)))
    expected = hashlib.sha1(der).hexdigest().upper()
    assert thumb.replace(":", "") == expected and len(thumb.split(":")) == 20
    with pytest.raises(Exception, match="not trusted"):
        sha1_thumbprint(host, port, client_context(None))  # the system store lacks the test CA


def test_a_host_that_presents_no_certificate_fails_the_thumbprint_handshake(
    test_ca: Any,
) -> None:
    """A TLS 1.2 server with only anonymous (aNULL) ciphers presents no certificate: the
    verifying context never agrees to such a handshake, so no thumbprint is taken from it."""
    import socket
    import threading

    from connector.errors import TLSTrustError

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server_ctx.set_ciphers("aNULL:@SECLEVEL=0")
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: list[str] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True):
                outcome.append("handshake completed")
        except ssl.SSLError as exc:
            outcome.append(exc.reason or str(exc))
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    try:
        with pytest.raises(TLSTrustError) as info:
            sha1_thumbprint("127.0.0.1", port, client_context(Path(test_ca.cert_file)))
    finally:
        thread.join(timeout=30)
        listener.close()
    assert str(info.value).startswith("TLS handshake with 127.0.0.1 failed: ")
    assert outcome == ["NO_SHARED_CIPHER"]  # the client offered no certificate-less cipher


def test_server_helper_stops_idempotently(tmp_path) -> None:
    need("nbdkit")
    image = tmp_path / "img"
    write_sparse_image(image, MiB, [])
    server = NbdkitServer(
        lambda sock: nbdkit_command("nbdkit", sock, "file", [f"file={image}"]), tmp_path, what="x"
    )
    with server:
        assert server.running
    assert not server.running
    server.stop()


def test_vddk_transport_with_vcenter_passes_the_run_snapshot_and_verified_thumbprint(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    """A run against the vCenter simulator (snapshots, CBT) whose disks are read
    through the connector's vddk command line (plugin swapped, see via_eval)."""
    import hashlib
    import random

    from connector.app import App
    from connector.config import load_config
    from connector.pipeline.context import PipelineSettings
    from connector.pipeline.restore import restore_disk
    from tests.harness.connector_env import write_config
    from tests.harness.pipeline import replicator

    need("nbdkit")
    env = write_config(tmp_path / "connector", vcsim, moto, s3_bucket)
    uuid = vcsim.add_vm("vddk-web", [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    rng = random.Random(12)
    vcsim.write(uuid, key, 3 * MiB, rng.randbytes(MiB + 5))
    app = App(load_config(env.config_file))
    try:
        client = app.vsphere

        def params() -> VddkParams:
            return VddkParams(
                libdir=Path("/opt/vmware-vix-disklib-distrib"),
                server=client.host,
                port=client.port,
                user=client.user,
                thumbprint=sha1_thumbprint(client.host, client.port, client.ssl_context()),
            )

        seen: list[list[str]] = []
        source = VddkSource(
            params,
            Path(vcsim.password_file),
            tmp_path / "state" / "nbd",
            retry=app.retry_policy,
            rewrite=via_eval(vcsim.disk_path(uuid, key), seen),
        )
        rep = replicator(
            app.vsphere,
            source,
            app.open_repository_for_write,
            app.state,
            PipelineSettings(needs_no_foreign_snapshots=False),
        )
        runs, expected = [], []
        for _ in range(2):
            runs.append(rep.replicate(uuid))
            expected.append(hashlib.sha256(vcsim.read_disk(uuid, key)).hexdigest())
            vcsim.write(uuid, key, rng.randrange(0, 15 * MiB), rng.randbytes(70000))
        assert [r.disks[0].mode for r in runs] == ["allocated", "incremental"]
        vm = client.get_vm(uuid)
        der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((client.host, client.port)))
        sha1 = hashlib.sha1(der).hexdigest().upper()
        for run, argv in zip(runs, seen, strict=True):
            params_given = argv[argv.index("vddk") + 1 :]
            assert f"vm=moref={vm.ref}" in params_given
            assert f"snapshot={run.snapshot_ref}" in params_given
            assert f"user={vcsim.user}" in params_given
            assert f"password=+{vcsim.password_file}" in params_given
            assert f"thumbprint={':'.join(sha1[i : i + 2] for i in range(0, 40, 2))}" in argv
            assert any(a.startswith("file=[") and a.endswith(".vmdk") for a in params_given)
        assert list((tmp_path / "state" / "nbd").iterdir()) == []
        repo = app.repository()
        server = app.servers.resolve(uuid, refresh=False)
        for i, (run, exp) in enumerate(zip(runs, expected, strict=True)):
            out = tmp_path / f"r{i}.img"
            assert restore_disk(repo, server.id, run.id, key, out).sha256 == exp
    finally:
        app.close()
