# pyvmomi's stubs declare SmartConnect and WaitForTask untyped.
# mypy: disallow-untyped-calls=False
"""The simulator harness: TLS and login, disks, CBT (QueryChangedDiskAreas), /folder.

These tests talk to the simulator with pyvmomi directly; they do not use the
connector package.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from cryptography import x509
from pyVim.connect import SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from tests.harness import ca as harness_ca
from tests.harness.vcsim import REPO, Simulator, wait_for_task

# Until tests/conftest.py lists it; loading a plugin twice is harmless.
pytest_plugins = ["tests.harness.fixtures_vcsim"]
pytestmark = pytest.mark.integration

MiB = 1024 * 1024
PAGE = 4  # the session simulator's -cbt-page


# --- helpers ----------------------------------------------------------------------


def new_vm(sim: Simulator, sizes: list[int], cbt: bool = True) -> str:
    return sim.add_vm(f"h-{uuidlib.uuid4().hex[:10]}", sizes, cbt=cbt)


def find_vm(si: Any, vm_uuid: str) -> Any:
    vm = si.content.searchIndex.FindByUuid(None, vm_uuid, True, True)
    assert vm is not None
    return vm


def snapshot_by_name(vm: Any, name: str) -> Any:
    stack = list(vm.snapshot.rootSnapshotList)
    while stack:
        tree = stack.pop()
        if tree.name == name:
            return tree.snapshot
        stack.extend(tree.childSnapshotList)
    raise KeyError(name)


def disk_of(config: Any, key: int) -> Any:
    (disk,) = [d for d in config.hardware.device if d.key == key]
    return disk


def query_all(
    vm: Any, snap: Any, key: int, change_id: str, capacity: int, start: int = 0
) -> tuple[list[tuple[int, int]], list[Any]]:
    """Loop like a real client; return the areas as (start, end) and each call's result."""
    areas: list[tuple[int, int]] = []
    calls: list[Any] = []
    offset = start
    while offset < capacity:
        info = vm.QueryChangedDiskAreas(
            snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id
        )
        assert info.startOffset == offset
        assert info.length > 0
        calls.append(info)
        areas.extend((a.start, a.start + a.length) for a in info.changedArea)
        offset = info.startOffset + info.length
        assert len(calls) < 1000
    assert offset == capacity
    return areas, calls


