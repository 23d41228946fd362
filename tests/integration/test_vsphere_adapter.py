"""The vSphere adapter and the datastore HTTPS reader against the real simulator.

The simulator (tests/vcsim) serves TLS from the test CA, requires a password and
answers QueryChangedDiskAreas from change logs written by `Simulator.write`.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import ssl
import threading
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from connector.adapters.datastore_reader import (
    DatastoreHttpsReader,
    DatastoreHttpsSource,
    RetryPolicy,
    flat_file_name,
)
from connector.adapters.vsphere import VSphereClient, parse_datastore_path
from connector.domain.model import SnapshotInfo, VmInfo
from connector.errors import (
    AuthenticationError,
    ChangeIdRefused,
    NotFoundError,
    PermanentError,
    TLSTrustError,
    TransientError,
    UnreachableError,
    UnsupportedSourceError,
)
from connector.secrets import Secret
from connector.tls import client_context
from tests.harness import ca as harness_ca

# The shared session simulator (tests/harness/fixtures_vcsim.py); imported here until
# tests/conftest.py lists that plugin.
from tests.harness.fixtures_vcsim import vcsim as vcsim

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def _client(sim, **kwargs) -> VSphereClient:
    args = {
        "url": sim.url,
        "user": sim.user,
        "password": Secret(sim.password),
        "ca_file": sim.ca_file,
        "timeout": 10.0,
    }
    args.update(kwargs)
    return VSphereClient(**args)


@pytest.fixture
def client(vcsim) -> Iterator[VSphereClient]:
    c = _client(vcsim)
    try:
        yield c
    finally:
        c.close()


def _vm_name() -> str:
    return f"adapter-{uuidlib.uuid4().hex[:8]}"


def _fault(cls: Any, msg: str) -> Exception:
    """A pyVmomi fault as vCenter would raise it."""
    fault: Exception = cls(msg=msg)
    return fault


def _pattern(size: int, seed: int) -> bytes:
    """Deterministic, non-repeating-looking bytes."""
    block = bytes((i * 131 + seed * 17 + (i >> 8)) & 0xFF for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


# ----------------------------------------------------------------------- inventory


def test_list_vms_reports_disks_capacity_and_change_ids(vcsim, client):
    name = _vm_name()
    vm_uuid = vcsim.add_vm(name, [3 * MiB, 1 * MiB])
    keys = vcsim.disk_keys(vm_uuid)

    vm = next(v for v in client.list_vms() if v.uuid == vm_uuid)
    assert vm.name == name
    assert vm.datacenter == "DC0"
    assert vm.ref.startswith("vm-")
    assert vm.host
    assert vm.cbt_enabled is True
    assert vm.snapshots == ()
    assert [d.key for d in vm.disks] == keys
    assert [d.capacity for d in vm.disks] == [3 * MiB, 1 * MiB]
    for disk in vm.disks:
        assert disk.backing == "flat"
        assert disk.file_name.startswith("[LocalDS_0] ")
        assert disk.datastore == "LocalDS_0"
        assert disk.uuid
        assert not disk.rdm and not disk.independent
    assert client.get_vm(vm_uuid) == vm

    # A snapshot stuns the VM: from then on its disks carry a changeId.
    snap = client.create_snapshot(vm_uuid, "connector-inv", "inventory test")
    try:
        again = client.get_vm(vm_uuid)
        for disk in again.disks:
            assert disk.change_id and disk.change_id.startswith(f"{disk.uuid}/")
        assert [s.name for s in again.snapshots] == ["connector-inv"]
    finally:
        client.remove_snapshot(vm_uuid, snap.ref)


def test_vms_carry_the_guest_id_and_firmware_a_landing_needs(vcsim, client):
    uuid = vcsim.add_vm("guest-fw", [MiB])
    vm = client.get_vm(uuid)
    assert vm.guest_id  # the simulator's VMs have one (e.g. otherGuest)
    assert vm.firmware in (None, "bios", "efi")


def test_simulator_default_vms_capacity_falls_back_to_kb(client):
    # The model's own VMs report capacityInKB=1024 and no capacityInBytes.
    vms = [v for v in client.list_vms() if v.name.startswith("DC0_")]
    for vm in vms:
        for disk in vm.disks:
            assert disk.capacity > 0
            assert disk.capacity % 1024 == 0


def test_get_vm_unknown_uuid_is_not_found(client):
    missing = str(uuidlib.uuid4())
    with pytest.raises(NotFoundError, match=missing):
        client.get_vm(missing)


# ------------------------------------------------------------------ trust and login


def test_wrong_password_is_authentication_error_without_the_password(vcsim, caplog):
    caplog.set_level(logging.DEBUG)
    secret = "Wr0ng-" + uuidlib.uuid4().hex
    c = _client(vcsim, password=Secret(secret))
    with pytest.raises(AuthenticationError) as info:
        c.list_vms()
    message = str(info.value)
    assert secret not in message
    assert vcsim.password not in message
    assert f"{vcsim.user}@{vcsim.host}" in message
    assert "password_file" in message
    assert secret not in repr(c)
    c.close()
    with _client(vcsim) as good:
        good.list_vms()
    assert secret not in caplog.text
    assert vcsim.password not in caplog.text


def test_untrusted_ca_is_tls_trust_error_naming_the_host(vcsim, tmp_path):
    other = harness_ca.make_ca(tmp_path / "other-ca", name="someone-else")
    c = _client(vcsim, ca_file=other.cert_file)
    with pytest.raises(TLSTrustError) as info:
        c.list_vms()
    assert vcsim.host in str(info.value)
    assert "not trusted" in str(info.value)


def test_wrong_pinned_thumbprint_is_tls_trust_error(vcsim):
    c = _client(vcsim, ca_file=None, thumbprint=":".join(["AB"] * 32))
    with pytest.raises(TLSTrustError) as info:
        c.list_vms()
    assert vcsim.host in str(info.value)
    assert "thumbprint" in str(info.value)


def test_right_pinned_thumbprint_works_without_ca_file(vcsim):
    vm_uuid = vcsim.add_vm(_vm_name(), [1 * MiB])
    with _client(vcsim, ca_file=None, thumbprint=vcsim.thumbprint) as c:
        assert any(v.uuid == vm_uuid for v in c.list_vms())


def test_unreachable_vcenter_is_unreachable_error_naming_the_url(vcsim):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"https://127.0.0.1:{port}/sdk"
    c = _client(vcsim, url=url)
    with pytest.raises(UnreachableError, match=url):
        c.list_vms()
    c2 = _client(vcsim, url=url, ca_file=None, thumbprint=vcsim.thumbprint)
    with pytest.raises(UnreachableError, match=url):
        c2.list_vms()


def test_expired_session_logs_in_again_and_retries(vcsim, client):
    client.list_vms()
    generation = client.session_generation()
    cookie = client.session_cookie()
    session_key = cookie.split("=", 1)[1].strip('"')

    with vcsim.session() as si:  # an administrator's session terminates ours
        si.content.sessionManager.TerminateSession(sessionId=[session_key])

    vm_uuid = vcsim.add_vm(_vm_name(), [1 * MiB])
    assert any(v.uuid == vm_uuid for v in client.list_vms())
    assert client.session_generation() == generation + 1
    assert client.session_cookie() != cookie
    # and the other calls, too, survive an expired session
    key = client.session_cookie().split("=", 1)[1].strip('"')
    with vcsim.session() as si:
        si.content.sessionManager.TerminateSession(sessionId=[key])
    assert client.get_vm(vm_uuid).uuid == vm_uuid


def test_close_logs_out_and_a_later_call_logs_in_again(vcsim):
    c = _client(vcsim)
    c.list_vms()
    key = c.session_cookie().split("=", 1)[1].strip('"')
    c.close()
    with vcsim.session() as si:
        assert not si.content.sessionManager.SessionIsActive(key, vcsim.user)
    assert c.list_vms()
    c.close()


# ------------------------------------------------------------------------ snapshots


def test_create_and_remove_snapshot(vcsim, client):
    vm_uuid = vcsim.add_vm(_vm_name(), [2 * MiB, 1 * MiB])
    snap = client.create_snapshot(vm_uuid, "connector-run1", "first run")
    assert snap.name == "connector-run1"
    assert snap.ref.startswith("snapshot-")
    assert [d.key for d in snap.disks] == vcsim.disk_keys(vm_uuid)
    for disk in snap.disks:
        assert disk.change_id == f"{disk.uuid}/0"
    assert vcsim.snapshot_names(vm_uuid) == ["connector-run1"]
    assert client.list_snapshots(vm_uuid) == [SnapshotInfo(ref=snap.ref, name=snap.name)]
    assert client.disk_backing_chain(vm_uuid, snap.ref, snap.disks[0].key) == [
        snap.disks[0].file_name
    ]

    client.remove_snapshot(vm_uuid, snap.ref)
    assert vcsim.snapshot_names(vm_uuid) == []
    assert client.get_vm(vm_uuid).snapshots == ()
    client.remove_snapshot(vm_uuid, snap.ref)  # already gone: not an error

    with pytest.raises(NotFoundError):
        client.remove_snapshot(str(uuidlib.uuid4()), snap.ref)  # but an unknown VM is


def test_snapshot_change_id_is_the_snapshots_own(vcsim, client):
    vm_uuid = vcsim.add_vm(_vm_name(), [1 * MiB])
    key = vcsim.disk_keys(vm_uuid)[0]
    first = client.create_snapshot(vm_uuid, "connector-a", "")
    vcsim.write(vm_uuid, key, 0, b"x" * 4096)
    second = client.create_snapshot(vm_uuid, "connector-b", "")
    try:
        assert first.disks[0].change_id != second.disks[0].change_id
        assert client.get_snapshot(vm_uuid, first.ref).disks[0].change_id == (
            first.disks[0].change_id
        )
    finally:
        client.remove_snapshot(vm_uuid, second.ref)
        client.remove_snapshot(vm_uuid, first.ref)
    assert vcsim.snapshot_names(vm_uuid) == []


def test_create_snapshot_falls_back_to_not_quiesced(vcsim, client, monkeypatch):
    """Tools unavailable: the quiesced snapshot fails, a crash-consistent one is taken."""
    from pyVmomi import vim

    vm_uuid = vcsim.add_vm(_vm_name(), [1 * MiB])
    calls: list[bool] = []
    real_find = client._find_vm

    class NoTools:
        def __init__(self, vm: Any) -> None:
            self._vm = vm

        def __getattr__(self, name):
            return getattr(self._vm, name)

        def CreateSnapshot_Task(self, name, description, memory, quiesce):
            calls.append(quiesce)
            if quiesce:
                raise _fault(vim.fault.ToolsUnavailable, "VMware Tools is not running")
            return self._vm.CreateSnapshot_Task(
                name=name, description=description, memory=memory, quiesce=quiesce
            )

    def find_vm(content, u):
        ref = real_find(content, u)
        return ref if False in calls else NoTools(ref)  # the real VM once the retry ran

    monkeypatch.setattr(client, "_find_vm", find_vm)
    snap = client.create_snapshot(vm_uuid, "connector-noquiesce", "")
    assert calls == [True, False]
    assert vcsim.snapshot_names(vm_uuid) == ["connector-noquiesce"]
    client.remove_snapshot(vm_uuid, snap.ref)


def test_create_snapshot_other_faults_are_not_retried(vcsim, client, monkeypatch):
    from pyVmomi import vim

    vm_uuid = vcsim.add_vm(_vm_name(), [1 * MiB])
    calls = []

    class Busy:
        def CreateSnapshot_Task(self, **kwargs):
            calls.append(kwargs["quiesce"])
            raise _fault(vim.fault.TaskInProgress, "Another task is already in progress.")

    monkeypatch.setattr(client, "_find_vm", lambda content, u: Busy())
    with pytest.raises(TransientError, match="Another task"):
        client.create_snapshot(vm_uuid, "connector-busy", "")
    assert calls == [True]


def test_enable_cbt(vcsim, client):
    vm_uuid = vcsim.add_vm(_vm_name(), [1 * MiB], cbt=False)
    assert client.get_vm(vm_uuid).cbt_enabled is False
    client.enable_cbt(vm_uuid)
    assert client.get_vm(vm_uuid).cbt_enabled is True


# -------------------------------------------------------------------- changed areas


def test_query_changed_areas_returns_one_page(vcsim, client):
    vm_uuid = vcsim.add_vm(_vm_name(), [4 * MiB])
    key = vcsim.disk_keys(vm_uuid)[0]
    base = client.create_snapshot(vm_uuid, "connector-base", "")
    offsets = [i * 256 * 1024 for i in range(6)]  # six separate areas; a page holds four
    for off in offsets:
        vcsim.write(vm_uuid, key, off, b"\x01" * 4096)
    snap = client.create_snapshot(vm_uuid, "connector-next", "")
    try:
        change_id = base.disks[0].change_id
        assert change_id
        page = client.query_changed_areas(vm_uuid, snap.ref, key, 0, change_id)
        assert page.start_offset == 0
        assert [e.offset for e in page.extents] == offsets[:4]
        assert all(e.length == 4096 for e in page.extents)
        assert page.length == offsets[3] + 4096  # the page ends where its last area ends
        rest = client.query_changed_areas(vm_uuid, snap.ref, key, page.length, change_id)
        assert rest.start_offset == page.length
        assert [e.offset for e in rest.extents] == offsets[4:]
        assert rest.start_offset + rest.length == 4 * MiB
    finally:
        client.remove_snapshot(vm_uuid, snap.ref)
        client.remove_snapshot(vm_uuid, base.ref)


@pytest.mark.parametrize("fault", ["InvalidArgument", "FileFault"])
def test_refused_change_id_raises_change_id_refused(vcsim, client, fault):
    vm_uuid = vcsim.add_vm(_vm_name(), [1 * MiB])
    key = vcsim.disk_keys(vm_uuid)[0]
    snap = client.create_snapshot(vm_uuid, "connector-refused", "")
    try:
        vcsim.refuse_change_ids(vm_uuid, key, fault)
        with pytest.raises(ChangeIdRefused) as info:
            client.query_changed_areas(vm_uuid, snap.ref, key, 0, snap.disks[0].change_id or "")
        assert info.value.fault == fault
        assert vm_uuid in str(info.value)
        # "*" still answers (the allocated areas), so a full read can proceed
        client.query_changed_areas(vm_uuid, snap.ref, key, 0, "*")
    finally:
        vcsim.allow_change_ids(vm_uuid, key)
        client.remove_snapshot(vm_uuid, snap.ref)


def test_unknown_change_id_is_refused(vcsim, client):
    vm_uuid = vcsim.add_vm(_vm_name(), [1 * MiB])
    key = vcsim.disk_keys(vm_uuid)[0]
    snap = client.create_snapshot(vm_uuid, "connector-unknown", "")
    try:
        with pytest.raises(ChangeIdRefused) as info:
            client.query_changed_areas(vm_uuid, snap.ref, key, 0, "52 aa bb/99")
        assert info.value.fault == "InvalidArgument"
    finally:
        client.remove_snapshot(vm_uuid, snap.ref)


# ---------------------------------------------------------------- datastore reader


@pytest.fixture
def written_vm(vcsim, client) -> Iterator[tuple[VmInfo, SnapshotInfo, bytes]]:
    """A VM whose 2 MiB disk holds a known pattern, with our snapshot of it."""
    size = 2 * MiB
    vm_uuid = vcsim.add_vm(_vm_name(), [size])
    key = vcsim.disk_keys(vm_uuid)[0]
    data = _pattern(size, seed=7)
    vcsim.write(vm_uuid, key, 0, data)
    vm = client.get_vm(vm_uuid)
    snap = client.create_snapshot(vm_uuid, "connector-read", "")
    try:
        yield vm, snap, data
    finally:
        client.remove_snapshot(vm_uuid, snap.ref)


def test_datastore_reader_reads_exact_bytes_at_unaligned_offsets(vcsim, client, written_vm):
    vm, snap, data = written_vm
    with DatastoreHttpsSource(client, retry=RetryPolicy()).open(vm, snap, vm.disks[0]) as reader:
        assert isinstance(reader, DatastoreHttpsReader)
        for offset, length in [(0, 1), (1, 4095), (4097, 3), (12345, 65536), (2 * MiB - 7, 7)]:
            assert reader.read(offset, length) == data[offset : offset + length]
        assert reader.read(100, 0) == b""
        assert reader.bytes_read == 1 + 4095 + 3 + 65536 + 7
        with pytest.raises(ValueError):
            reader.read(2 * MiB - 1, 2)  # beyond the disk


def test_datastore_reader_splits_big_reads_into_bounded_requests(vcsim, client, written_vm):
    vm, snap, data = written_vm
    source = DatastoreHttpsSource(client, retry=RetryPolicy(), max_request=64 * 1024)
    reader = source.open(vm, snap, vm.disks[0])
    try:
        before = reader.requests
        got = reader.read(1000, 300 * 1024)
        assert got == data[1000 : 1000 + 300 * 1024]
        assert reader.requests - before == 5  # ceil(300 KiB / 64 KiB)
        assert reader.bytes_read == 300 * 1024
        whole = reader.read(0, 2 * MiB)
        assert whole == data
    finally:
        reader.close()


def test_datastore_url_names_the_base_flat_file(vcsim, client, written_vm):
    vm, _snap, _data = written_vm
    disk = vm.disks[0]
    ds, rel = parse_datastore_path(flat_file_name(disk.file_name))
    assert rel.endswith("-flat.vmdk")
    url = client.datastore_url(vm, flat_file_name(disk.file_name))
    assert "/folder/" in url and "dcPath=DC0" in url and f"dsName={ds}" in url
    assert vcsim.disk_path(vm.uuid, disk.key).name == rel.rsplit("/", 1)[-1]


def test_datastore_source_refuses_a_vm_with_a_pre_existing_snapshot(vcsim, client):
    name = _vm_name()
    vm_uuid = vcsim.add_vm(name, [1 * MiB])
    vcsim.create_snapshot(vm_uuid, "someone-elses")
    snap = client.create_snapshot(vm_uuid, "connector-ours", "")
    try:
        vm = client.get_vm(vm_uuid)
        with pytest.raises(UnsupportedSourceError) as info:
            DatastoreHttpsSource(client, retry=RetryPolicy()).open(vm, snap, vm.disks[0])
        message = str(info.value)
        assert name in message and vm_uuid in message
        assert "someone-elses" in message
    finally:
        vcsim.remove_all_snapshots(vm_uuid)


def test_datastore_source_ignores_our_removed_previous_snapshot(vcsim, client):
    vm_uuid = vcsim.add_vm(_vm_name(), [1 * MiB])
    old = client.create_snapshot(vm_uuid, "connector-previous", "")
    stale = client.get_vm(vm_uuid)  # discovered while the leftover still existed
    assert [s.name for s in stale.snapshots] == ["connector-previous"]
    client.remove_snapshot(vm_uuid, old.ref)
    snap = client.create_snapshot(vm_uuid, "connector-now", "")
    try:
        with DatastoreHttpsSource(client, retry=RetryPolicy()).open(
            stale, snap, stale.disks[0]
        ) as reader:
            assert reader.read(0, 4096) == bytes(4096)
    finally:
        client.remove_snapshot(vm_uuid, snap.ref)


def test_datastore_source_refuses_independent_rdm_and_non_flat_disks(client, written_vm):
    vm, snap, _ = written_vm
    frozen = snap.disks[0]
    cases = {
        "independent": replace(frozen, independent=True),
        "raw device mapping": replace(frozen, rdm=True, backing="RawDiskMappingVer1BackingInfo"),
        "SeSparseBackingInfo": replace(frozen, backing="SeSparseBackingInfo"),
    }
    for reason, disk in cases.items():
        bad_snap = replace(snap, disks=(disk,))
        with pytest.raises(UnsupportedSourceError) as info:
            DatastoreHttpsSource(client, retry=RetryPolicy()).open(vm, bad_snap, disk)
        assert reason in str(info.value)
        assert vm.uuid in str(info.value) and vm.name in str(info.value)


def test_datastore_source_refuses_a_vanished_snapshot(client, written_vm):
    vm, _snap, _ = written_vm
    gone = SnapshotInfo(ref="snapshot-999999", name="connector-gone")
    with pytest.raises(NotFoundError):
        DatastoreHttpsSource(client, retry=RetryPolicy()).open(vm, gone, vm.disks[0])


# ----------------------------------- reader retry, 401 and short reads (a fake server)


class _FakeSession:
    """A DatastoreSession over a local HTTPS server (the simulator ignores the cookie)."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.host, self.port, self._ctx = "127.0.0.1", port, ctx
        self.generation = 1
        self.relogins = 0

    def ssl_context(self) -> ssl.SSLContext:
        return self._ctx

    def session_cookie(self) -> str:
        return f'vmware_soap_session="s{self.generation}"'

    def session_generation(self) -> int:
        return self.generation

    def relogin(self, generation: int | None = None) -> None:
        self.relogins += 1
        self.generation += 1

    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/folder/vm/disk-flat.vmdk?dcPath=DC0&dsName=ds"


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    data = b""
    script: list[str] = []  # one action per request: ok, 500, reset, 401, short
    cookies: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        type(self).cookies.append(self.headers.get("Cookie", ""))
        action = type(self).script.pop(0) if type(self).script else "ok"
        if action == "reset":
            self.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            self.close_connection = True
            return
        if action in ("500", "401"):
            self.send_response(int(action))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        first, last = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
        body = self.data[first : last + 1]
        if action == "short":
            body = body[: len(body) // 2]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(self.data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def flaky_server(test_ca: harness_ca.TestCA, tmp_path: Path) -> Iterator[tuple[_FakeSession, type]]:
    issued = test_ca.issue(f"flaky-{os.getpid()}")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(issued.cert_file, issued.key_file)
    handler = type(
        "Handler", (_FlakyHandler,), {"data": _pattern(256 * 1024, 3), "script": [], "cookies": []}
    )
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield _FakeSession(httpd.server_address[1], client_context(test_ca.cert_file)), handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _fast_retry() -> RetryPolicy:
    return RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.01)


