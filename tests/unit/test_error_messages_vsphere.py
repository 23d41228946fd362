"""How the vSphere adapter names vCenter's failures: tasks that fail or hang, faults,
dropped connections; each with the message the troubleshooting guide documents."""

from __future__ import annotations

import http.client

import pytest
from pyVmomi import vim

from connector.adapters.vsphere import VSphereClient, fault_error, wait_for_task
from connector.errors import PermanentError, TransientError
from connector.secrets import Secret


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_task_that_fails_without_a_fault_or_never_ends_is_named() -> None:
    clock = Clock()
    with pytest.raises(PermanentError) as failed:
        wait_for_task(lambda: ("error", None, None), "snapshot web-01", 60, clock=clock)
    assert str(failed.value) == "snapshot web-01 failed without an error description"
    with pytest.raises(TransientError) as hung:
        wait_for_task(
            lambda: ("running", None, None), "snapshot web-01", 30, sleep=clock.sleep, clock=clock
        )
    assert str(hung.value) == "snapshot web-01 did not finish within 30 s (task running)"


def test_a_missing_privilege_is_named() -> None:
    fault = vim.fault.NoPermission(privilegeId="VirtualMachine.State.CreateSnapshot")  # type: ignore[no-untyped-call]
    fault.msg = "Permission to perform this operation was denied."
    error = fault_error(fault, "create snapshot of web-01")
    assert isinstance(error, PermanentError)
    assert str(error) == (
        "create snapshot of web-01 failed: NoPermission: Permission to perform this operation "
        "was denied.; the vCenter user lacks a privilege (VirtualMachine.State.CreateSnapshot)"
    )


def test_a_dropped_or_garbled_connection_to_vcenter_is_transient() -> None:
    client = VSphereClient("https://vc.example.com/sdk", "user", Secret("password"))
    closed = client._translate(http.client.RemoteDisconnected("gone"), "list VMs")
    assert isinstance(closed, TransientError)
    assert str(closed) == (
        "list VMs: vCenter at https://vc.example.com/sdk closed the connection (gone)"
    )
    garbled = client._translate(http.client.BadStatusLine("SSH-2.0"), "list VMs")
    assert isinstance(garbled, TransientError)
    assert str(garbled).startswith(
        "list VMs: bad HTTP answer from vCenter at https://vc.example.com/sdk ("
    )
