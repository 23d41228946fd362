# pyvmomi's stubs declare its data-object constructors untyped.
# mypy: disallow-untyped-calls=False
"""The vCenter simulator for the integration tests.

`start_simulator` builds (once, cached) and starts `tests/vcsim`, a small Go program
around govmomi 0.24.2's simulator (VPX model: datacenter DC0, cluster DC0_C0,
datastore LocalDS_0) that serves TLS with a certificate from the test CA, requires a
password, and answers `QueryChangedDiskAreas` from change logs that `Simulator.write`
appends to. `Simulator.faults` turns on answers the simulator never gives by itself
(a session dropped right after login, a VM without configuration, a vanished or
resultless task, a snapshot without devices; see tests/vcsim/faults.go).

Pitfalls of this simulator version:
- Stock 0.24.2 drops the connection when pyvmomi reads an unset property
  (`vm.snapshot` without snapshots, `vm.parentVApp`, `vm.resourceConfig`): its Fetch
  indexes an empty result. The wrapper answers like vCenter (None) unless started
  with -stock-fetch; reading through the PropertyCollector works either way.
- `vm.rootSnapshot` stays empty even when the VM has snapshots: use `vm.snapshot`.
- `RemoveSnapshot_Task`'s info.entity is the snapshot (not a ManagedEntity): pyvmomi
  raises TypeError on any read of `task.info`, pyVim's `WaitForTask` included.
  `wait_for_task` below reads info.state/result/error through the PropertyCollector.
- QueryChangedDiskAreas is only routed for requests whose Host is 127.0.0.1 or
  localhost (how the wrapper hooks it in); other methods work for any Host.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim, vmodl

from tests.harness.ca import TestCA

REPO = Path(__file__).resolve().parents[2]
GO_SOURCE = REPO / "tests" / "vcsim"
BUILD_DIR = REPO / "build"
BINARY = BUILD_DIR / "vcsim" / "connector-vcsim"
GO_IMPORT_PATH = "connectorvcsim"
SYSTEM_GOPATH = "/usr/share/gocode"

USER = "connector@vsphere.local"
DATACENTER = "DC0"
START_TIMEOUT = 60.0
TASK_TIMEOUT = 60.0
CHANGE_ID_FAULTS = ("InvalidArgument", "FileFault")


class SimulatorError(RuntimeError):
    """The simulator failed to build, start or run a request."""


def build_binary() -> Path:
    """Build the Go wrapper unless the binary is newer than every .go source."""
    BINARY.parent.mkdir(parents=True, exist_ok=True)
    with open(BINARY.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test sessions build once
        sources = sorted(GO_SOURCE.glob("*.go"))
        if not sources:
            raise SimulatorError(f"no Go sources in {GO_SOURCE}")
        newest = max(p.stat().st_mtime for p in sources)
        if BINARY.exists() and BINARY.stat().st_mtime >= newest:
            return BINARY

        gopath = BUILD_DIR / "gopath"
        link = gopath / "src" / GO_IMPORT_PATH
        link.parent.mkdir(parents=True, exist_ok=True)
        if not (link.is_symlink() and link.resolve() == GO_SOURCE.resolve()):
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(GO_SOURCE.resolve(), target_is_directory=True)

        env = dict(os.environ)
        env.update(
            GOPATH=f"{gopath}:{SYSTEM_GOPATH}",
            GO111MODULE="off",
            GOFLAGS="",
            CGO_ENABLED="0",
        )
        if "GOCACHE" not in env and "HOME" not in env:
            env["GOCACHE"] = str(BUILD_DIR / "gocache")
        tmp = BINARY.with_name(BINARY.name + ".tmp")
        result = subprocess.run(
            ["go", "build", "-o", str(tmp), GO_IMPORT_PATH],
            cwd=BUILD_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise SimulatorError(f"go build failed:\n{result.stdout}{result.stderr}")
        os.replace(tmp, BINARY)
        return BINARY


def wait_for_task(si: Any, task: Any, timeout: float = TASK_TIMEOUT) -> Any:
    """Wait for a task; return its result or raise its fault.

    Reads info.state/result/error through the PropertyCollector: reading `task.info`
    whole fails in pyvmomi for RemoveSnapshot_Task, whose info.entity is the snapshot
    (not a ManagedEntity), which is also why pyVim's WaitForTask raises TypeError.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        props = _read_properties(si, task, ["info.state", "info.result", "info.error"])
        state = props.get("info.state")
        if state == vim.TaskInfo.State.success:
            return props.get("info.result")
        if state == vim.TaskInfo.State.error:
            error = props.get("info.error")
            if isinstance(error, vmodl.MethodFault):
                raise error
            raise SimulatorError(f"task {task._moId} failed: {error}")
        if time.monotonic() > deadline:
            raise SimulatorError(f"task {task._moId} still {state} after {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


@dataclass(frozen=True)
class _Disk:
    path: Path  # local -flat.vmdk
    capacity: int


@dataclass
class Simulator:
    url: str  # "https://127.0.0.1:PORT/sdk"
    host: str
    port: int
    ca_file: Path  # test CA certificate
    thumbprint: str  # SHA-256 of the server certificate, colon-separated upper hex
    user: str
    password: str
    password_file: Path  # mode 0600
    cbt_dir: Path
    workdir: Path
    datastore_dir: Path  # $TMPDIR of the simulator: the datastores live below it
    log_file: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)
    _disks: dict[tuple[str, int], _Disk] = field(default_factory=dict, repr=False)

    # --- connections -------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def connect(self) -> vim.ServiceInstance:
        """A new pyvmomi session (call pyVim.connect.Disconnect when done)."""
        si: vim.ServiceInstance = SmartConnect(
            host=self.host,
            port=self.port,
            user=self.user,
            pwd=self.password,
            sslContext=self.ssl_context(),
        )
        return si

    @contextlib.contextmanager
    def session(self) -> Iterator[vim.ServiceInstance]:
        si = self.connect()
        try:
            yield si
        finally:
            Disconnect(si)

    # --- inventory -----------------------------------------------------------

    def add_vm(self, name: str, disk_sizes: list[int], cbt: bool = True) -> str:
        """Create a powered-off VM with sparse disks of these byte sizes; return its
        instance UUID. CBT (config.changeTrackingEnabled) is on unless cbt=False."""
        if any(size <= 0 or size % 1024 for size in disk_sizes):
            raise ValueError("disk sizes must be positive multiples of 1024")
        if len(disk_sizes) > 15:
            raise ValueError("at most 15 disks (one SCSI controller)")
        with self.session() as si:
            content = si.RetrieveContent()
            dc = _datacenter(content)
            datastore = dc.datastore[0]
            pool = dc.hostFolder.childEntity[0].resourcePool
            controller = vim.vm.device.VirtualDeviceSpec(
                operation=vim.vm.device.VirtualDeviceSpec.Operation.add,
                device=vim.vm.device.ParaVirtualSCSIController(
                    key=-100,
                    busNumber=0,
                    sharedBus=vim.vm.device.VirtualSCSIController.Sharing.noSharing,
                ),
            )
            config = vim.vm.ConfigSpec(
                name=name,
                guestId="otherGuest64",
                numCPUs=1,
                memoryMB=64,
                files=vim.vm.FileInfo(vmPathName=f"[{datastore.name}]"),
                deviceChange=[controller],
            )
            vm = wait_for_task(si, dc.vmFolder.CreateVM_Task(config=config, pool=pool))
            scsi = next(
                d
                for d in vm.config.hardware.device
                if isinstance(d, vim.vm.device.VirtualSCSIController)
            )
            changes = []
            unit = 0
            for i, size in enumerate(disk_sizes):
                if unit == 7:  # reserved for the controller itself
                    unit += 1
                disk = vim.vm.device.VirtualDisk(
                    key=-(i + 1),
                    controllerKey=scsi.key,
                    unitNumber=unit,
                    capacityInKB=size // 1024,
                    capacityInBytes=size,
                    backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                        fileName=f"[{datastore.name}]",
                        diskMode="persistent",
                        thinProvisioned=True,
                    ),
                )
                changes.append(
                    vim.vm.device.VirtualDeviceSpec(
                        operation=vim.vm.device.VirtualDeviceSpec.Operation.add,
                        fileOperation=vim.vm.device.VirtualDeviceSpec.FileOperation.create,
                        device=disk,
                    )
                )
                unit += 1
            spec = vim.vm.ConfigSpec(deviceChange=changes, changeTrackingEnabled=cbt)
            wait_for_task(si, vm.ReconfigVM_Task(spec=spec))
            uuid: str = vm.config.instanceUuid
            self._remember_disks(vm, uuid)
        for (vm_uuid, _), known in self._disks.items():
            if vm_uuid != uuid:
                continue
            if not known.path.exists():
                raise SimulatorError(f"simulator did not create {known.path}")
            if known.path.stat().st_size < known.capacity:  # normally done by the wrapper
                os.truncate(known.path, known.capacity)
        return uuid

    def _find_vm(self, si: Any, vm_uuid: str) -> Any:
        vm = si.content.searchIndex.FindByUuid(None, vm_uuid, True, True)
        if vm is None:
            raise KeyError(f"no VM with instance uuid {vm_uuid}")
        return vm

    def _remember_disks(self, vm: Any, vm_uuid: str) -> None:
        urls = {ds.name: ds.info.url for ds in vm.datastore}
        for d in vm.config.hardware.device:
            if not isinstance(d, vim.vm.device.VirtualDisk):
                continue
            file_name: str = d.backing.fileName  # type: ignore[union-attr]
            ds_name, _, rel = file_name.partition("] ")
            local = Path(urls[ds_name.lstrip("[")]) / rel.replace(".vmdk", "-flat.vmdk", 1)
            capacity = d.capacityInBytes or d.capacityInKB * 1024
            self._disks[(vm_uuid, d.key)] = _Disk(local, capacity)

    def _disk(self, vm_uuid: str, disk_key: int) -> _Disk:
        if (vm_uuid, disk_key) not in self._disks:
            with self.session() as si:
                self._remember_disks(self._find_vm(si, vm_uuid), vm_uuid)
        try:
            return self._disks[(vm_uuid, disk_key)]
        except KeyError:
            raise KeyError(f"VM {vm_uuid} has no disk {disk_key}") from None

    def disk_keys(self, vm_uuid: str) -> list[int]:
        with self.session() as si:
            vm = self._find_vm(si, vm_uuid)
            return sorted(
                d.key for d in vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
            )

    def disk_path(self, vm_uuid: str, disk_key: int) -> Path:
        """Local path of the disk's -flat.vmdk (a sparse file of the disk's capacity)."""
        return self._disk(vm_uuid, disk_key).path

    # --- disk content and change tracking -----------------------------------

    def _cbt_file(self, vm_uuid: str, disk_key: int, ext: str) -> Path:
        return self.cbt_dir / vm_uuid / f"{disk_key}.{ext}"

    def write(self, vm_uuid: str, disk_key: int, offset: int, data: bytes) -> None:
        """Write into the disk and record the write in its change log."""
        disk = self._disk(vm_uuid, disk_key)
        if offset < 0 or offset + len(data) > disk.capacity:
            raise ValueError(f"write [{offset}, +{len(data)}) outside disk of {disk.capacity}")
        with open(disk.path, "r+b") as f:
            f.seek(offset)
            f.write(data)
        log = self._cbt_file(vm_uuid, disk_key, "log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"{offset} {len(data)}\n")

    def read_disk(self, vm_uuid: str, disk_key: int) -> bytes:
        """The disk's whole current content (capacity bytes)."""
        disk = self._disk(vm_uuid, disk_key)
        data = disk.path.read_bytes()
        return data[: disk.capacity].ljust(disk.capacity, b"\0")

    def refuse_change_ids(
        self, vm_uuid: str, disk_key: int, fault: str = "InvalidArgument"
    ) -> None:
        """Make every QueryChangedDiskAreas with a changeId other than "*" fail with `fault`."""
        if fault not in CHANGE_ID_FAULTS:
            raise ValueError(f"fault must be one of {CHANGE_ID_FAULTS}")
        path = self._cbt_file(vm_uuid, disk_key, "refuse")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fault)

    def allow_change_ids(self, vm_uuid: str, disk_key: int) -> None:
        self._cbt_file(vm_uuid, disk_key, "refuse").unlink(missing_ok=True)

    def disable_disk_cbt(self, vm_uuid: str, disk_key: int) -> None:
        """The disk stops tracking: later snapshots give it no changeId, queries fail."""
        path = self._cbt_file(vm_uuid, disk_key, "nocbt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def enable_disk_cbt(self, vm_uuid: str, disk_key: int) -> None:
        self._cbt_file(vm_uuid, disk_key, "nocbt").unlink(missing_ok=True)

    # --- privileges ----------------------------------------------------------

    @property
    def privileges_file(self) -> Path:
        return self.workdir / "privileges"

    def grant_only(self, privileges: list[str]) -> None:
        """From now on, privilege checks grant only these privileges (to every user)."""
        tmp = self.privileges_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{p}\n" for p in privileges))
        tmp.replace(self.privileges_file)

    def grant_all(self) -> None:
        """Privilege checks grant every privilege again (the simulator's default)."""
        self.privileges_file.unlink(missing_ok=True)

    # --- faults (tests/vcsim/faults.go) ---------------------------------------

    @property
    def faults_file(self) -> Path:
        return self.workdir / "faults"

    def vm_moid(self, vm_uuid: str) -> str:
        """The managed object id of a VM (the argument of the vm-without-config fault)."""
        with self.session() as si:
            return str(self._find_vm(si, vm_uuid)._moId)

    @contextlib.contextmanager
    def faults(self, *lines: str) -> Iterator[None]:
        """While inside, property retrievals answer with these faults (one "mode [arg]"
        each, see tests/vcsim/faults.go); every fault is off again afterwards. The
        harness's own reads go through the same collector: use them outside."""
        tmp = self.faults_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{line}\n" for line in lines))
        tmp.replace(self.faults_file)
        try:
            yield
        finally:
            self.faults_file.unlink(missing_ok=True)

    # --- snapshots -----------------------------------------------------------

    def snapshot_names(self, vm_uuid: str) -> list[str]:
        with self.session() as si:
            vm = self._find_vm(si, vm_uuid)
            # A plain vm.snapshot read breaks stock vcsim when unset; vm.rootSnapshot
            # is never filled in by the simulator.
            info = _read_properties(si, vm, ["snapshot"]).get("snapshot")
            if info is None:
                return []
            names: list[str] = []
            stack = list(info.rootSnapshotList)
            while stack:
                tree = stack.pop(0)
                names.append(tree.name)
                stack.extend(tree.childSnapshotList)
            return names

    def create_snapshot(self, vm_uuid: str, name: str) -> None:
        with self.session() as si:
            vm = self._find_vm(si, vm_uuid)
            wait_for_task(
                si, vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False)
            )

    def remove_all_snapshots(self, vm_uuid: str) -> None:
        with self.session() as si:
            vm = self._find_vm(si, vm_uuid)
            wait_for_task(si, vm.RemoveAllSnapshots_Task())

    # --- lifetime ------------------------------------------------------------

    def stop(self) -> None:
        """Stop the simulator process (SIGTERM, then SIGKILL after 10 s)."""
        proc = self.process
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_properties(si: Any, obj: Any, paths: list[str]) -> dict[str, Any]:
    """Read properties through the PropertyCollector; unset ones are absent."""
    pc = si.content.propertyCollector
    spec = vmodl.query.PropertyCollector.FilterSpec(
        objectSet=[vmodl.query.PropertyCollector.ObjectSpec(obj=obj)],
        propSet=[vmodl.query.PropertyCollector.PropertySpec(type=type(obj), pathSet=paths)],
    )
    result = pc.RetrievePropertiesEx([spec], vmodl.query.PropertyCollector.RetrieveOptions())
    found: dict[str, Any] = {}
    for content in result.objects if result else []:
        for prop in content.propSet:
            found[prop.name] = prop.val
    return found


