"""Local sources: VMs made of raw image files, block devices or NBD exports.

For KVM hosts and physical servers. A VM is defined in config as a list of
disks; its "snapshot" is whatever the user's snapshot command makes (an LVM or
ZFS snapshot, a paused guest, a qemu-nbd export of a qcow2 snapshot), or
nothing at all when the user says the source is quiescent. There is no changed
block tracking: the pipeline compares block hashes with the previous run's map.

`LocalHypervisor` implements the `Hypervisor` port over that config;
`LocalDiskSource` opens a `LocalFileReader` (file or block device) or an
`NbdReader` (an NBD export) per disk.

A snapshot is recorded in a marker file in the state directory before the
snapshot command runs, and forgotten only after the release command succeeds,
so a snapshot left by a killed process is released at the next run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import subprocess
import uuid as uuid_mod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from connector.adapters.nbd import NbdAddress, NbdConnection, NbdConnectionLost, NbdReader
from connector.domain.model import ChangedAreas, DiskInfo, Extent, SnapshotInfo, VmInfo
from connector.errors import (
    ChangeIdRefused,
    ConnectorError,
    NotFoundError,
    PermanentError,
    TransientError,
    UnreachableError,
)
from connector.logging import get_logger, scrub
from connector.retry import Retryable, RetryPolicy

log = get_logger(__name__)

MiB = 1024 * 1024
_UUID_NAMESPACE = uuid_mod.UUID("6d1b3f6e-4a39-4c0e-9d7e-6b0f3f2a7c11")


def local_vm_uuid(name: str) -> str:
    """The stable instance UUID of a local VM that has none in config."""
    return str(uuid_mod.uuid5(_UUID_NAMESPACE, f"vm:{name}"))


# ------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class LocalDiskSpec:
    key: int
    label: str
    path: Path | None = None  # raw image or block device (local transport)
    snapshot_path: Path | None = None  # what to read while the snapshot exists
    nbd: NbdAddress | None = None  # an NBD export (nbd transport)

    @property
    def read_path(self) -> Path | None:
        return self.snapshot_path or self.path

    @property
    def source(self) -> str:
        return str(self.nbd) if self.nbd is not None else str(self.path)


@dataclass(frozen=True)
class LocalVmSpec:
    name: str
    uuid: str
    disks: tuple[LocalDiskSpec, ...]
    quiescent: bool = False
    snapshot_command: tuple[str, ...] | None = None
    release_command: tuple[str, ...] | None = None
    hook_timeout: float = 600.0
    guest_id: str | None = None  # what a landed AMI's architecture comes from
    firmware: str | None = None  # bios | efi: a landed AMI's boot mode


# ----------------------------------------------------------------------------- reader


class _ReadFailed(Retryable):
    """An I/O error reading a local disk."""


class LocalFileReader:
    """Reads a raw image file or a block device; implements `DiskReader`.

    With `capacity`, the disk is that long: reads and allocated extents stop
    there even when the file is longer.
    """

    def __init__(
        self,
        path: Path,
        *,
        description: str,
        capacity: int | None = None,
        retry: RetryPolicy,
    ) -> None:
        self.path = path
        self.what = description
        self._retry = retry
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"{description}: {path} does not exist") from None
        except PermissionError:
            raise PermanentError(
                f"{description}: no permission to read {path}; run the connector as a user "
                "that may read it (the disk group for block devices)"
            ) from None
        except OSError as exc:
            raise PermanentError(f"{description}: cannot open {path}: {exc}") from exc
        self._closed = False
        try:
            mode = os.fstat(self._fd).st_mode
            self._regular = stat.S_ISREG(mode)
            if not (self._regular or stat.S_ISBLK(mode)):
                raise PermanentError(f"{description}: {path} is neither a file nor a block device")
            self._size = os.lseek(self._fd, 0, os.SEEK_END)
            if capacity is not None and self._size < capacity:
                raise PermanentError(
                    f"{description}: {path} holds {self._size} bytes, fewer than the disk's "
                    f"{capacity}"
                )
            if capacity is not None:
                self._size = capacity  # the disk ends there, even if the file goes on
        except BaseException:
            self.close()
            raise
        self.bytes_read = 0

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ValueError(
                f"read [{offset}, {offset + length}) outside {self.what} ({self._size} bytes)"
            )
        if self._closed:
            raise ValueError("read on a closed reader")

        def once() -> bytes:
            try:
                data = os.pread(self._fd, length, offset)
                while len(data) < length:  # a short read from a device: carry on
                    more = os.pread(self._fd, length - len(data), offset + len(data))
                    if not more:
                        raise PermanentError(
                            f"short read of {self.what}: {len(data)} of {length} bytes at "
                            f"offset {offset} (the file shrank?)"
                        )
                    data += more
                return data
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EAGAIN, errno.EINTR):
                    raise _ReadFailed(str(exc)) from exc
                raise PermanentError(f"reading {self.what} at offset {offset}: {exc}") from exc

        try:
            data = self._retry.call(once, f"reading {self.what} at offset {offset}")
        except TransientError as exc:
            raise TransientError(f"{exc} ({self.path})") from exc
        self.bytes_read += len(data)
        return data

    def allocated_extents(self) -> list[Extent] | None:
        """Data ranges of a sparse file (SEEK_DATA/SEEK_HOLE); None for block devices."""
        if not self._regular:
            return None
        out: list[Extent] = []
        offset = 0
        while offset < self._size:
            try:
                data = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after offset
                    break
                return None  # the file system cannot tell
            if data >= self._size:
                break
            hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), self._size)
            out.append(Extent(data, hole - data))
            offset = hole
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self._fd)


def local_size(path: Path) -> int:
    """The size of a file or block device."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------- hypervisor