def merged(writes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of (offset, length) writes as sorted, merged (start, end) ranges."""
    out: list[tuple[int, int]] = []
    for start, end in sorted((o, o + n) for o, n in writes):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def allocated(path: Path, capacity: int) -> list[tuple[int, int]]:
    """The file's data ranges per the file system (SEEK_DATA/SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < capacity:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), capacity)
            out.append((data, hole))
            offset = hole
    finally:
        os.close(fd)
    return out


def write_all(sim: Simulator, vm_uuid: str, key: int, writes: list[tuple[int, int]]) -> None:
    for offset, length in writes:
        sim.write(vm_uuid, key, offset, os.urandom(length))


@pytest.fixture
def si(vcsim: Simulator) -> Iterator[Any]:
    with vcsim.session() as si:
        yield si


# --- TLS and login ----------------------------------------------------------------


def test_wrong_password_is_refused(vcsim: Simulator) -> None:
    with pytest.raises(vim.fault.InvalidLogin):
        SmartConnect(
            host=vcsim.host,
            port=vcsim.port,
            user=vcsim.user,
            pwd=vcsim.password + "x",
            sslContext=vcsim.ssl_context(),
        )
    with pytest.raises(vim.fault.InvalidLogin):
        SmartConnect(
            host=vcsim.host,
            port=vcsim.port,
            user="someone-else",
            pwd=vcsim.password,
            sslContext=vcsim.ssl_context(),
        )


def test_right_password_is_accepted(vcsim: Simulator) -> None:
    assert vcsim.password_file.read_text().strip() == vcsim.password
    assert vcsim.password_file.stat().st_mode & 0o777 == 0o600
    assert vcsim.url == f"https://127.0.0.1:{vcsim.port}/sdk"
    with vcsim.session() as session:
        si: Any = session
        assert si.content.about.apiType == "VirtualCenter"
        assert si.content.sessionManager.currentSession.userName == vcsim.user


def test_certificate_chains_to_the_test_ca(vcsim: Simulator, test_ca: harness_ca.TestCA) -> None:
    ctx = ssl.create_default_context(cafile=str(test_ca.cert_file))
    with (
        socket.create_connection((vcsim.host, vcsim.port), timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname=vcsim.host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    cert.verify_directly_issued_by(test_ca.cert)
    digest = hashlib.sha256(der).hexdigest().upper()
    assert vcsim.thumbprint == ":".join(digest[i : i + 2] for i in range(0, 64, 2))

    untrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA loaded
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        socket.create_connection((vcsim.host, vcsim.port), timeout=5) as sock,
    ):
        untrusting.wrap_socket(sock, server_hostname=vcsim.host)


# --- VMs and disks ----------------------------------------------------------------


def test_add_vm_creates_sparse_disks_of_the_right_size(vcsim: Simulator, si: Any) -> None:
    sizes = [64 * MiB, 256 * MiB]
    vm_uuid = new_vm(vcsim, sizes)
    keys = vcsim.disk_keys(vm_uuid)
    assert len(keys) == 2

    vm = find_vm(si, vm_uuid)
    assert vm.config.instanceUuid == vm_uuid
    assert vm.config.changeTrackingEnabled is True
    for key, size in zip(keys, sizes, strict=True):
        disk = disk_of(vm.config, key)
        assert disk.capacityInBytes == size
        assert disk.capacityInKB == size // 1024
        assert disk.backing.fileName.startswith("[LocalDS_0] ")
        assert disk.backing.uuid
        path = vcsim.disk_path(vm_uuid, key)
        assert path.name.endswith("-flat.vmdk")
        assert path.is_relative_to(vcsim.datastore_dir)
        assert path.stat().st_size == size
        assert path.stat().st_blocks * 512 < MiB  # sparse
    assert vcsim.read_disk(vm_uuid, keys[0]) == bytes(sizes[0])


def test_write_and_read_disk(vcsim: Simulator) -> None:
    vm_uuid = new_vm(vcsim, [4 * MiB])
    (key,) = vcsim.disk_keys(vm_uuid)
    vcsim.write(vm_uuid, key, 1000, b"hello")
    vcsim.write(vm_uuid, key, 4 * MiB - 3, b"end")
    content = vcsim.read_disk(vm_uuid, key)
    assert len(content) == 4 * MiB
    assert content[1000:1005] == b"hello"
    assert content[-3:] == b"end"
    assert content.count(0) == 4 * MiB - 8
    log = vcsim.cbt_dir / vm_uuid / f"{key}.log"
    assert log.read_text().splitlines() == ["1000 5", f"{4 * MiB - 3} 3"]
    with pytest.raises(ValueError):
        vcsim.write(vm_uuid, key, 4 * MiB - 1, b"xx")


def test_cbt_off_vm(vcsim: Simulator, si: Any) -> None:
    vm_uuid = new_vm(vcsim, [MiB], cbt=False)
    (key,) = vcsim.disk_keys(vm_uuid)
    vcsim.create_snapshot(vm_uuid, "s")
    vm = find_vm(si, vm_uuid)
    assert vm.config.changeTrackingEnabled is False
    snap = snapshot_by_name(vm, "s")
    assert not disk_of(snap.config, key).backing.changeId
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=0, changeId="*")


# --- Changed Block Tracking ----------------------------------------------------------


def test_query_changed_disk_areas(vcsim: Simulator, si: Any) -> None:
    capacity = 64 * MiB
    vm_uuid = new_vm(vcsim, [capacity, 16 * MiB])
    key, other = vcsim.disk_keys(vm_uuid)
    before = [(0, 4096), (10 * MiB, 8192), (20 * MiB, 100)]
    write_all(vcsim, vm_uuid, key, before)
    vcsim.create_snapshot(vm_uuid, "s1")
    after = [
        (30 * MiB, 4096),
        (30 * MiB + 4096, 4096),  # adjacent: merged
        (40 * MiB, 65536),
        (40 * MiB + 1000, 10),  # inside the previous one
        (10 * MiB + 4096, 8192),  # overlaps a write before s1
        (capacity - 512, 512),  # the last bytes of the disk
    ]
    write_all(vcsim, vm_uuid, key, after)
    vcsim.create_snapshot(vm_uuid, "s2")

    vm = find_vm(si, vm_uuid)
    s1, s2 = snapshot_by_name(vm, "s1"), snapshot_by_name(vm, "s2")
    id1 = disk_of(s1.config, key).backing.changeId
    id2 = disk_of(s2.config, key).backing.changeId
    disk_uuid = disk_of(vm.config, key).backing.uuid
    # each snapshot keeps the changeId of its creation time
    assert id1 == f"{disk_uuid}/{len(before)}"
    assert id2 == f"{disk_uuid}/{len(before) + len(after)}"
    assert disk_of(s1.config, other).backing.changeId.endswith("/0")

    # "*": the allocated areas of the disk, covering every write
    star, _ = query_all(vm, s2, key, "*", capacity)
    assert star == allocated(vcsim.disk_path(vm_uuid, key), capacity)
    for offset, length in before + after:
        assert any(s <= offset and offset + length <= e for s, e in star)
    assert sum(e - s for s, e in star) < 2 * MiB

    # since s1: exactly the (merged) writes made after it
    changed, _ = query_all(vm, s2, key, id1, capacity)
    assert changed == merged(after)
    assert changed[:2] == [(10 * MiB + 4096, 10 * MiB + 12288), (30 * MiB, 30 * MiB + 8192)]

    # since s1, as of s1: nothing; since s2 as of s2: nothing
    assert query_all(vm, s1, key, id1, capacity)[0] == []
    assert query_all(vm, s2, key, id2, capacity)[0] == []
    # since the beginning of the log
    assert query_all(vm, s2, key, f"{disk_uuid}/0", capacity)[0] == merged(before + after)
    # a disk without writes
    assert query_all(vm, s2, other, disk_of(s2.config, other).backing.changeId, 16 * MiB)[0] == []


def test_query_changed_disk_areas_pages(vcsim: Simulator, si: Any) -> None:
    capacity = 32 * MiB
    vm_uuid = new_vm(vcsim, [capacity])
    (key,) = vcsim.disk_keys(vm_uuid)
    vcsim.create_snapshot(vm_uuid, "base")
    writes = [(i * MiB + 512, 1024) for i in range(2 * PAGE + 2)]  # 10 disjoint areas
    write_all(vcsim, vm_uuid, key, writes)
    vcsim.create_snapshot(vm_uuid, "next")
    vm = find_vm(si, vm_uuid)
    base_id = disk_of(snapshot_by_name(vm, "base").config, key).backing.changeId
    snap = snapshot_by_name(vm, "next")

    areas, calls = query_all(vm, snap, key, base_id, capacity)
    assert areas == merged(writes)
    assert [len(c.changedArea) for c in calls] == [PAGE, PAGE, 2]
    # a page ends where its last area ends; the last page reaches the capacity
    assert calls[0].length == (PAGE - 1) * MiB + 512 + 1024
    assert calls[1].startOffset == calls[0].length
    assert calls[-1].startOffset + calls[-1].length == capacity

    # an area that starts before startOffset is clipped to it
    info = vm.QueryChangedDiskAreas(
        snapshot=snap, deviceKey=key, startOffset=MiB + 1000, changeId=base_id
    )
    assert (info.changedArea[0].start, info.changedArea[0].length) == (MiB + 1000, 536)

    with pytest.raises(vmodl.fault.InvalidArgument) as exc:
        vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=capacity, changeId="*")
    assert exc.value.invalidProperty == "startOffset"


