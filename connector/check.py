"""`connector check`: independent checks of a live setup, in one registry.

Each check is a function `Subject -> CheckResult` (the App is a Subject),
registered with `@register`. A result says what was found and, when it failed,
the fix: what the operator does about it (`connector check` shows one table of
check, result and fix).
A check that raises is reported as failed with the error's message (its advice,
after the first "; ", becomes the fix); one check failing never stops the others.
Checks that need a piece of configuration that is absent report `skipped`.
`run_checks` runs them in registration order.

The VDDK check needs only the config (`check_vddk`), so the composition root
runs it too before it starts the vddk transport (`require_vddk`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from connector.adapters.localstore import LocalDirObjectStore
from connector.adapters.vddk import dump_vddk_plugin, nbdkit_plugin_dir, vddk_library
from connector.audit import verify as verify_audit
from connector.errors import ConfigError, ConnectorError
from connector.logging import scrub
from connector.policies import vcenter_privileges
from connector.secrets import is_credential, secret_file_path

if TYPE_CHECKING:
    from connector.adapters.kms import KmsKeyProvider
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

    @property
    def kms_provider(self) -> KmsKeyProvider: ...


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
    fix: str = ""  # what to do about a failure
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
            summary, fix = split_advice(scrub(str(exc)))
            result = CheckResult("failed", summary, fix=fix)
        except Exception as exc:  # a check's own bug must not hide the other checks
            result = CheckResult("failed", scrub(f"{type(exc).__name__}: {exc}"))
        result.name, result.title = check.name, check.title
        results.append(result)
    return results


def split_advice(message: str) -> tuple[str, str]:
    """An error message `what happened; what to do` as (what happened, what to do)."""
    what, sep, advice = message.partition("; ")
    return (what, advice) if sep else (message, "")


# ------------------------------------------------------------------------- checks


@register("config", "the config file is valid")
def _config(app: Subject) -> CheckResult:
    cfg = app.config
    where = str(cfg.source) if cfg.source is not None else "the config"
    return CheckResult(
        "ok", f"{where}: valid (transport {cfg.transport.kind}, state {cfg.state.path})"
    )


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
        f"{len(missing)} of {len(needed)} privileges missing: {', '.join(sorted(missing))}",
        missing=sorted(missing),
        details=details,
        fix="add them to the connector's role in vCenter (docs/permissions.md)",
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
        fix = (
            "grant them to the connector's AWS credentials (`connector iam-policy`)"
            if missing
            else "see the details; `connector status` shows whether S3 is reachable"
        )
        return CheckResult("failed", summary, missing=missing, details=details, fix=fix)
    return CheckResult(
        "ok",
        f"s3://{store.bucket}/{s3.prefix} readable and writable with {s3.sse} encryption",
        details=details,
    )


@register("s3.encryption", "the staging bucket encrypts by default")
def _s3_encryption(app: Subject) -> CheckResult:
    s3 = app.config.s3
    if s3 is None:
        return CheckResult("skipped", "the replica store is a local directory ([store] kind)")
    store = app.objects
    assert not isinstance(store, LocalDirObjectStore)  # [s3] present: the S3 store
    algorithms = store.default_encryption()
    if algorithms is None:
        default: dict[str, str] = {"SSEAlgorithm": s3.sse}
        if s3.sse == "aws:kms" and s3.kms_key_id:
            default["KMSMasterKeyID"] = s3.kms_key_id
        rules = [{"ApplyServerSideEncryptionByDefault": default}]
        document = json.dumps({"Rules": rules}, separators=(",", ":"))
        return CheckResult(
            "failed",
            f"bucket {s3.bucket} has no default encryption: an object put without the "
            "connector's encryption header would be stored unencrypted",
            fix=f"aws s3api put-bucket-encryption --bucket {s3.bucket} "
            f"--server-side-encryption-configuration '{document}'",
        )
    return CheckResult(
        "ok",
        f"bucket {s3.bucket} encrypts by default with {', '.join(algorithms)}; the connector "
        f"asks for {s3.sse} on every put",
    )


@register("kms", "the store's KMS key is usable")
def _kms(app: Subject) -> CheckResult:
    store = app.config.store
    if store.kms_key_id is None:
        how = "a key file" if store.key_env is None else f"${store.key_env}"
        s3_kms = (
            "; the S3 SSE-KMS key is tried by s3.permissions (through S3)"
            if app.config.s3 is not None and app.config.s3.sse == "aws:kms"
            else ""
        )
        return CheckResult("skipped", f"no [store] kms_key_id: the store key is {how}{s3_kms}")
    provider = app.kms_provider
    arn = provider.probe()
    return CheckResult(
        "ok", f"{store.kms_key_id} ({arn}) is enabled and gives data keys at {provider.endpoint}"
    )


MAX_CLOCK_SKEW = dt.timedelta(minutes=5)


@register("clock", "this machine's clock agrees with AWS within 5 minutes")
def _clock(app: Subject) -> CheckResult:
    store = app.objects
    if isinstance(store, LocalDirObjectStore):
        return CheckResult("skipped", "the replica store is a local directory: no S3 to ask")
    before = dt.datetime.now(dt.UTC)
    server = store.server_time()
    after = dt.datetime.now(dt.UTC)
    if server is None:
        return CheckResult("skipped", "S3 answered without a Date header")
    return clock_result(before + (after - before) / 2, server)


def clock_result(local: dt.datetime, server: dt.datetime) -> CheckResult:
    """Compare this machine's time with the server's (its Date header has whole seconds)."""
    skew = local - server
    seconds = abs(skew.total_seconds())
    direction = "ahead of" if skew.total_seconds() > 0 else "behind"
    shown = f"{seconds:.0f} s {direction} S3"
    if abs(skew) >= MAX_CLOCK_SKEW:
        return CheckResult(
            "failed",
            f"this machine's clock is {shown}: AWS refuses signed requests from a clock "
            "15 minutes off, and run times and schedules go wrong before that",
            fix="synchronise the clock with NTP (timedatectl set-ntp true, or chrony)",
        )
    return CheckResult("ok", f"clock {shown} (under {MAX_CLOCK_SKEW.seconds // 60} minutes)")


MIN_FREE_BYTES = 1024**3  # the state database, the queue, the audit log and NBD sockets


@register("state.space", "the state folder has room")
def _state_space(app: Subject) -> CheckResult:
    folder = app.config.state_dir
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    usage = shutil.disk_usage(existing)
    return space_result(folder, existing, usage.free)


def space_result(folder: Path, measured: Path, free: int) -> CheckResult:
    """Enough free space in the state folder's file system (MIN_FREE_BYTES)?"""
    where = str(folder) if measured == folder else f"{folder} (not created yet; {measured})"
    shown = f"{free / 1024**3:.1f} GiB free in {where}"
    if free < MIN_FREE_BYTES:
        return CheckResult(
            "failed",
            f"only {shown}; the state database, the job queue and the audit log need at "
            f"least {MIN_FREE_BYTES // 1024**3} GiB",
            fix=f"free space on that file system, or move [state] path elsewhere "
            f"(df -h {measured})",
        )
    return CheckResult("ok", shown)