def test_reader_retries_resets_and_server_errors(flaky_server):
    session, handler = flaky_server
    reader = DatastoreHttpsReader(session, session.url(), len(handler.data), retry=_fast_retry())
    handler.script[:] = ["500", "reset", "ok"]
    assert reader.read(10, 1000) == handler.data[10:1010]
    assert reader.requests == 3
    handler.script[:] = ["500", "500", "500"]
    with pytest.raises(TransientError, match="3 attempts"):
        reader.read(0, 10)
    reader.close()


def test_reader_logs_in_again_once_on_401(flaky_server):
    session, handler = flaky_server
    reader = DatastoreHttpsReader(session, session.url(), len(handler.data), retry=_fast_retry())
    handler.script[:] = ["401", "ok"]
    assert reader.read(0, 100) == handler.data[:100]
    assert session.relogins == 1
    assert handler.cookies[-2:] == ['vmware_soap_session="s1"', 'vmware_soap_session="s2"']
    handler.script[:] = ["401", "401"]
    with pytest.raises(PermanentError, match="session"):
        reader.read(0, 100)
    reader.close()


def test_reader_short_read_is_an_error(flaky_server):
    session, handler = flaky_server
    reader = DatastoreHttpsReader(session, session.url(), len(handler.data), retry=_fast_retry())
    handler.script[:] = ["short"]
    with pytest.raises(PermanentError, match="short read"):
        reader.read(0, 4096)
    assert reader.bytes_read == 0
    reader.close()