def _datacenter(content: Any) -> Any:
    for entity in content.rootFolder.childEntity:
        if isinstance(entity, vim.Datacenter) and entity.name == DATACENTER:
            return entity
    raise SimulatorError(f"datacenter {DATACENTER} not found")


def _log_tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


def _probe(host: str, port: int, ctx: ssl.SSLContext) -> bool:
    """True once a TLS handshake with the server succeeds."""
    try:
        with (
            socket.create_connection((host, port), timeout=2) as sock,
            ctx.wrap_socket(sock, server_hostname=host),
        ):
            return True
    except OSError:
        return False


def start_simulator(
    workdir: Path,
    ca: TestCA,
    cbt_page: int = 4,
    vms: int = 0,
    start_timeout: float = START_TIMEOUT,
) -> Simulator:
    """Build if needed, start the simulator and wait until it serves TLS.

    `vms`: VMs the model pre-creates per resource pool (the VPX model has two pools:
    the standalone host's and the cluster's), each with one disk; the bench's
    discovery at scale uses thousands."""
    binary = build_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    issued = ca.issue(f"vcsim-{secrets.token_hex(4)}", ("127.0.0.1", "localhost"))
    password = secrets.token_urlsafe(18)
    password_file = workdir / "vcsim.password"
    _write_private(password_file, password + "\n")
    cbt_dir = workdir / "cbt"
    cbt_dir.mkdir(exist_ok=True)
    datastore_dir = workdir / "datastores"
    datastore_dir.mkdir(exist_ok=True)
    ready_file = workdir / "vcsim.ready.json"
    ready_file.unlink(missing_ok=True)
    log_file = workdir / "vcsim.log"

    log = open(log_file, "wb")  # noqa: SIM115 - the Simulator owns it until stop()
    env = dict(os.environ, TMPDIR=str(datastore_dir))
    try:
        proc = subprocess.Popen(
            [
                str(binary),
                "-cert", str(issued.cert_file),
                "-key", str(issued.key_file),
                "-user", USER,
                "-password-file", str(password_file),
                "-cbt-dir", str(cbt_dir),
                "-privileges-file", str(workdir / "privileges"),
                "-faults-file", str(workdir / "faults"),
                "-cbt-page", str(cbt_page),
                "-vms", str(vms),
                "-ready-file", str(ready_file),
                "-exit-with-parent",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
    except BaseException:
        log.close()
        raise

    sim: Simulator | None = None
    try:
        ctx = ssl.create_default_context(cafile=str(ca.cert_file))
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise SimulatorError(
                    f"simulator exited with {proc.returncode}:\n{_log_tail(log_file)}"
                )
            if ready_file.exists():
                ready = json.loads(ready_file.read_text())
                port = int(ready["port"])
                if _probe("127.0.0.1", port, ctx):
                    break
            if time.monotonic() > deadline:
                raise SimulatorError(f"simulator not ready after {start_timeout}s")
            time.sleep(0.05)
        sim = Simulator(
            url=f"https://127.0.0.1:{port}/sdk",
            host="127.0.0.1",
            port=port,
            ca_file=ca.cert_file,
            thumbprint=issued.sha256_thumbprint,
            user=USER,
            password=password,
            password_file=password_file,
            cbt_dir=cbt_dir,
            workdir=workdir,
            datastore_dir=datastore_dir,
            log_file=log_file,
            process=proc,
            _log=log,
        )
        return sim
    finally:
        if sim is None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            log.close()