class LocalHypervisor:
    """The `Hypervisor` port over VMs defined in config (no vCenter, no CBT)."""

    def __init__(
        self,
        vms: Sequence[LocalVmSpec],
        state_dir: Path,
        *,
        nbd_timeout: float = 30.0,
        retry: RetryPolicy,
    ) -> None:
        self._vms = {vm.uuid: vm for vm in vms}
        self._markers = state_dir / "local-snapshots"
        self._nbd_timeout = nbd_timeout
        self._retry = retry

    def spec(self, uuid: str) -> LocalVmSpec:
        try:
            return self._vms[uuid]
        except KeyError:
            raise NotFoundError(f"no local VM with instance UUID {uuid} in [local]") from None

    def disk_spec(self, uuid: str, key: int) -> LocalDiskSpec:
        vm = self.spec(uuid)
        for disk in vm.disks:
            if disk.key == key:
                return disk
        raise NotFoundError(f"local VM {vm.name!r} has no disk {key}")

    # -- Hypervisor ----------------------------------------------------------------

    def list_vms(self) -> list[VmInfo]:
        return [self._info(vm) for vm in self._vms.values()]

    def get_vm(self, uuid: str) -> VmInfo:
        return self._info(self.spec(uuid))

    def enable_cbt(self, uuid: str) -> None:
        """Local disks have no changed block tracking; runs compare block hashes."""
        self.spec(uuid)

    def create_snapshot(self, uuid: str, name: str, description: str) -> SnapshotInfo:
        vm = self.spec(uuid)
        self._mark(vm, name)
        try:
            if vm.snapshot_command:
                self._hook(vm, "snapshot", vm.snapshot_command, name)
            disks = tuple(self._disk(vm, d, d.read_path, strict=True) for d in vm.disks)
        except BaseException as exc:
            log.warning("local.snapshot_failed", vm=vm.name, error=str(exc), action="releasing it")
            try:
                self._release(vm, name)
            except ConnectorError as undo:
                log.error("local.release_failed", vm=vm.name, error=str(undo))
            raise
        return SnapshotInfo(ref=name, name=name, disks=disks)

    def get_snapshot(self, uuid: str, snapshot_ref: str) -> SnapshotInfo:
        vm = self.spec(uuid)
        if snapshot_ref not in self._marked(vm):
            raise NotFoundError(f"local VM {vm.name!r} has no snapshot {snapshot_ref}")
        disks = tuple(self._disk(vm, d, d.read_path, strict=True) for d in vm.disks)
        return SnapshotInfo(ref=snapshot_ref, name=snapshot_ref, disks=disks)

    def remove_snapshot(self, uuid: str, snapshot_ref: str) -> None:
        self._release(self.spec(uuid), snapshot_ref)

    def query_changed_areas(
        self, uuid: str, snapshot_ref: str, disk_key: int, start_offset: int, change_id: str
    ) -> ChangedAreas:
        raise ChangeIdRefused("local disks have no changed block tracking", "NotSupported")

    def close(self) -> None:
        return None

    # -- internals -----------------------------------------------------------------

    def _info(self, vm: LocalVmSpec) -> VmInfo:
        return VmInfo(
            uuid=vm.uuid,
            name=vm.name,
            ref=f"local:{vm.name}",
            datacenter="local",
            power_state="quiescent" if vm.quiescent else "unknown",
            cbt_enabled=False,
            disks=tuple(self._disk(vm, d, d.path, strict=False) for d in vm.disks),
            snapshots=tuple(SnapshotInfo(ref=n, name=n) for n in self._marked(vm)),
            guest_id=vm.guest_id,
            firmware=vm.firmware,
        )

    def _disk(
        self, vm: LocalVmSpec, disk: LocalDiskSpec, path: Path | None, strict: bool
    ) -> DiskInfo:
        """The disk as it is now; with `strict`, a disk that cannot be measured is an error."""
        try:
            capacity = self._measure(disk, path)
        except ConnectorError:
            if strict:
                raise
            capacity = 0
        return DiskInfo(
            key=disk.key,
            label=disk.label,
            capacity=capacity,
            file_name=disk.source,
            backing="nbd" if disk.nbd is not None else "raw",
            uuid=str(uuid_mod.uuid5(_UUID_NAMESPACE, f"disk:{vm.uuid}:{disk.key}")),
            change_id=None,
        )

    def _measure(self, disk: LocalDiskSpec, path: Path | None) -> int:
        nbd = disk.nbd
        if nbd is not None:

            def size() -> int:
                conn = NbdConnection.open(nbd, timeout=self._nbd_timeout, block_status=False)
                try:
                    return conn.size
                finally:
                    conn.close()

            return self._retry.call(
                size,
                f"disk {disk.key}: reaching the NBD export {nbd}",
                retryable=(UnreachableError, NbdConnectionLost),
            )
        assert path is not None
        try:
            return local_size(path)
        except FileNotFoundError:
            raise NotFoundError(f"disk {disk.key}: {path} does not exist") from None
        except PermissionError:
            raise PermanentError(
                f"disk {disk.key}: no permission to read {path}; run the connector as a user "
                "that may read it (the disk group for block devices)"
            ) from None
        except OSError as exc:
            raise PermanentError(f"disk {disk.key}: cannot open {path}: {exc}") from exc

    def _marker(self, vm: LocalVmSpec) -> Path:
        return self._markers / f"{vm.uuid}.json"

    def _marked(self, vm: LocalVmSpec) -> list[str]:
        try:
            doc = json.loads(self._marker(vm).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise PermanentError(
                f"the snapshot marker {self._marker(vm)} is unreadable ({exc}); release the "
                "snapshot by hand if one exists, then delete the file"
            ) from exc
        names = doc.get("snapshots", [])
        return [str(n) for n in names]

    def _mark(self, vm: LocalVmSpec, name: str) -> None:
        names = self._marked(vm)
        if name not in names:
            names.append(name)
        self._write_marker(vm, names)

    def _write_marker(self, vm: LocalVmSpec, names: list[str]) -> None:
        self._markers.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._marker(vm)
        if not names:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"vm": vm.name, "snapshots": names}), encoding="utf-8")
        os.replace(tmp, path)

    def _release(self, vm: LocalVmSpec, name: str) -> None:
        names = self._marked(vm)
        if name not in names:
            return  # removing a snapshot that no longer exists is not an error
        if vm.release_command:
            self._hook(vm, "release", vm.release_command, name)
        self._write_marker(vm, [n for n in names if n != name])

    def _hook(self, vm: LocalVmSpec, action: str, argv: tuple[str, ...], snapshot: str) -> None:
        """Run the user's command (no shell) with the run's names in its environment."""
        env = dict(
            os.environ,
            CONNECTOR_ACTION=action,
            CONNECTOR_VM=vm.name,
            CONNECTOR_VM_UUID=vm.uuid,
            CONNECTOR_SNAPSHOT=snapshot,
        )
        what = f"the {action} command of local VM {vm.name!r} ({argv[0]})"
        log.info("local.hook", command=what)
        try:
            proc = subprocess.run(
                list(argv),
                env=env,
                capture_output=True,
                text=True,
                timeout=vm.hook_timeout,
                check=False,
            )
        except FileNotFoundError:
            raise PermanentError(f"{what} does not exist; fix [local] in the config") from None
        except subprocess.TimeoutExpired:
            raise PermanentError(f"{what} did not finish within {vm.hook_timeout:.0f} s") from None
        except OSError as exc:
            raise PermanentError(f"{what} could not be started: {exc}") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
            raise PermanentError(
                f"{what} failed with exit code {proc.returncode}"
                + (f": {scrub(tail)}" if tail else "")
            )


# ----------------------------------------------------------------------------- source


class LocalDiskSource:
    """Opens a reader on each local disk of a run; implements `DiskSource`."""

    def __init__(
        self,
        hv: LocalHypervisor,
        *,
        retry: RetryPolicy,
        max_request: int = 8 * MiB,
        in_flight: int = 8,
        timeout: float = 120.0,
    ) -> None:
        self._hv = hv
        self._retry = retry
        self._max_request = max_request
        self._in_flight = in_flight
        self._timeout = timeout

    def open(
        self, vm: VmInfo, snapshot: SnapshotInfo, disk: DiskInfo
    ) -> LocalFileReader | NbdReader:
        spec = self._hv.disk_spec(vm.uuid, disk.key)
        what = f"disk {disk.key} of VM {vm.name!r}"
        if spec.nbd is not None:
            return NbdReader(
                spec.nbd,
                description=what,
                capacity=disk.capacity,
                retry=self._retry,
                max_request=self._max_request,
                in_flight=self._in_flight,
                timeout=self._timeout,
            )
        path = spec.read_path
        assert path is not None
        return LocalFileReader(path, description=what, capacity=disk.capacity, retry=self._retry)