def test_invalid_change_ids_are_refused(vcsim: Simulator, si: Any) -> None:
    vm_uuid = new_vm(vcsim, [MiB])
    (key,) = vcsim.disk_keys(vm_uuid)
    vcsim.write(vm_uuid, key, 0, b"x")
    vcsim.create_snapshot(vm_uuid, "s")
    vm = find_vm(si, vm_uuid)
    snap = snapshot_by_name(vm, "s")
    disk_uuid = disk_of(vm.config, key).backing.uuid
    for bad in [f"{uuidlib.uuid4()}/1", f"{disk_uuid}/2", f"{disk_uuid}/x", "garbage", ""]:
        with pytest.raises(vmodl.fault.InvalidArgument) as exc:
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=0, changeId=bad)
        assert exc.value.invalidProperty == "changeId"


def test_refused_change_ids(vcsim: Simulator, si: Any) -> None:
    vm_uuid = new_vm(vcsim, [MiB])
    (key,) = vcsim.disk_keys(vm_uuid)
    vcsim.create_snapshot(vm_uuid, "s1")
    vcsim.write(vm_uuid, key, 4096, b"y" * 10)
    vcsim.create_snapshot(vm_uuid, "s2")
    vm = find_vm(si, vm_uuid)
    id1 = disk_of(snapshot_by_name(vm, "s1").config, key).backing.changeId
    s2 = snapshot_by_name(vm, "s2")

    def query(change_id: str) -> Any:
        return vm.QueryChangedDiskAreas(
            snapshot=s2, deviceKey=key, startOffset=0, changeId=change_id
        )

    vcsim.refuse_change_ids(vm_uuid, key)  # InvalidArgument by default
    with pytest.raises(vmodl.fault.InvalidArgument):
        query(id1)
    vcsim.refuse_change_ids(vm_uuid, key, "FileFault")
    with pytest.raises(vim.fault.FileFault) as exc:
        query(id1)
    assert exc.value.file == disk_of(vm.config, key).backing.fileName
    assert query("*").changedArea  # "*" is never refused
    vcsim.allow_change_ids(vm_uuid, key)
    assert [(a.start, a.length) for a in query(id1).changedArea] == [(4096, 10)]
    with pytest.raises(ValueError):
        vcsim.refuse_change_ids(vm_uuid, key, "NotFound")


