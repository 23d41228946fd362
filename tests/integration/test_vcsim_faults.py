"""vCenter answers the simulator does not give on its own, turned on by the test through
the wrapper's faults file (tests/vcsim/faults.go): first each fault as pyVmomi sees
it, then what the connector says of it (the vSphere adapter, and the `connector`
process where a command reaches it)."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyVmomi import vim, vmodl

from connector.adapters.vsphere import VSphereClient
from connector.errors import NotFoundError, PermanentError, TransientError
from connector.secrets import Secret
from tests.harness.connector_env import write_config
from tests.harness.vcsim import Simulator

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
_PC: Any = vmodl.query.PropertyCollector


def _name() -> str:
    return f"faults-{uuidlib.uuid4().hex[:8]}"


@pytest.fixture
def client(vcsim: Simulator) -> Iterator[VSphereClient]:
    c = VSphereClient(
        url=vcsim.url,
        user=vcsim.user,
        password=Secret(vcsim.password),
        ca_file=vcsim.ca_file,
        timeout=10.0,
        task_timeout=30.0,
    )
    try:
        yield c
    finally:
        c.close()


def _retrieve(si: Any, obj: Any, obj_type: Any, paths: list[str]) -> Any:
    spec = _PC.FilterSpec(
        objectSet=[_PC.ObjectSpec(obj=obj)],
        propSet=[_PC.PropertySpec(type=obj_type, pathSet=paths)],
    )
    return si.content.propertyCollector.RetrievePropertiesEx([spec], _PC.RetrieveOptions())


def _names(result: Any) -> set[str]:
    return {p.name for oc in (result.objects if result else []) for p in oc.propSet or []}


# ------------------------------------------------------------- the wrapper's faults


def test_each_fault_changes_only_what_it_names_and_ends_with_the_file(vcsim: Simulator) -> None:
    uuid = vcsim.add_vm(_name(), [MiB])
    other = vcsim.add_vm(_name(), [MiB])
    vcsim.create_snapshot(uuid, "s1")
    with vcsim.session() as si:
        vm = vcsim._find_vm(si, uuid)
        vm2 = vcsim._find_vm(si, other)
        snap = vm.snapshot.rootSnapshotList[0].snapshot
        task = vm.CreateSnapshot_Task(name="s2", description="", memory=False, quiesce=False)
        paths = ["config.instanceUuid", "name"]
        before = _retrieve(si, vm, vim.VirtualMachine, paths)
        assert _names(before) == {"config.instanceUuid", "name"}

        with vcsim.faults(f"vm-without-config {vm._moId}"):
            assert _names(_retrieve(si, vm, vim.VirtualMachine, paths)) == {"name"}
            assert _names(_retrieve(si, vm2, vim.VirtualMachine, paths)) == set(paths)
        assert _names(_retrieve(si, vm, vim.VirtualMachine, paths)) == set(paths)

        devices = ["config.hardware.device", "vm"]
        assert _names(_retrieve(si, snap, vim.vm.Snapshot, devices)) == set(devices)
        with vcsim.faults("snapshot-without-devices"):
            assert _names(_retrieve(si, snap, vim.vm.Snapshot, devices)) == {"vm"}

        info = ["info.state", "info.result"]
        with vcsim.faults("task-without-result"):
            got = _retrieve(si, task, vim.Task, info)
            assert _names(got) == {"info.state"}
        with vcsim.faults("task-vanishes"):
            assert _retrieve(si, task, vim.Task, info) is None
        with vcsim.faults("not-authenticated"), pytest.raises(vim.fault.NotAuthenticated):
            _retrieve(si, vm, vim.VirtualMachine, paths)
        # the session ended with that answer ...
        assert _names(_retrieve(si, vm, vim.VirtualMachine, paths)) == set()
    assert not vcsim.faults_file.exists()
    with vcsim.session() as si:  # ... and a new login is served as before
        vm = vcsim._find_vm(si, uuid)
        assert _names(_retrieve(si, vm, vim.VirtualMachine, paths)) == set(paths)


# ------------------------------------------------------------------- the adapter


def test_a_session_refused_right_after_login_is_named(
    vcsim: Simulator, client: VSphereClient
) -> None:
    with vcsim.faults("not-authenticated"), pytest.raises(TransientError) as info:
        client.list_vms()
    assert str(info.value) == (
        f"listing VMs: vCenter at {vcsim.url} refused the session right after login"
    )


def test_a_vm_without_configuration_is_named(vcsim: Simulator, client: VSphereClient) -> None:
    uuid = vcsim.add_vm(_name(), [MiB])
    moid = vcsim.vm_moid(uuid)
    assert client.get_vm(uuid).uuid == uuid
    with vcsim.faults(f"vm-without-config {moid}"):
        with pytest.raises(NotFoundError) as info:
            client.get_vm(uuid)
        assert uuid not in {vm.uuid for vm in client.list_vms()}  # skipped from the list
    assert str(info.value) == f"VM with instance UUID {uuid} has no configuration"


def test_a_snapshot_without_the_disk_is_named(vcsim: Simulator, client: VSphereClient) -> None:
    uuid = vcsim.add_vm(_name(), [MiB])
    (key,) = vcsim.disk_keys(uuid)
    snap = client.create_snapshot(uuid, "s1", "")
    assert client.disk_backing_chain(uuid, snap.ref, key)
    with vcsim.faults("snapshot-without-devices"), pytest.raises(NotFoundError) as info:
        client.disk_backing_chain(uuid, snap.ref, key)
    assert str(info.value) == f"snapshot {snap.ref} of VM {uuid} has no disk {key}"


def test_a_snapshot_task_without_a_result_is_named(vcsim: Simulator, client: VSphereClient) -> None:
    uuid = vcsim.add_vm(_name(), [MiB])
    what = f"creating snapshot 'no-result' of VM {uuid}"
    with vcsim.faults("task-without-result"), pytest.raises(PermanentError) as info:
        client.create_snapshot(uuid, "no-result", "")
    assert str(info.value) == f"{what}: the task returned no snapshot"
    assert vcsim.snapshot_names(uuid) == ["no-result"]  # vCenter made it all the same


def test_a_task_that_vanishes_is_named(vcsim: Simulator, client: VSphereClient) -> None:
    uuid = vcsim.add_vm(_name(), [MiB])
    what = f"creating snapshot 'vanished' of VM {uuid}"
    with vcsim.faults("task-vanishes"), pytest.raises(TransientError) as info:
        client.create_snapshot(uuid, "vanished", "")
    message = str(info.value)
    assert message.startswith(f"{what}: task task-") and message.endswith(
        " vanished before it finished"
    )


# ------------------------------------------------------------------- the process


def test_connector_vms_names_a_session_refused_right_after_login(
    tmp_path: Path, vcsim: Simulator, moto: Any, s3_bucket: str
) -> None:
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket)
    assert env.cli("vms").returncode == 0
    with vcsim.faults("not-authenticated"):
        proc = env.cli("vms")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    text = " ".join(proc.stderr.split())
    assert f"vCenter at {vcsim.url} refused the session right after login" in text
    assert vcsim.password not in proc.stdout + proc.stderr
