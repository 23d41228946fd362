"""The Hypervisor contract over the fake, the vSphere adapter on the simulator (with the
project's changed block tracking, tests/vcsim) and the local hypervisor (no CBT).

Each `...World` makes the contract's scenario on its backend: the fake's disks are byte
arrays, the simulator's disks are sparse -flat.vmdk files whose writes go to the change
log the simulator answers QueryChangedDiskAreas from, and a local VM's disks are raw
image files named in its spec.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.adapters.local import LocalDiskSpec, LocalHypervisor, LocalVmSpec
from connector.adapters.vsphere import VSphereClient
from connector.fakes import FakeHypervisor
from connector.retry import RetryPolicy
from tests.contract.hypervisor_contract import ChangeTrackingContract, NoChangeTrackingContract
from tests.harness.vcsim import Simulator

# ----------------------------------------------------------------------------- fake


class FakeWorld:
    def __init__(self) -> None:
        self.fake = FakeHypervisor()

    @property
    def hv(self) -> FakeHypervisor:
        return self.fake

    def add_vm(self, name: str, sizes: list[int], *, cbt: bool = True) -> str:
        uuid = self.fake.add_vm(name, sizes)
        self.fake.vms[uuid].cbt_enabled = cbt
        return uuid

    def disk_keys(self, uuid: str) -> list[int]:
        return list(self.fake.vms[uuid].disks)

    def write(self, uuid: str, disk_key: int, offset: int, data: bytes) -> None:
        self.fake.write(uuid, disk_key, offset, data)

    def refuse_change_ids(self, uuid: str, disk_key: int, fault: str) -> None:
        self.fake.vms[uuid].disks[disk_key].refuse = fault


class TestFakeHypervisor(ChangeTrackingContract):
    @pytest.fixture
    def world(self) -> FakeWorld:
        return FakeWorld()


# ------------------------------------------------------------------ vSphere (vcsim)


class SimulatorWorld:
    def __init__(self, sim: Simulator, client: VSphereClient) -> None:
        self.sim = sim
        self.client = client
        self.vms: list[str] = []

    @property
    def hv(self) -> VSphereClient:
        return self.client

    def add_vm(self, name: str, sizes: list[int], *, cbt: bool = True) -> str:
        uuid = self.sim.add_vm(name, sizes, cbt=cbt)
        self.vms.append(uuid)
        return uuid

    def disk_keys(self, uuid: str) -> list[int]:
        return self.sim.disk_keys(uuid)

    def write(self, uuid: str, disk_key: int, offset: int, data: bytes) -> None:
        self.sim.write(uuid, disk_key, offset, data)

    def refuse_change_ids(self, uuid: str, disk_key: int, fault: str) -> None:
        self.sim.refuse_change_ids(uuid, disk_key, fault)

    def clean_up(self) -> None:
        """Leave no snapshot behind, whatever a test left (other tests share the simulator)."""
        for uuid in self.vms:
            if self.sim.snapshot_names(uuid):
                self.sim.remove_all_snapshots(uuid)


@pytest.mark.integration
class TestVSphereClient(ChangeTrackingContract):
    @pytest.fixture
    def world(self, vcsim: Simulator, vsphere: VSphereClient) -> Iterator[SimulatorWorld]:
        world = SimulatorWorld(vcsim, vsphere)
        try:
            yield world
        finally:
            world.clean_up()


# ---------------------------------------------------------------------------- local


class LocalWorld:
    """Local VMs are defined in config: the hypervisor is rebuilt over every VM added so
    far, on one state directory (where its snapshot markers live)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.specs: list[LocalVmSpec] = []
        self._hv: LocalHypervisor | None = None

    @property
    def hv(self) -> LocalHypervisor:
        if self._hv is None:
            self._hv = LocalHypervisor(
                self.specs,
                self.root / "state",
                retry=RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.002),
            )
        return self._hv

    def add_vm(self, name: str, sizes: list[int], *, cbt: bool = True) -> str:
        uuid = str(uuidlib.uuid4())
        disks = []
        for i, size in enumerate(sizes):
            path = self.root / f"{name}-{i}.img"
            with open(path, "wb") as f:
                f.truncate(size)
            disks.append(LocalDiskSpec(key=2000 + i, label=f"disk {i}", path=path))
        self.specs.append(LocalVmSpec(name=name, uuid=uuid, disks=tuple(disks), quiescent=True))
        self._hv = None
        return uuid

    def _spec(self, uuid: str) -> LocalVmSpec:
        return next(s for s in self.specs if s.uuid == uuid)

    def disk_keys(self, uuid: str) -> list[int]:
        return [d.key for d in self._spec(uuid).disks]

    def write(self, uuid: str, disk_key: int, offset: int, data: bytes) -> None:
        disk = next(d for d in self._spec(uuid).disks if d.key == disk_key)
        assert disk.path is not None
        with open(disk.path, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def refuse_change_ids(self, uuid: str, disk_key: int, fault: str) -> None:
        raise AssertionError("local disks have no change ids to refuse")


class TestLocalHypervisor(NoChangeTrackingContract):
    @pytest.fixture
    def world(self, tmp_path: Path) -> LocalWorld:
        return LocalWorld(tmp_path)