def test_disk_without_cbt(vcsim: Simulator, si: Any) -> None:
    vm_uuid = new_vm(vcsim, [MiB, MiB])
    key, tracked = vcsim.disk_keys(vm_uuid)
    vcsim.disable_disk_cbt(vm_uuid, key)
    vcsim.write(vm_uuid, key, 0, b"z" * 10)
    vcsim.create_snapshot(vm_uuid, "s")
    vm = find_vm(si, vm_uuid)
    snap = snapshot_by_name(vm, "s")
    assert not disk_of(snap.config, key).backing.changeId  # empty: pyvmomi reads None
    assert disk_of(snap.config, tracked).backing.changeId
    for change_id in ["*", f"{disk_of(vm.config, key).backing.uuid}/0"]:
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(
                snapshot=snap, deviceKey=key, startOffset=0, changeId=change_id
            )
    assert vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=tracked, startOffset=0, changeId="*")


# --- snapshots -----------------------------------------------------------------------


def test_snapshot_helpers(vcsim: Simulator, si: Any) -> None:
    vm_uuid = new_vm(vcsim, [MiB])
    vm = find_vm(si, vm_uuid)
    assert vcsim.snapshot_names(vm_uuid) == []
    assert vm.snapshot is None  # stock 0.24.2 would drop the connection here
    vcsim.create_snapshot(vm_uuid, "user-1")
    vcsim.create_snapshot(vm_uuid, "user-2")
    assert vcsim.snapshot_names(vm_uuid) == ["user-1", "user-2"]

    # RemoveSnapshot's task entity is the snapshot: pyVim cannot wait for it
    task = snapshot_by_name(vm, "user-2").RemoveSnapshot_Task(removeChildren=False)
    with pytest.raises(TypeError):
        WaitForTask(task)
    wait_for_task(si, task)
    assert vcsim.snapshot_names(vm_uuid) == ["user-1"]
    vcsim.remove_all_snapshots(vm_uuid)
    assert vcsim.snapshot_names(vm_uuid) == []
    assert vm.snapshot is None


