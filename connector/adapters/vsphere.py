"""vSphere adapter: the `Hypervisor` port on top of pyVmomi.

Only domain types (VmInfo, DiskInfo, SnapshotInfo, ChangedAreas) leave this
module; pyVmomi objects stay inside.

Sessions: the client logs in on first use, logs in again once when vCenter
answers NotAuthenticated (an expired or terminated session) and retries the
call, and logs out on `close()`. Calls that start a task are retried only when
the server refused them before doing anything (NotAuthenticated); waiting for a
task is a separate, idempotent poll.

TLS: trust comes from a CA file, a pinned SHA-256 thumbprint or the system
store (connector.tls); verification is never switched off.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlencode, urlsplit
from xml.etree import ElementTree

from pyVmomi import SoapAdapter, VmomiSupport, vim, vmodl

from connector.domain.model import ChangedAreas, DiskInfo, Extent, SnapshotInfo, VmInfo
from connector.errors import (
    AuthenticationError,
    ChangeIdRefused,
    ConfigError,
    ConnectorError,
    NotFoundError,
    PermanentError,
    TLSTrustError,
    TransientError,
    UnreachableError,
)
from connector.logging import get_logger
from connector.network import Proxy, https_connection
from connector.secrets import Secret
from connector.tls import client_context, describe_ssl_error, pinned_context

log = get_logger(__name__)

T = TypeVar("T")

# pyVmomi's constructors are untyped: reach them through Any-typed names.
_PC: Any = vmodl.query.PropertyCollector
_SoapStubAdapter: Any = SoapAdapter.SoapStubAdapter
_ServiceInstance: Any = vim.ServiceInstance
_SnapshotRef: Any = vim.vm.Snapshot
_TaskRef: Any = vim.Task
_ConfigSpec: Any = vim.vm.ConfigSpec
_service_versions: Callable[[str], list[str]] = VmomiSupport.GetServiceVersions
_version_ids: dict[str, str] = VmomiSupport.versionIdMap
_SESSION_COOKIE = "vmware_soap_session"

_VM_PROPERTIES = (
    "name",
    "config.instanceUuid",
    "config.hardware.device",
    "config.changeTrackingEnabled",
    "config.guestId",  # a landed AMI's architecture
    "config.firmware",  # bios | efi: a landed AMI's boot mode
    "runtime.powerState",
    "runtime.host",
    # Requested through the PropertyCollector, an unset `snapshot` is simply
    # left out of the answer. Reading `vm.snapshot` directly on a VM without
    # snapshots crashes govmomi's simulator 0.24.2.
    "snapshot",
)

# Faults that mean "quiescing is not possible here": retried without quiescing.
_QUIESCE_FAULTS: tuple[type[BaseException], ...] = (
    vim.fault.ToolsUnavailable,
    vim.fault.ApplicationQuiesceFault,
    vim.fault.FilesystemQuiesceFault,
    vim.fault.QuiesceDatastoreIOForHAFailed,
)

# Faults worth retrying later: the server is busy or briefly unable to act.
_TRANSIENT_FAULTS: tuple[type[BaseException], ...] = (
    vim.fault.TaskInProgress,
    vmodl.fault.HostCommunication,
    vmodl.fault.SystemError,
    vmodl.fault.RequestCanceled,
)


class _SessionExpired(Exception):
    """Internal: the property collector reported NotAuthenticated for a property."""


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskOutcome:
    """What a finished vSphere task left behind (its result is a pyVmomi object)."""

    state: str
    result: Any = None


def wait_for_task(
    poll: Callable[[], tuple[str, Any, Any]],
    what: str,
    timeout: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> TaskOutcome:
    """Poll a task until it succeeds, fails or the deadline passes.

    `poll()` returns (state, error fault or None, result). A failed task raises
    the ConnectorError that matches its fault, with the fault's message and the
    fault itself as `__cause__`; a task still running at the deadline raises
    TransientError.
    """
    deadline = clock() + timeout
    delay = 0.05
    while True:
        state, error, result = poll()
        if state == "success":
            return TaskOutcome(state, result)
        if state == "error":
            if error is None:
                raise PermanentError(f"{what} failed without an error description")
            fault = error if isinstance(error, BaseException) else None
            raise fault_error(error, what) from fault
        if clock() >= deadline:
            raise TransientError(f"{what} did not finish within {timeout:.0f} s (task {state})")
        sleep(min(delay, max(0.0, deadline - clock())))
        delay = min(delay * 2, 1.0)


def fault_name(fault: object) -> str:
    """The vSphere name of a fault, e.g. "FileFault" (without the namespace)."""
    name = getattr(fault, "_wsdlName", None) or type(fault).__name__
    return str(name)


def fault_message(fault: object) -> str:
    msg = getattr(fault, "msg", None)
    if not msg:
        messages = getattr(fault, "faultMessage", None) or ()
        msg = "; ".join(str(getattr(m, "message", "") or "") for m in messages).strip("; ")
    return str(msg) if msg else fault_name(fault)


def fault_error(fault: object, what: str) -> ConnectorError:
    """The ConnectorError for a vSphere fault (from a call or a task)."""
    text = f"{what} failed: {fault_name(fault)}: {fault_message(fault)}"
    if isinstance(fault, vim.fault.InvalidLogin):
        return AuthenticationError(text)
    if isinstance(fault, vim.fault.NotAuthenticated):
        return TransientError(text)
    if isinstance(fault, vim.fault.NoPermission):
        return PermanentError(
            f"{text}; the vCenter user lacks a privilege "
            f"({getattr(fault, 'privilegeId', None) or 'unknown'})"
        )
    if isinstance(fault, vmodl.fault.ManagedObjectNotFound | vim.fault.NotFound):
        return NotFoundError(text)
    if isinstance(fault, _TRANSIENT_FAULTS):
        return TransientError(text)
    return PermanentError(text)


# -------------------------------------------------------------------------- helpers


def parse_datastore_path(file_name: str) -> tuple[str, str]:
    """Split "[datastore] dir/file.vmdk" into ("datastore", "dir/file.vmdk")."""
    text = file_name.strip()
    if not text.startswith("[") or "]" not in text:
        raise ValueError(f"not a datastore path: {file_name!r}")
    ds, _, rest = text[1:].partition("]")
    return ds, rest.strip()


def _disk_info(device: Any, datastore_names: dict[str, str]) -> DiskInfo:
    backing = device.backing
    capacity = device.capacityInBytes or (device.capacityInKB or 0) * 1024
    if isinstance(backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo):
        kind = "flat"
    else:
        kind = type(backing).__name__.rsplit(".", 1)[-1] if backing is not None else "none"
    rdm = isinstance(backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo)
    file_name = str(getattr(backing, "fileName", "") or "")
    mode = str(getattr(backing, "diskMode", "") or "")
    datastore = None
    ds_ref = getattr(backing, "datastore", None)
    if ds_ref is not None:
        datastore = datastore_names.get(ds_ref._moId)
    if datastore is None and file_name.startswith("["):
        datastore = parse_datastore_path(file_name)[0]
    info = device.deviceInfo
    label = str(info.label) if info is not None and info.label else f"disk {device.key}"
    return DiskInfo(
        key=int(device.key),
        label=label,
        capacity=int(capacity),
        file_name=file_name,
        backing=kind,
        uuid=getattr(backing, "uuid", None) or None,
        change_id=getattr(backing, "changeId", None) or None,
        datastore=datastore,
        independent=mode.startswith("independent"),
        rdm=rdm,
    )


def _virtual_disks(devices: Iterable[Any] | None) -> list[Any]:
    return [d for d in devices or () if isinstance(d, vim.vm.device.VirtualDisk)]


def _flatten_snapshots(trees: Iterable[Any] | None) -> Iterator[Any]:
    for tree in trees or ():
        yield tree
        yield from _flatten_snapshots(tree.childSnapshotList)


# --------------------------------------------------------------------------- client


class VSphereClient:
    """The `Hypervisor` port for vCenter (or ESXi), with pyVmomi."""

    def __init__(
        self,
        url: str,
        user: str,
        password: Secret,
        ca_file: Path | None = None,
        thumbprint: str | None = None,
        timeout: float = 60.0,
        *,
        task_timeout: float = 3600.0,
        proxy: Proxy | None = None,
    ) -> None:
        parts = urlsplit(url if "://" in url else f"https://{url}")
        if parts.scheme != "https":
            raise ConfigError(f"the vCenter URL must use https, not {parts.scheme!r}: {url}")
        if parts.username or parts.password:
            raise ConfigError(
                "the vCenter URL must not carry credentials; use [vcenter] user and password_file"
            )
        if not parts.hostname:
            raise ConfigError(f"the vCenter URL has no host name: {url}")
        self._host = parts.hostname
        try:
            self._port = parts.port or 443
        except ValueError as exc:
            raise ConfigError(f"the vCenter URL has an invalid port: {url}") from exc
        self._path = parts.path.rstrip("/") or "/sdk"
        host_part = f"[{self._host}]" if ":" in self._host else self._host
        self._netloc = host_part if self._port == 443 else f"{host_part}:{self._port}"
        self._url = f"https://{self._netloc}{self._path}"
        self._user = user
        self._password = password
        self._ca_file = ca_file
        self._thumbprint = thumbprint
        self._timeout = timeout
        self._task_timeout = task_timeout
        self._proxy = proxy if proxy is not None and proxy.applies_to(self._host) else None
        if self._proxy is not None and thumbprint:
            raise ConfigError(
                f"[vcenter] thumbprint cannot be checked through the proxy {self._proxy.url}: "
                f"give the vCenter's CA as ca_file, or add {self._host} to [network] no_proxy"
            )

        self._lock = threading.RLock()
        self._ctx: ssl.SSLContext | None = None
        self._stub: Any = None
        self._content: Any = None
        self._logged_in = False
        self._generation = 0  # bumped at every login, so concurrent callers re-login once
        self._dc_paths: dict[str, str] = {}

    # ------------------------------------------------------------------ identity

    @property
    def url(self) -> str:
        return self._url

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def user(self) -> str:
        return self._user

    @property
    def proxy(self) -> Proxy | None:
        """The proxy connections to this vCenter go through, if any."""
        return self._proxy

    def __repr__(self) -> str:
        return f"VSphereClient({self._url!r}, user={self._user!r})"

    # ----------------------------------------------------------------- transport

    def ssl_context(self) -> ssl.SSLContext:
        """The verifying TLS context used for every connection to this vCenter."""
        with self._lock:
            if self._ctx is None:
                self._ctx = self._make_context()
            return self._ctx

    def _make_context(self) -> ssl.SSLContext:
        if self._thumbprint:
            try:
                return pinned_context(self._host, self._port, self._thumbprint, self._timeout)
            except TLSTrustError as exc:
                cause = exc.__cause__
                if isinstance(cause, OSError) and not isinstance(cause, ssl.SSLError):
                    raise UnreachableError(
                        f"cannot reach vCenter at {self._url}: {_os_error_text(cause)}"
                    ) from cause
                raise
        extra = (self._proxy.ca_file,) if self._proxy and self._proxy.ca_file else ()
        return client_context(self._ca_file, extra)

    def _translate(self, exc: BaseException, what: str) -> ConnectorError | None:
        """A ConnectorError for a transport failure or a fault, or None if unknown."""
        if isinstance(exc, ConnectorError):
            return exc
        if isinstance(exc, ssl.SSLError | ssl.CertificateError):
            return TLSTrustError(describe_ssl_error(self._host, exc))
        if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError):
            return TransientError(f"{what}: vCenter at {self._url} closed the connection ({exc})")
        if isinstance(exc, http.client.HTTPException):
            return TransientError(f"{what}: bad HTTP answer from vCenter at {self._url} ({exc})")
        if isinstance(exc, OSError):
            return UnreachableError(f"cannot reach vCenter at {self._url}: {_os_error_text(exc)}")
        if isinstance(exc, vmodl.MethodFault):
            return fault_error(exc, what)
        return None

    def _service_version(self, ctx: ssl.SSLContext) -> str:
        """The newest vim25 API version both pyVmomi and the server speak."""
        conn = https_connection(self._host, self._port, ctx, self._timeout, self._proxy)
        try:
            conn.request("GET", f"{self._path}/vimServiceVersions.xml")
            resp = conn.getresponse()
            body = resp.read()
            status = resp.status
        finally:
            conn.close()
        server: set[str] = set()
        if status == 200:
            try:
                root = ElementTree.fromstring(body)  # noqa: S314 (our TLS-verified vCenter)
            except ElementTree.ParseError:
                root = None
            if root is not None:
                for ns in root.findall("namespace"):
                    if ns.findtext("name") == "urn:vim25":
                        server.add(ns.findtext("version") or "")
                        server.update(v.text or "" for v in ns.findall("priorVersions/version"))
        for version in _service_versions("vim25"):
            if _version_ids.get(version) in server:
                return str(version)
        raise PermanentError(
            f"{self._url} does not look like a vCenter or ESXi SOAP endpoint "
            f"(HTTP {status} for vimServiceVersions.xml, or no common API version)"
        )

    def _connect_locked(self) -> None:
        if self._stub is not None:
            return
        ctx = self.ssl_context()
        version = self._service_version(ctx)
        tunnel: dict[str, Any] = {}
        if self._proxy is not None:
            # pyVmomi opens a CONNECT tunnel; TLS inside it is with vCenter (ctx).
            tunnel = {"httpProxyHost": self._proxy.host, "httpProxyPort": self._proxy.port}
        stub = _SoapStubAdapter(
            host=self._host,
            port=self._port,
            path=self._path,
            version=version,
            sslContext=ctx,
            httpConnectionTimeout=self._timeout,
            **tunnel,
        )
        si = _ServiceInstance("ServiceInstance", stub)
        self._content = si.RetrieveContent()
        self._stub = stub

    def _login_locked(self) -> None:
        self._connect_locked()
        try:
            self._content.sessionManager.Login(self._user, self._password.reveal(), None)
        except vim.fault.InvalidLogin:
            raise AuthenticationError(
                f"vCenter refused the user name or password for {self._user}@{self._host}; "
                "check [vcenter] user and password_file"
            ) from None
        self._logged_in = True
        self._generation += 1
        log.info("vcenter.login", url=self._url, user=self._user)

    def _ensure_session(self, what: str) -> int:
        with self._lock:
            if not self._logged_in:
                try:
                    self._login_locked()
                except ConnectorError:
                    raise
                except Exception as exc:
                    err = self._translate(exc, what)
                    if err is None:
                        raise
                    raise err from exc
            return self._generation

    def relogin(self, generation: int | None = None) -> None:
        """Log in again, unless another caller already did since `generation`."""
        with self._lock:
            if generation is not None and generation != self._generation and self._logged_in:
                return
            self._logged_in = False
        self._ensure_session("login")

    def session_generation(self) -> int:
        """A number that changes at every login (pass it back to `relogin`)."""
        return self._ensure_session("login")

    def session_cookie(self) -> str:
        """The Cookie header value of the current session (`vmware_soap_session=...`)."""
        self._ensure_session("login")
        with self._lock:
            raw = str(self._stub.cookie or "")
            first = raw.split(";", 1)[0].strip()
            if first.startswith(_SESSION_COOKIE + "="):
                return first
            return f'{_SESSION_COOKIE}="{self._stub.GetSessionId()}"'

    def _invoke(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run `fn(service_content)` in a session; re-login once on NotAuthenticated."""
        for attempt in (1, 2):
            generation = self._ensure_session(what)
            try:
                return fn(self._content)
            except (vim.fault.NotAuthenticated, _SessionExpired) as exc:
                if attempt == 2:
                    raise TransientError(
                        f"{what}: vCenter at {self._url} refused the session right after login"
                    ) from exc
                log.info("vcenter.session_expired", action="logging in again", during=what)
                self.relogin(generation)
            except ConnectorError:
                raise
            except Exception as exc:
                err = self._translate(exc, what)
                if err is None:
                    raise
                raise err from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Log out (best effort) and drop the connections."""
        with self._lock:
            stub, content, logged_in = self._stub, self._content, self._logged_in
            self._stub = self._content = None
            self._logged_in = False
        if stub is None:
            return
        if logged_in:
            try:
                content.sessionManager.Logout()
                log.info("vcenter.logout", url=self._url)
            except Exception as exc:  # the session may be gone already
                log.debug("vcenter.logout_failed", url=self._url, error=type(exc).__name__)
        stub.DropConnections()

    def __enter__(self) -> VSphereClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------- property collector

    def _retrieve(
        self, content: Any, object_specs: Sequence[Any], obj_type: Any, paths: Sequence[str]
    ) -> list[tuple[Any, dict[str, Any]]]:
        """RetrievePropertiesEx with paging; [(object, {path: value})]."""
        if not object_specs:
            return []
        pc = content.propertyCollector
        spec = _PC.FilterSpec(
            objectSet=list(object_specs),
            propSet=[_PC.PropertySpec(type=obj_type, pathSet=list(paths))],
        )
        out: list[tuple[Any, dict[str, Any]]] = []
        result = pc.RetrievePropertiesEx([spec], _PC.RetrieveOptions(maxObjects=500))
        while result is not None:
            for oc in result.objects or ():
                for missing in oc.missingSet or ():
                    if isinstance(missing.fault, vim.fault.NotAuthenticated):
                        # the simulator answers this way instead of a NotAuthenticated fault
                        raise _SessionExpired()
                out.append((oc.obj, {p.name: p.val for p in oc.propSet or ()}))
            token = result.token
            result = pc.ContinueRetrievePropertiesEx(token) if token else None
        return out

    def _view_contents(
        self, content: Any, root: Any, obj_type: Any, paths: Sequence[str]
    ) -> list[tuple[Any, dict[str, Any]]]:
        """Properties of every object of `obj_type` under `root`, through a ContainerView."""
        view = content.viewManager.CreateContainerView(root, [obj_type], True)
        try:
            traversal = _PC.TraversalSpec(
                name="view", path="view", skip=False, type=vim.view.ContainerView
            )
            spec = _PC.ObjectSpec(obj=view, skip=True, selectSet=[traversal])
            return self._retrieve(content, [spec], obj_type, paths)
        finally:
            try:
                view.DestroyView()
            except Exception as exc:
                log.debug("vcenter.destroy_view_failed", error=type(exc).__name__)

    def _names(self, content: Any, refs: Iterable[Any], obj_type: Any) -> dict[str, str]:
        """moid -> name for managed objects of one type."""
        unique = {r._moId: r for r in refs if r is not None}
        specs = [_PC.ObjectSpec(obj=r) for r in unique.values()]
        return {
            obj._moId: str(props["name"])
            for obj, props in self._retrieve(content, specs, obj_type, ["name"])
            if props.get("name")
        }

    def _datacenters(self, content: Any) -> list[tuple[Any, str, Any]]:
        """[(datacenter, name, vmFolder)], recording each one's inventory path."""
        dcs = self._view_contents(
            content, content.rootFolder, vim.Datacenter, ["name", "vmFolder", "parent"]
        )
        root_id = content.rootFolder._moId
        folders: dict[str, tuple[str, Any]] = {}
        if any(p.get("parent") is not None and p["parent"]._moId != root_id for _, p in dcs):
            for obj, props in self._view_contents(
                content, content.rootFolder, vim.Folder, ["name", "parent"]
            ):
                folders[obj._moId] = (str(props.get("name", "")), props.get("parent"))
        out = []
        for obj, props in dcs:
            name = str(props["name"])
            parts = [name]
            parent = props.get("parent")
            while parent is not None and parent._moId != root_id and parent._moId in folders:
                folder_name, parent = folders[parent._moId]
                parts.append(folder_name)
            with self._lock:
                self._dc_paths[name] = "/".join(reversed(parts))
            out.append((obj, name, props["vmFolder"]))
        return out

    def _datacenter_of(self, content: Any, ref: Any) -> str:
        """The name of the datacenter that holds a managed entity (walks `parent`)."""
        seen = 0
        current = ref
        while current is not None and seen < 64:
            if isinstance(current, vim.Datacenter):
                dc_name = self._names(content, [current], vim.Datacenter).get(current._moId)
                if dc_name is not None and dc_name not in self._dc_paths:
                    self._datacenters(content)
                return dc_name or ""
            got = self._retrieve(
                content, [_PC.ObjectSpec(obj=current)], vim.ManagedEntity, ["parent"]
            )
            current = got[0][1].get("parent") if got else None
            seen += 1
        return ""

    def _build_vms(
        self, content: Any, rows: list[tuple[Any, dict[str, Any]]], datacenter: str
    ) -> list[VmInfo]:
        hosts = self._names(content, (p.get("runtime.host") for _, p in rows), vim.HostSystem)
        ds_refs = [
            getattr(d.backing, "datastore", None)
            for _, p in rows
            for d in _virtual_disks(p.get("config.hardware.device"))
        ]
        datastores = self._names(content, ds_refs, vim.Datastore)
        vms: list[VmInfo] = []
        for obj, props in rows:
            uuid = props.get("config.instanceUuid")
            if not uuid:
                log.warning(
                    "vcenter.vm_skipped", vm=obj._moId, reason="no configuration (inaccessible?)"
                )
                continue
            host_ref = props.get("runtime.host")
            snapshot_info = props.get("snapshot")
            snapshots = tuple(
                SnapshotInfo(ref=t.snapshot._moId, name=str(t.name))
                for t in _flatten_snapshots(
                    snapshot_info.rootSnapshotList if snapshot_info is not None else None
                )
            )
            vms.append(
                VmInfo(
                    uuid=str(uuid),
                    name=str(props.get("name", "")),
                    ref=obj._moId,
                    datacenter=datacenter,
                    power_state=str(props.get("runtime.powerState", "unknown")),
                    cbt_enabled=bool(props.get("config.changeTrackingEnabled") or False),
                    disks=tuple(
                        _disk_info(d, datastores)
                        for d in _virtual_disks(props.get("config.hardware.device"))
                    ),
                    snapshots=snapshots,
                    host=hosts.get(host_ref._moId) if host_ref is not None else None,
                    guest_id=str(props.get("config.guestId") or "") or None,
                    firmware=str(props.get("config.firmware") or "") or None,
                )
            )
        return vms

    def _find_vm(self, content: Any, uuid: str) -> Any:
        ref = content.searchIndex.FindByUuid(None, uuid, True, True)
        if ref is None:
            raise NotFoundError(f"no VM with instance UUID {uuid} in vCenter {self._host}")
        return ref

    # --------------------------------------------------------------- Hypervisor

    def list_vms(self) -> list[VmInfo]:
        """Every VM of every datacenter (templates included), with disks and snapshots."""

        def run(content: Any) -> list[VmInfo]:
            vms: list[VmInfo] = []
            for _dc, dc_name, vm_folder in self._datacenters(content):
                rows = self._view_contents(content, vm_folder, vim.VirtualMachine, _VM_PROPERTIES)
                vms.extend(self._build_vms(content, rows, dc_name))
            return vms

        return self._invoke("listing VMs", run)

    def get_vm(self, uuid: str) -> VmInfo:
        def run(content: Any) -> VmInfo:
            ref = self._find_vm(content, uuid)
            rows = self._retrieve(
                content, [_PC.ObjectSpec(obj=ref)], vim.VirtualMachine, _VM_PROPERTIES
            )
            if not rows:
                raise NotFoundError(f"no VM with instance UUID {uuid} in vCenter {self._host}")
            dc_name = self._datacenter_of(content, ref)
            vms = self._build_vms(content, rows, dc_name)
            if not vms:
                raise NotFoundError(f"VM with instance UUID {uuid} has no configuration")
            return vms[0]

        return self._invoke(f"reading VM {uuid}", run)

    def list_snapshots(self, uuid: str) -> list[SnapshotInfo]:
        return list(self.get_vm(uuid).snapshots)

    def _snapshot_devices(self, content: Any, uuid: str, snapshot_ref: str) -> list[Any]:
        vm_ref = self._find_vm(content, uuid)
        snap = _SnapshotRef(snapshot_ref, vm_ref._stub)
        rows = self._retrieve(
            content, [_PC.ObjectSpec(obj=snap)], vim.vm.Snapshot, ["config.hardware.device", "vm"]
        )
        if not rows or rows[0][1].get("vm") is None or rows[0][1]["vm"]._moId != vm_ref._moId:
            raise NotFoundError(f"VM {uuid} has no snapshot {snapshot_ref}")
        return _virtual_disks(rows[0][1].get("config.hardware.device"))

    def get_snapshot(self, uuid: str, snapshot_ref: str) -> SnapshotInfo:
        """One snapshot of a VM with its own (frozen) disks."""

        def run(content: Any) -> SnapshotInfo:
            vm = self.get_vm(uuid)
            match = [s for s in vm.snapshots if s.ref == snapshot_ref]
            if not match:
                raise NotFoundError(f"VM {vm.name!r} ({uuid}) has no snapshot {snapshot_ref}")
            devices = self._snapshot_devices(content, uuid, snapshot_ref)
            datastores = self._names(
                content, (getattr(d.backing, "datastore", None) for d in devices), vim.Datastore
            )
            return SnapshotInfo(
                ref=snapshot_ref,
                name=match[0].name,
                disks=tuple(_disk_info(d, datastores) for d in devices),
            )

        return self._invoke(f"reading snapshot {snapshot_ref} of VM {uuid}", run)

    def disk_backing_chain(self, uuid: str, snapshot_ref: str, disk_key: int) -> list[str]:
        """The file names of a snapshot disk's backing chain, its own file first.

        More than one entry means the snapshot's disk is itself a delta (a
        linked clone, or a VM that carried snapshots before).
        """

        def run(content: Any) -> list[str]:
            for device in self._snapshot_devices(content, uuid, snapshot_ref):
                if device.key == disk_key:
                    chain: list[str] = []
                    backing = device.backing
                    while backing is not None and len(chain) < 256:
                        chain.append(str(getattr(backing, "fileName", "") or ""))
                        backing = getattr(backing, "parent", None)
                    return chain
            raise NotFoundError(f"snapshot {snapshot_ref} of VM {uuid} has no disk {disk_key}")

        return self._invoke(f"reading disk {disk_key} of snapshot {snapshot_ref}", run)

    def _wait(self, task: Any, what: str) -> TaskOutcome:
        """Wait for a task with this client's deadline (polls survive a re-login)."""
        task_id = task._moId

        def poll() -> tuple[str, Any, Any]:
            def run(content: Any) -> tuple[str, Any, Any]:
                # Read the fields one by one: `info.entity` of RemoveSnapshot's task
                # is the snapshot on the simulator, which pyVmomi refuses to decode.
                ref = _TaskRef(task_id, self._stub)
                rows = self._retrieve(
                    content,
                    [_PC.ObjectSpec(obj=ref)],
                    vim.Task,
                    ["info.state", "info.error", "info.result"],
                )
                if not rows:
                    raise TransientError(f"{what}: task {task_id} vanished before it finished")
                props = rows[0][1]
                return (
                    str(props.get("info.state", "queued")),
                    props.get("info.error"),
                    props.get("info.result"),
                )

            return self._invoke(f"{what} (waiting for task {task_id})", run)

        return wait_for_task(poll, what, self._task_timeout)

    def _start_task(self, what: str, start: Callable[[Any], Any]) -> TaskOutcome:
        task = self._invoke(what, start)
        return self._wait(task, what)

    def enable_cbt(self, uuid: str) -> None:
        """Turn Changed Block Tracking on (effective after the next stun, e.g. a snapshot)."""
        what = f"enabling changed block tracking on VM {uuid}"

        def start(content: Any) -> Any:
            vm = self._find_vm(content, uuid)
            return vm.ReconfigVM_Task(spec=_ConfigSpec(changeTrackingEnabled=True))

        self._start_task(what, start)

    def create_snapshot(self, uuid: str, name: str, description: str) -> SnapshotInfo:
        """Snapshot without memory, quiesced, or not quiesced when quiescing is impossible."""
        what = f"creating snapshot {name!r} of VM {uuid}"

        def starter(quiesce: bool) -> Callable[[Any], Any]:
            def start(content: Any) -> Any:
                vm = self._find_vm(content, uuid)
                return vm.CreateSnapshot_Task(
                    name=name, description=description, memory=False, quiesce=quiesce
                )

            return start

        try:
            outcome = self._start_task(what, starter(True))
        except ConnectorError as exc:
            cause = exc.__cause__
            quiesce_failed = isinstance(cause, _QUIESCE_FAULTS) or (
                isinstance(cause, vim.fault.SnapshotFault)
                and "quiesc" in fault_message(cause).lower()
            )
            if not quiesce_failed:
                raise
            log.warning(
                "vcenter.quiesce_failed",
                vm=uuid,
                fault=fault_name(cause),
                action="taking a crash-consistent snapshot",
            )
            outcome = self._start_task(what + " (not quiesced)", starter(False))
        ref = getattr(outcome.result, "_moId", None)
        if not ref:
            raise PermanentError(f"{what}: the task returned no snapshot")
        snap = self.get_snapshot(uuid, str(ref))
        log.info("vcenter.snapshot_created", snapshot=name, ref=ref, vm=uuid)
        return snap

    def remove_snapshot(self, uuid: str, snapshot_ref: str) -> None:
        """Remove one snapshot (children kept, consolidated); a missing one is fine."""
        what = f"removing snapshot {snapshot_ref} of VM {uuid}"

        def start(content: Any) -> Any:
            vm_ref = self._find_vm(content, uuid)
            snap = _SnapshotRef(snapshot_ref, vm_ref._stub)
            return snap.RemoveSnapshot_Task(removeChildren=False, consolidate=True)

        try:
            self._start_task(what, start)
        except NotFoundError as exc:
            gone = vmodl.fault.ManagedObjectNotFound | vim.fault.NotFound
            if not isinstance(exc.__cause__, gone):
                raise  # the VM itself is missing
            log.info("vcenter.snapshot_already_gone", ref=snapshot_ref, vm=uuid)
            return
        log.info("vcenter.snapshot_removed", ref=snapshot_ref, vm=uuid)

    def query_changed_areas(
        self, uuid: str, snapshot_ref: str, disk_key: int, start_offset: int, change_id: str
    ) -> ChangedAreas:
        what = f"QueryChangedDiskAreas on disk {disk_key} of VM {uuid}"

        def run(content: Any) -> ChangedAreas:
            vm = self._find_vm(content, uuid)
            snap = _SnapshotRef(snapshot_ref, vm._stub)
            try:
                info = vm.QueryChangedDiskAreas(
                    snapshot=snap, deviceKey=disk_key, startOffset=start_offset, changeId=change_id
                )
            except (vim.fault.FileFault, vmodl.fault.InvalidArgument) as fault:
                raise ChangeIdRefused(
                    f"{what}: vCenter refused changeId {change_id!r} "
                    f"({fault_name(fault)}: {fault_message(fault)}); the disk must be read in full",
                    fault=fault_name(fault),
                ) from fault
            extents = tuple(
                Extent(int(a.start), int(a.length)) for a in info.changedArea or () if a.length
            )
            return ChangedAreas(
                start_offset=int(info.startOffset), length=int(info.length), extents=extents
            )

        return self._invoke(what, run)

    # --------------------------------------------------------------- privileges

    def missing_privileges(self, needed: Mapping[str, str]) -> dict[str, list[str]]:
        """{privilege: [objects it is missing on]} for the logged-in user.

        `needed` maps a privilege to where it applies: "vcenter" (the root
        folder), "vm" (every VM) or "datastore" (every datastore). Uses
        AuthorizationManager.HasPrivilegeOnEntities (vSphere 6.5 and later).
        """

        def run(content: Any) -> dict[str, list[str]]:
            root = content.rootFolder
            targets: dict[str, list[tuple[Any, str]]] = {
                "vcenter": [(root, "the vCenter root folder")],
                "vm": [
                    (obj, f"VM {props.get('name', obj._moId)}")
                    for obj, props in self._view_contents(
                        content, root, vim.VirtualMachine, ["name"]
                    )
                ],
                "datastore": [
                    (obj, f"datastore {props.get('name', obj._moId)}")
                    for obj, props in self._view_contents(content, root, vim.Datastore, ["name"])
                ],
            }
            session_key = content.sessionManager.currentSession.key
            missing: dict[str, list[str]] = {}
            for kind in ("vcenter", "vm", "datastore"):
                privileges = sorted(p for p, where in needed.items() if where == kind)
                entities = targets[kind]
                for start in range(0, len(entities) if privileges else 0, 200):
                    batch = entities[start : start + 200]
                    names = {obj._moId: name for obj, name in batch}
                    answers = content.authorizationManager.HasPrivilegeOnEntities(
                        entity=[obj for obj, _ in batch],
                        sessionId=session_key,
                        privId=privileges,
                    )
                    for answer in answers or ():
                        name = names.get(answer.entity._moId, answer.entity._moId)
                        for availability in answer.privAvailability or ():
                            if not availability.isGranted:
                                missing.setdefault(str(availability.privId), []).append(name)
            return missing

        return self._invoke("checking the vCenter user's privileges", run)

    # ---------------------------------------------------------------- datastore

    def datastore_url(self, vm: VmInfo, file_name: str) -> str:
        """The https URL of a datastore file ("[ds] dir/file") through vCenter's /folder."""
        ds, rel = parse_datastore_path(file_name)
        with self._lock:
            dc_path = self._dc_paths.get(vm.datacenter, vm.datacenter)
        query = urlencode({"dcPath": dc_path, "dsName": ds})
        return f"https://{self._netloc}/folder/{quote(rel, safe='/')}?{query}"


def _os_error_text(exc: OSError) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"name resolution failed ({exc})"
    return exc.strerror or str(exc) or type(exc).__name__
