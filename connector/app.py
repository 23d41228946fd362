"""The composition root: builds every adapter and service from one Config."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connector.adapters.datastore_reader import DatastoreHttpsSource
from connector.adapters.jobstore import JobStore
from connector.adapters.kms import KmsKeyProvider
from connector.adapters.ledger import RunLedger
from connector.adapters.local import (
    LocalDiskSource,
    LocalDiskSpec,
    LocalHypervisor,
    LocalVmSpec,
    local_vm_uuid,
)
from connector.adapters.nbd import parse_nbd_uri
from connector.adapters.s3 import S3ObjectStore
from connector.adapters.state import ServerRow, StateStore
from connector.adapters.vddk import VddkParams, VddkSource, sha1_thumbprint
from connector.adapters.vsphere import VSphereClient
from connector.audit import FAILURE, SUCCESS, AuditLog
from connector.checks import check_vddk
from connector.config import Config
from connector.decorators.bandwidth import (
    BandwidthLimitedStore,
    RateSchedule,
    TokenBucket,
    Window,
    parse_hhmm,
)
from connector.decorators.metrics import MeteredStore, StoreMetrics
from connector.decorators.retry import RetryingStore
from connector.errors import ConfigError, ConnectorError, NotFoundError, PermanentError
from connector.logging import register_secret, scrub
from connector.network import Proxy
from connector.pipeline.purge import PurgeReport, PurgeSettings, purge
from connector.pipeline.replicate import ReplicationSettings, Replicator, Reporter
from connector.pipeline.stages import PipelineSettings
from connector.ports import DiskSource, Hypervisor, ObjectStore
from connector.retry import RetryPolicy
from connector.secrets import Secret, is_credential, secret_file_path
from connector.store.keys import KeyProvider, LocalKeyProvider, generate_key_file
from connector.store.repository import Repository

if TYPE_CHECKING:
    from connector.daemon.service import ApiServer, Daemon


@dataclass
class App:
    config: Config

    @cached_property
    def state(self) -> StateStore:
        return StateStore.at_path(self.config.state.path)

    @cached_property
    def ledger(self) -> RunLedger:
        return RunLedger(self.state)

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.state, self.ledger)

    @property
    def queue_path(self) -> Path:
        return self.config.state.path.parent / "queue.db"

    @cached_property
    def audit(self) -> AuditLog:
        """The append-only audit log ([audit] path, default beside the state database)."""
        return AuditLog(self.config.audit_path)

    @cached_property
    def proxy(self) -> Proxy | None:
        return self.config.proxy()

    @contextmanager
    def audited(self, action: str, obj: str, **details: Any) -> Iterator[dict[str, Any]]:
        """Record `action` on `obj` in the audit log with its outcome when the block ends.

        The block may add details (a result) to the yielded dict.
        """
        extra: dict[str, Any] = {}
        try:
            yield extra
        except BaseException as exc:
            error = scrub(str(exc)) if isinstance(exc, ConnectorError) else type(exc).__name__
            self.audit.record(action, obj, FAILURE, **details, **extra, error=error)
            raise
        self.audit.record(action, obj, SUCCESS, **details, **extra)

    @cached_property
    def vsphere(self) -> VSphereClient:
        return self.vsphere_client()

    def vsphere_client(self) -> VSphereClient:
        """A new vCenter client with its own session (the daemon's discovery uses one)."""
        vc = self.config.require_vcenter()
        password = self.config.vcenter_password()
        register_secret(password)
        return VSphereClient(
            url=vc.url,
            user=vc.user,
            password=password,
            ca_file=vc.ca_file,
            thumbprint=vc.thumbprint,
            proxy=self.proxy,
        )

    @cached_property
    def objects(self) -> S3ObjectStore:
        s3 = self.config.s3
        secret = self.config.s3_secret_key()
        if secret is not None:
            register_secret(secret)
        if s3.access_key_id:
            register_secret(Secret(s3.access_key_id))
        return S3ObjectStore(
            bucket=s3.bucket,
            prefix=s3.prefix,
            region=s3.region,
            endpoint_url=s3.endpoint_url,
            ca_file=s3.ca_file,
            sse=s3.sse,
            kms_key_id=s3.kms_key_id,
            access_key_id=Secret(s3.access_key_id) if s3.access_key_id else None,
            secret_access_key=secret,
            use_fips_endpoint=s3.use_fips_endpoint,
            multipart_threshold=s3.multipart_threshold,
            multipart_part_size=s3.multipart_part_size,
            upload_journal=self.ledger,
            proxy=self.proxy,
        )

    @cached_property
    def retry_policy(self) -> RetryPolicy:
        """The one retry policy ([retry]): the object store's and every disk reader's."""
        r = self.config.retry
        return RetryPolicy(attempts=r.attempts, base_delay=r.base_delay, max_delay=r.max_delay)

    @cached_property
    def store_metrics(self) -> StoreMetrics:
        """This process's object-store metrics; the API's /metrics serves them."""
        return StoreMetrics()

    @cached_property
    def store_objects(self) -> ObjectStore:
        """The object store the replica store writes through: S3 wrapped by
        `wrap_object_store` (retry, bandwidth limit, metrics)."""
        d = self.config.daemon
        schedule = RateSchedule(
            d.bandwidth_limit,
            tuple(
                Window(parse_hhmm(w.start), parse_hhmm(w.end), w.limit) for w in d.bandwidth_windows
            ),
        )
        return wrap_object_store(self.objects, self.retry_policy, schedule, self.store_metrics)

    @cached_property
    def kms_provider(self) -> KmsKeyProvider:
        """[store] kms_key_id: region, endpoint and trust default to those of [s3]."""
        st, s3 = self.config.store, self.config.s3
        assert st.kms_key_id is not None
        secret = self.config.s3_secret_key()
        if secret is not None:
            register_secret(secret)
        own_endpoint = st.kms_endpoint_url is not None
        return KmsKeyProvider(
            st.kms_key_id,
            region=st.kms_region or s3.region,
            endpoint_url=st.kms_endpoint_url if own_endpoint else s3.endpoint_url,
            ca_file=st.kms_ca_file if own_endpoint else (st.kms_ca_file or s3.ca_file),
            access_key_id=Secret(s3.access_key_id) if s3.access_key_id else None,
            secret_access_key=secret,
            use_fips_endpoint=s3.use_fips_endpoint,
            proxy=self.proxy,
        )

    def key_provider(self, create: bool) -> KeyProvider:
        if self.config.store.kms_key_id is not None:
            return self.kms_provider
        from_env = self.config.store_key_text()
        if from_env is not None:
            register_secret(from_env)
            return LocalKeyProvider.from_text(from_env.reveal(), f"${self.config.store.key_env}")
        path = self.config.key_file
        configured = self.config.store.key_file
        if create and not path.exists():
            if configured is not None and is_credential(configured):
                raise ConfigError(
                    f"the store key credential {path.name} is missing from "
                    "$CREDENTIALS_DIRECTORY; create the key file (32 random bytes, base64) "
                    "and load it with LoadCredential="
                )
            if self.objects.stat("config") is not None:
                raise ConfigError(
                    f"the store key file {path} is missing but the bucket already holds a "
                    "replica store; restore the key file from your backup"
                )
            generate_key_file(path)
        if path.is_file():
            register_secret(Secret(path.read_text(encoding="utf-8", errors="replace").strip()))
        return LocalKeyProvider(path)

    def repository(self, create: bool = False) -> Repository:
        return Repository.open(self.store_objects, self.key_provider(create), create=create)

    def replication_settings(self) -> ReplicationSettings:
        """CBT only where vCenter reads the disks; the transport decides the rest."""
        kind = self.config.transport.kind
        vcenter = self.config.vcenter
        return ReplicationSettings(
            enable_cbt=vcenter.enable_cbt
            if vcenter is not None and kind in ("datastore-https", "vddk")
            else False,
            max_read=self.config.transport.max_request,
            needs_no_foreign_snapshots=kind == "datastore-https",
            max_disks_per_vm=self.config.daemon.max_disks_per_vm,
        )

    def pipeline_settings(self) -> PipelineSettings:
        return self.replication_settings().pipeline()

    @cached_property
    def hypervisor(self) -> Hypervisor:
        """vCenter, or the VMs of [local] for the local and nbd transports."""
        if self.config.transport.kind in ("local", "nbd"):
            return self.local
        return self.vsphere

    def discovery_hypervisor(self) -> Hypervisor:
        """The inventory the daemon polls: its own vCenter session, or the [local] VMs."""
        if self.config.transport.kind in ("local", "nbd"):
            return self.local
        return self.vsphere_client()

    @cached_property
    def local(self) -> LocalHypervisor:
        return LocalHypervisor(
            local_specs(self.config), self.config.state_dir, retry=self.retry_policy
        )

    def disk_source(self) -> DiskSource:
        """The transport of the config: how disks are read."""
        t = self.config.transport
        kind = t.kind
        if kind in ("local", "nbd"):
            return LocalDiskSource(
                self.local,
                retry=self.retry_policy,
                max_request=t.max_request,
                in_flight=t.in_flight,
            )
        if kind == "vddk":
            return self.vddk_source()
        return DatastoreHttpsSource(
            self.vsphere, retry=self.retry_policy, max_request=t.max_request, proxy=self.proxy
        )

    def vddk_source(self) -> VddkSource:
        t = self.config.transport
        vddk = t.vddk
        assert vddk is not None
        failed = [r for r in check_vddk(self.config) if r.status == "fail"]
        if failed:
            raise ConfigError(
                "the vddk transport cannot run: "
                + "; ".join(f"{r.check}: {r.detail}" for r in failed)
                + " (see `connector check` and docs/transports.md)"
            )
        vc = self.config.require_vcenter()
        register_secret(self.config.vcenter_password())
        if vc.password_file is None:
            raise ConfigError(
                "the vddk transport hands the vCenter password to nbdkit as a file "
                "(password=+FILE): set [vcenter] password_file (a file or credential:NAME) "
                "instead of password_env"
            )

        def params() -> VddkParams:
            client = self.vsphere
            thumbprint = vddk.thumbprint
            if thumbprint is None:
                thumbprint = sha1_thumbprint(client.host, client.port, client.ssl_context())
            return VddkParams(
                libdir=vddk.libdir,
                server=vddk.server or client.host,
                port=vddk.port or client.port,
                user=vc.user,
                thumbprint=thumbprint,
                transports=tuple(vddk.transports),
                config_file=vddk.config_file,
                nbdkit=vddk.nbdkit,
            )

        return VddkSource(
            params,
            secret_file_path(vc.password_file),
            self.config.state_dir / "nbd",
            retry=self.retry_policy,
            max_request=t.max_request,
            in_flight=t.in_flight,
            start_timeout=vddk.start_timeout,
        )

    def replicator(self, reporter: Reporter | None = None) -> Replicator:
        source = self.disk_source()
        settings = self.replication_settings()
        rep = Replicator(
            hv=self.hypervisor,
            source=source,
            open_repo=self._open_for_write,
            state=self.state,
            settings=settings,
            ledger=self.ledger,
            audit=self.audit,
        )
        if reporter is not None:
            rep.reporter = reporter
        return rep

    def _open_for_write(self) -> Repository:
        self.objects.check_access()
        return self.repository(create=True)

    def open_repository_for_write(self) -> Repository:
        """Check S3 access, then open (or create) the replica store for writing."""
        return self._open_for_write()

    def daemon(self, api: ApiServer | None = None) -> Daemon:
        """The long-running connector: a job's retention removes old runs and their packs.

        With an [api] section and no `api` given, the HTTPS API is served while it runs.
        """
        from connector.daemon.api import build_api
        from connector.daemon.service import Daemon

        if api is None and self.config.api is not None:
            api = build_api(self)
        return Daemon(self, retention=self.apply_retention, api=api)

    def resolve_server(self, name_or_uuid: str, refresh: bool = True) -> ServerRow:
        """Find one VM by instance UUID, name or server id (refreshing the catalog first)."""
        matches = self.state.find_servers(name_or_uuid)
        if not matches and refresh:
            self.refresh_catalog()
            matches = self.state.find_servers(name_or_uuid)
        if not matches:
            raise NotFoundError(
                f"no VM named or with instance UUID {name_or_uuid!r}; list them with "
                "`connector vms`"
            )
        if len(matches) > 1:
            uuids = ", ".join(m.vm_uuid for m in matches)
            raise ConfigError(
                f"{len(matches)} VMs are named {name_or_uuid!r} ({uuids}); use the instance UUID"
            )
        return matches[0]

    def refresh_catalog(self) -> list[ServerRow]:
        vms = self.hypervisor.list_vms()
        rows = [self.state.upsert_server(vm) for vm in vms]
        self.state.mark_removed({vm.uuid for vm in vms})
        return rows

    def retention_policies(self, server_ids: set[str]) -> dict[str, int]:
        """Runs to keep per server: its own setting, else the [retention] keep default."""
        settings = self.state.retention_settings()
        return {sid: settings.get(sid, self.config.retention.keep) for sid in sorted(server_ids)}

    def apply_retention(self, server_id: str, keep: int, dry_run: bool = False) -> PurgeReport:
        """Keep a server's `keep` most recent runs (0: all), then purge unused packs.

        What a job's retention setting calls after a run; safe beside runs in flight.
        """
        settings = PurgeSettings(
            stale_lock_age=dt.timedelta(hours=self.config.retention.stale_lock_hours),
            dry_run=dry_run,
        )
        with self.purge_guard():
            return purge(self.repository(), self.state, {server_id: keep}, settings)

    @contextmanager
    def purge_guard(self) -> Iterator[None]:
        """One purge at a time on this state database (an advisory lock beside it)."""
        path = self.config.state.path.parent / "purge.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PermanentError(
                    "another purge is running against this state database; wait for it to end"
                ) from None
            yield
        finally:
            os.close(fd)

    def close(self) -> None:
        if "kms_provider" in self.__dict__:
            self.kms_provider.close()
        if "local" in self.__dict__:
            self.local.close()
        if "vsphere" in self.__dict__:
            self.vsphere.close()
        if "state" in self.__dict__:
            self.state.close()