@register("secrets.permissions", "no secret file can be read by other users")
def _secret_permissions(app: Subject) -> CheckResult:
    return permissions_result(secret_files(app.config))


def secret_files(config: Config) -> list[tuple[str, Path | None]]:
    """Every secret the config names as a file, with the file it is read from.

    The path is None for a systemd credential outside systemd (no
    $CREDENTIALS_DIRECTORY: systemd keeps those files). The store key file is
    included unless the store key comes from KMS or the environment.
    """
    found: list[tuple[str, Path | None]] = []

    def add(what: str, path: Path | None) -> None:
        if path is None:
            return
        if is_credential(path) and not os.environ.get("CREDENTIALS_DIRECTORY"):
            found.append((what, None))
            return
        found.append((what, secret_file_path(path)))

    if config.vcenter is not None:
        add("vCenter password", config.vcenter.password_file)
    if config.s3 is not None:
        add("S3 secret access key", config.s3.secret_access_key_file)
    if config.api is not None:
        add("API token", config.api.token_file)
        add("API private key", config.api.key_file)
    if config.store.kms_key_id is None and config.store.key_env is None:
        key = config.store.key_file if config.store.key_file is not None else config.key_file
        add("store key", key)
    return found


def permissions_result(files: list[tuple[str, Path | None]]) -> CheckResult:
    """Fail when a secret file is open to its group or to others (mode & 0o077)."""
    details: list[str] = []
    exposed: list[Path] = []
    for what, path in files:
        if path is None:
            details.append(f"{what}: a systemd credential (systemd keeps its file private)")
            continue
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            details.append(f"{what}: {path} does not exist yet")
            continue
        if mode & 0o077:
            exposed.append(path)
            details.append(f"{what}: {path} has mode {mode:04o}: other users can read it")
        else:
            details.append(f"{what}: {path} mode {mode:04o}")
    if exposed:
        shown = ", ".join(str(p) for p in exposed)
        return CheckResult(
            "failed",
            f"readable by other users: {shown}",
            details=details,
            fix="; ".join(f"chmod 600 {p}" for p in exposed),
        )
    return CheckResult(
        "ok", f"{len(files)} secret file(s), none open to other users", details=details
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
            fix="restore the audit log from a copy, or move it aside to start a new chain "
            "(`connector audit verify` names the first changed line)",
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
        return CheckResult(
            "failed", "; ".join(failed), details=lines, fix="see docs/transports.md (VDDK)"
        )
    return CheckResult("ok", "VDDK is present and loads", details=lines)


def require_vddk(config: Config) -> None:
    """Refuse a vddk transport that cannot run, naming each missing part (ConfigError)."""
    result = check_vddk(config)
    if result.status == "failed":
        raise ConfigError(
            f"the vddk transport cannot run: {result.summary} "
            "(see `connector check` and docs/transports.md)"
        )


# ------------------------------------------------------------------ landing in AWS


class LandingSubject(Subject, Protocol):
    """What the landing check uses of the composition root."""

    def landing_enabled(self) -> bool: ...

    def landing_probe(self) -> dict[str, str]: ...


GUEST_NOTE = (
    "a landed AMI is the disks as they are: it boots on EC2 only when the guest has the "
    "ENA and NVMe drivers (no guest conversion; see docs/landing.md)"
)


@register("aws.landing", "the AWS credentials may land runs as EBS snapshots and AMIs")
def _landing(app: Subject) -> CheckResult:
    land: LandingSubject = app  # type: ignore[assignment]
    if not land.landing_enabled():
        return CheckResult("skipped", "no job lands its runs and [landing] mode is 'never'")
    found = land.landing_probe()
    missing = sorted(a for a, v in found.items() if v != "ok")
    details = [f"{a}: {v}" for a, v in sorted(found.items())] + [GUEST_NOTE]
    if missing:
        return CheckResult(
            "failed",
            "missing landing permissions: "
            + ", ".join(missing)
            + "; apply `connector iam-policy --landing` (docs/permissions.md)",
            missing=missing,
            details=details,
            fix="grant them to the landing credentials: `connector iam-policy --landing`",
        )
    return CheckResult("ok", f"{len(found)} landing calls allowed; " + GUEST_NOTE, details=details)