# --- datastore /folder ------------------------------------------------------------------


def folder_url(sim: Simulator, file_name: str) -> str:
    ds, _, rel = file_name.partition("] ")
    query = urlencode({"dcPath": "DC0", "dsName": ds.lstrip("[")})
    flat = rel.replace(".vmdk", "-flat.vmdk", 1)
    return f"https://{sim.host}:{sim.port}/folder/{quote(flat)}?{query}"


def test_folder_serves_ranged_get(vcsim: Simulator, si: Any) -> None:
    vm_uuid = new_vm(vcsim, [8 * MiB])
    (key,) = vcsim.disk_keys(vm_uuid)
    data = os.urandom(10000)
    vcsim.write(vm_uuid, key, 3 * MiB + 5, data)
    url = folder_url(vcsim, disk_of(find_vm(si, vm_uuid).config, key).backing.fileName)
    cookie = si._stub.cookie.split(";")[0]
    assert cookie.startswith("vmware_soap_session=")
    ctx = vcsim.ssl_context()

    first, last = 3 * MiB, 3 * MiB + 20000 - 1
    request = urllib.request.Request(
        url, headers={"Range": f"bytes={first}-{last}", "Cookie": cookie}
    )
    with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes {first}-{last}/{8 * MiB}"
        body = resp.read()
    assert body == vcsim.read_disk(vm_uuid, key)[first : last + 1]
    assert body[5:10005] == data

    # The simulator does not check the session cookie on /folder (vCenter does).
    request = urllib.request.Request(url, headers={"Range": "bytes=0-9"})
    with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:
        assert resp.status == 206
    missing = folder_url(vcsim, "[LocalDS_0] no-such-vm/no-such-vm.vmdk")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(missing, context=ctx, timeout=10)
    assert exc.value.code == 404


# --- lifetime ----------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def test_simulator_exits_with_its_parent(test_ca: harness_ca.TestCA, tmp_path: Path) -> None:
    script = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from tests.harness.ca import make_ca\n"
        "from tests.harness.vcsim import start_simulator\n"
        "sim = start_simulator(Path(sys.argv[1]), make_ca(Path(sys.argv[2])))\n"
        "print(json.dumps({'pid': sim.process.pid, 'port': sim.port}), flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "sim"), str(tmp_path / "ca")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        started = json.loads(parent.stdout.readline())
        pid = started["pid"]
        assert not _gone(pid)
    finally:
        parent.kill()
        parent.wait(timeout=10)
    assert _wait_gone(pid), f"simulator {pid} outlived its parent"


def test_stop_ends_the_process(test_ca: harness_ca.TestCA, tmp_path: Path) -> None:
    from tests.harness.vcsim import start_simulator

    sim = start_simulator(tmp_path, test_ca, cbt_page=1)
    pid = sim.process.pid
    with sim.session() as si:
        assert si.content.about.apiType == "VirtualCenter"
    sim.stop()
    assert sim.process.returncode == 0
    assert _gone(pid)
    with pytest.raises(OSError):
        socket.create_connection((sim.host, sim.port), timeout=2).close()
