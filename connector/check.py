"""`connector check`: independent checks of a live setup, in one registry.

Each check is a function `Subject -> CheckResult` (the App is a Subject),
registered with `@register`.
A check that raises is reported as failed with the error's message; one check
failing never stops the others. Checks that need a piece of configuration
that is absent report `skipped`. `run_checks` runs them in registration order.

The VDDK check needs only the config (`check_vddk`), so the composition root
runs it too before it starts the vddk transport (`require_vddk`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from connector.adapters.localstore import LocalDirObjectStore
from connector.adapters.vddk import dump_vddk_plugin, nbdkit_plugin_dir, vddk_library
from connector.audit import verify as verify_audit
from connector.errors import ConfigError, ConnectorError
from connector.logging import scrub
from connector.policies import vcenter_privileges

if TYPE_CHECKING:
    from connector.adapters.s3 import S3ObjectStore
    from connector.adapters.vsphere import VSphereClient
    from connector.config import Config


class Subject(Protocol):
    """What the checks use of the composition root (`connector.app.App` is one)."""

    config: Config

    @property
    def vsphere(self) -> VSphereClient: ...

    @property
    def objects(self) -> S3ObjectStore | LocalDirObjectStore: ...


Status = Literal["ok", "failed", "skipped"]


@dataclass
class CheckResult:
    """The outcome of one check: a status, a one-line summary, and what it found.

    `name` and `title` are those the check was registered with; `run_checks`
    fills them in.
    """

    status: Status
    summary: str
    missing: list[str] = field(default_factory=list)  # missing permissions, by name
    details: list[str] = field(default_factory=list)
    name: str = ""
    title: str = ""


CheckFn = Callable[[Subject], CheckResult]


@dataclass(frozen=True)
class _Check:
    """A registered check: its name, title and function."""

    name: str
    title: str
    fn: CheckFn


_REGISTRY: dict[str, _Check] = {}


def register(name: str, title: str) -> Callable[[CheckFn], CheckFn]:
    """Register a check under a unique dotted name (shown and selectable with --only)."""

    def add(fn: CheckFn) -> CheckFn:
        if name in _REGISTRY:
            raise ValueError(f"a check named {name!r} is already registered")
        _REGISTRY[name] = _Check(name, title, fn)
        return fn

    return add


def names() -> list[str]:
    """The names of the registered checks, in registration order."""
    return list(_REGISTRY)


def run_checks(app: Subject, only: Iterable[str] = ()) -> list[CheckResult]:
    """Run the selected checks (all by default), in registration order."""
    wanted = list(only)
    unknown = [n for n in wanted if n not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown check(s): {', '.join(unknown)}; known: {', '.join(_REGISTRY)}")
    results = []
    for check in _REGISTRY.values():
        if wanted and check.name not in wanted:
            continue
        try:
            result = check.fn(app)
        except ConnectorError as exc:
            result = CheckResult("failed", scrub(str(exc)))
        except Exception as exc:  # a check's own bug must not hide the other checks
            result = CheckResult("failed", scrub(f"{type(exc).__name__}: {exc}"))
        result.name, result.title = check.name, check.title
        results.append(result)
    return results


# ------------------------------------------------------------------------- checks


@register("secrets", "every configured secret can be read")
def _secrets(app: Subject) -> CheckResult:
    cfg = app.config
    sources = []
    if cfg.vcenter is not None:
        cfg.vcenter_password()
        sources.append("vCenter password")
    if cfg.s3_secret_key() is not None:
        sources.append("S3 secret access key")
    if cfg.store.key_env is not None:
        cfg.store_key_text()
        sources.append("store key (environment)")
    if cfg.api is not None:
        cfg.api_token()
        sources.append("API token")
    if not sources:
        return CheckResult("ok", "no secrets configured")
    return CheckResult("ok", "readable: " + ", ".join(sources))


@register("vcenter.connect", "vCenter is reachable over verified TLS 1.2+ and accepts the login")
def _vcenter_connect(app: Subject) -> CheckResult:
    if app.config.vcenter is None:
        return CheckResult("skipped", f"no [vcenter] (transport {app.config.transport.kind!r})")
    vms = app.vsphere.list_vms()
    ctx = app.vsphere.ssl_context()
    via = f" through the proxy {app.vsphere.proxy.url}" if app.vsphere.proxy else ""
    return CheckResult(
        "ok",
        f"logged in to {app.vsphere.url} as {app.vsphere.user}{via} "
        f"(minimum {ctx.minimum_version.name}); {len(vms)} VMs visible",
    )


@register("vcenter.privileges", "the vCenter user holds the connector's privileges")
def _vcenter_privileges(app: Subject) -> CheckResult:
    if app.config.vcenter is None:
        return CheckResult("skipped", f"no [vcenter] (transport {app.config.transport.kind!r})")
    needed = vcenter_privileges(app.config.vcenter.enable_cbt, app.config.transport.kind)
    missing = app.vsphere.missing_privileges({p: where for p, (where, _) in needed.items()})
    if not missing:
        return CheckResult("ok", f"all {len(needed)} privileges granted")
    details = []
    for privilege in sorted(missing):
        objects = missing[privilege]
        shown = ", ".join(objects[:5]) + (
            f" and {len(objects) - 5} more" if len(objects) > 5 else ""
        )
        details.append(f"{privilege} ({needed[privilege][1]}): missing on {shown}")
    return CheckResult(
        "failed",
        f"{len(missing)} of {len(needed)} privileges missing; add them to the connector's "
        "role (docs/permissions.md)",
        missing=sorted(missing),
        details=details,
    )


@register("s3.permissions", "the AWS credentials can use the staging bucket with encryption")
def _s3_permissions(app: Subject) -> CheckResult:
    s3 = app.config.s3
    if s3 is None:
        return CheckResult("skipped", "the replica store is a local directory ([store] kind)")
    store = app.objects
    assert not isinstance(store, LocalDirObjectStore)  # [s3] present: the S3 store
    probes = store.probe_permissions()
    missing: list[str] = []
    details: list[str] = []
    failed = False
    for probe in probes:
        needs = ", ".join(probe.permissions) or "-"
        if probe.status == "ok":
            details.append(f"{probe.request}: ok ({needs})")
            continue
        details.append(f"{probe.request}: {probe.status} ({needs}) {probe.message}".rstrip())
        if probe.status == "denied":
            failed = True
            missing += [p for p in probe.permissions if p not in missing]
        elif probe.status == "error":
            failed = True
    if failed:
        summary = (
            f"missing permission(s): {', '.join(missing)}; see docs/permissions.md"
            if missing
            else "some requests failed (see details)"
        )
        return CheckResult("failed", summary, missing=missing, details=details)
    return CheckResult(
        "ok",
        f"s3://{store.bucket}/{s3.prefix} readable and writable with {s3.sse} encryption",
        details=details,
    )


@register("store.directory", "the replica store's directory is writable, with its free space")
def _store_directory(app: Subject) -> CheckResult:
    path = app.config.store.path
    if app.config.store.kind != "local" or path is None:
        return CheckResult("skipped", "the replica store is in S3 ([store] kind)")
    store = app.objects
    assert isinstance(store, LocalDirObjectStore)  # [store] kind = "local"
    store.check_access()
    usage = shutil.disk_usage(store.root)
    free, total = usage.free / 1024**3, usage.total / 1024**3
    return CheckResult(
        "ok", f"{store.root} readable and writable; {free:.1f} GiB free of {total:.1f} GiB"
    )


@register("audit.log", "the audit log is writable and its chain verifies")
def _audit(app: Subject) -> CheckResult:
    path = app.config.audit_path
    if not path.exists():
        return CheckResult("ok", f"{path} will be created at the first audited action")
    result = verify_audit(path)
    if not result.ok:
        return CheckResult(
            "failed",
            f"{path}: {result.problems[0]}",
            details=result.problems[1:],
        )
    return CheckResult("ok", f"{path}: {result.records} records, chain intact")


@register("transport.vddk", "nbdkit, its vddk plugin and the VDDK library are present and load")
def _vddk(app: Subject) -> CheckResult:
    return check_vddk(app.config)


def check_vddk(config: Config) -> CheckResult:
    """The vddk transport: nbdkit, its vddk plugin, the VDDK library in libdir, and a load.

    Each part found is a detail line `vddk: PART: ok|fail: WHAT`; the summary of a
    failure names every failed part. VDDK is loaded once (nbdkit --dump-plugin)
    only when every other part is present. Other transports skip the check.
    """
    vddk = config.transport.vddk
    if config.transport.kind != "vddk" or vddk is None:
        return CheckResult("skipped", f"transport is {config.transport.kind!r}")
    parts: list[tuple[str, bool, str]] = []  # (part, found, detail)
    nbdkit = shutil.which(vddk.nbdkit)
    if nbdkit is None:
        parts.append(
            (
                "nbdkit",
                False,
                f"{vddk.nbdkit!r} is not installed or not on PATH (apt-get install nbdkit)",
            )
        )
        return _vddk_result(parts)
    parts.append(("nbdkit", True, nbdkit))
    plugindir = nbdkit_plugin_dir(nbdkit)
    plugin = plugindir / "nbdkit-vddk-plugin.so" if plugindir is not None else None
    if plugin is None or not plugin.is_file():
        parts.append(
            (
                "vddk plugin",
                False,
                f"nbdkit has no vddk plugin in {plugindir}: install nbdkit-plugin-vddk "
                "(Debian 13 contrib, Ubuntu universe) or nbdkit-vddk-plugin (RHEL, Fedora)",
            )
        )
    else:
        parts.append(("vddk plugin", True, str(plugin)))
    library = vddk_library(vddk.libdir)
    if library is None:
        where = "does not exist" if not vddk.libdir.exists() else "holds no lib64/libvixDiskLib.so*"
        parts.append(
            (
                "VDDK library",
                False,
                f"VDDK is missing: {vddk.libdir} {where}. VDDK is VMware's proprietary Virtual "
                "Disk Development Kit and is not shipped with the connector: download it for "
                "Linux from VMware, unpack it there (or mount it there in the container), or "
                "point [transport.vddk] libdir at it",
            )
        )
    else:
        parts.append(("VDDK library", True, str(library)))
    if all(found for _, found, _ in parts):
        ok, detail = dump_vddk_plugin(nbdkit, vddk.libdir)
        parts.append(("load", ok, detail))
    return _vddk_result(parts)


def _vddk_result(parts: list[tuple[str, bool, str]]) -> CheckResult:
    """The VDDK check's result from its parts: failed if any part is missing."""
    lines = [
        f"vddk: {part}: {'ok' if found else 'fail'}: {detail}" for part, found, detail in parts
    ]
    failed = [f"vddk: {part}: {detail}" for part, found, detail in parts if not found]
    if failed:
        return CheckResult("failed", "; ".join(failed), details=lines)
    return CheckResult("ok", "VDDK is present and loads", details=lines)


def require_vddk(config: Config) -> None:
    """Refuse a vddk transport that cannot run, naming each missing part (ConfigError)."""
    result = check_vddk(config)
    if result.status == "failed":
        raise ConfigError(
            f"the vddk transport cannot run: {result.summary} "
            "(see `connector check` and docs/transports.md)"
        )