def wrap_object_store(
    store: ObjectStore,
    retry: RetryPolicy,
    bandwidth: RateSchedule,
    metrics: StoreMetrics | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> ObjectStore:
    """The object store's cross-cutting concerns, stacked in one fixed order.

    From the outside in: retry, then the bandwidth limit, then metrics, then the
    store itself (S3):

    - retry is outermost, so each attempt passes the limiter again: a retried put
      sends its bytes again and they count against the limit, as the first ones
      did (restic's wrapBackend stacks its retry outside the limiter, too). With
      the limiter outside, retries would send unmetered bytes past the limit.
    - metrics sit right on the store, inside both: they count every request that
      reaches S3 (each attempt, the transient errors a retry then hid included)
      and time S3 itself, not the limiter's pacing or the retry's pauses.

    An unlimited schedule adds no limiter; no `metrics`, no metrics layer.
    `sleep` is the retry's pause (tests pass their own).
    """
    wrapped = store
    if metrics is not None:
        wrapped = MeteredStore(wrapped, metrics)
    if not bandwidth.unlimited:
        wrapped = BandwidthLimitedStore(wrapped, TokenBucket(bandwidth))
    return RetryingStore(wrapped, retry, sleep=sleep)


@contextmanager
def build(config: Config) -> Iterator[App]:
    app = App(config)
    try:
        yield app
    finally:
        app.close()


def local_specs(config: Config) -> list[LocalVmSpec]:
    """The VMs of [local], as the local adapter takes them."""
    ca_file = config.transport.nbd_ca_file
    specs = []
    for vm in config.local.vms:
        disks = []
        for disk, key in zip(vm.disks, vm.disk_keys(), strict=True):
            nbd = parse_nbd_uri(disk.nbd, ca_file) if disk.nbd is not None else None
            label = disk.label or str(disk.path if disk.path is not None else disk.nbd)
            disks.append(LocalDiskSpec(key, label, disk.path, disk.snapshot_path, nbd))
        specs.append(
            LocalVmSpec(
                name=vm.name,
                uuid=vm.uuid or local_vm_uuid(vm.name),
                disks=tuple(disks),
                quiescent=vm.quiescent,
                snapshot_command=tuple(vm.snapshot_command) if vm.snapshot_command else None,
                release_command=tuple(vm.release_command) if vm.release_command else None,
                hook_timeout=vm.hook_timeout,
            )
        )
    return specs
