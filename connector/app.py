"""The composition root: builds every adapter, use case and service from one Config.

The only module that knows which adapter implements which port. The daemon,
the API and the pipeline are each handed the parts they use (narrow ports,
settings, callables), never the `App` itself; the CLI, outermost, asks the
`App` for what a command needs.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from connector import __version__
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
from connector.adapters.state import StateStore
from connector.adapters.vddk import VddkParams, VddkSource, sha1_thumbprint
from connector.adapters.vsphere import VSphereClient
from connector.application.rebuild import StateRebuild
from connector.application.retention import Retention
from connector.application.servers import Servers
from connector.application.status import Status, StatusSettings
from connector.audit import FAILURE, SUCCESS, AuditLog
from connector.check import require_vddk
from connector.config import Config
from connector.daemon.api import ApiServer
from connector.daemon.discovery import Discovery
from connector.daemon.lock import StateLock
from connector.daemon.queue import RunQueue
from connector.daemon.recovery import RecoveryReport, recover, sweep
from connector.daemon.runner import LedgerReporter, RunExecutor, RunLimits
from connector.daemon.service import Daemon, DaemonParts
from connector.decorators.bandwidth import (
    BandwidthLimitedStore,
    RateSchedule,
    TokenBucket,
    Window,
    parse_hhmm,
)
from connector.decorators.metrics import MeteredStore, StoreMetrics
from connector.decorators.retry import RetryingStore
from connector.errors import ConfigError, ConnectorError, TransientError
from connector.logging import register_secret, scrub
from connector.network import Proxy
from connector.pipeline.context import PipelineSettings, Reporter, StageContext
from connector.pipeline.driver import RunPipeline
from connector.pipeline.replicate import Replicator
from connector.ports import DiskSource, Hypervisor, ObjectStore
from connector.retry import RetryPolicy
from connector.secrets import Secret, is_credential, resolve_secret_path, secret_file_path
from connector.store.keys import KeyProvider, LocalKeyProvider, generate_key_file
from connector.store.repository import Repository
from connector.tls import server_context

# Seconds `connector status` waits for vCenter or S3 to answer.
PROBE_TIMEOUT = 5.0


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

    def vsphere_client(self, timeout: float | None = None) -> VSphereClient:
        """A new vCenter client with its own session (the daemon's discovery uses one);
        `timeout` (seconds) bounds each connection, the client's default when None."""
        vc = self.config.require_vcenter()
        password = self.config.vcenter_password()
        register_secret(password)
        limits: dict[str, float] = {} if timeout is None else {"timeout": timeout}
        return VSphereClient(
            url=vc.url,
            user=vc.user,
            password=password,
            ca_file=vc.ca_file,
            thumbprint=vc.thumbprint,
            proxy=self.proxy,
            **limits,
        )

    @cached_property
    def objects(self) -> S3ObjectStore:
        return self.s3_store()

    def s3_store(self, **limits: Any) -> S3ObjectStore:
        """A new S3 client of the [s3] section; `limits` are its connect_timeout,
        read_timeout and max_attempts, its defaults when absent."""
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
            **limits,
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

    def pipeline_settings(self) -> PipelineSettings:
        """CBT only where vCenter reads the disks; the transport decides the rest."""
        kind = self.config.transport.kind
        vcenter = self.config.vcenter
        return PipelineSettings(
            enable_cbt=vcenter.enable_cbt
            if vcenter is not None and kind in ("datastore-https", "vddk")
            else False,
            max_read=self.config.transport.max_request,
            needs_no_foreign_snapshots=kind == "datastore-https",
            max_disks_per_vm=self.config.daemon.max_disks_per_vm,
        )

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
        vc = self.config.require_vcenter()
        if vc.password_file is None:  # a config fault: named before VDDK is even looked for
            raise ConfigError(
                "the vddk transport hands the vCenter password to nbdkit as a file "
                "(password=+FILE): set [vcenter] password_file (a file or credential:NAME) "
                "instead of password_env"
            )
        require_vddk(self.config)
        register_secret(self.config.vcenter_password())

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

    # -- the pipeline ------------------------------------------------------------------

    def stage_context(
        self,
        reporter: Reporter | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        stop_reason: Callable[[], str] | None = None,
    ) -> StageContext:
        """The ports, settings and helpers every stage of a run is handed; its stages
        stop at their next safe point once `should_stop()` is true."""
        ctx = StageContext(
            hv=self.hypervisor,
            source=self.disk_source(),
            open_repo=self.open_repository_for_write,
            catalog=self.state,
            disks=self.state,
            runs=self.state,
            blocks=self.state,
            ledger=self.ledger,
            settings=self.pipeline_settings(),
            should_stop=should_stop,
            audit=self.audit,
        )
        if reporter is not None:
            ctx.reporter = reporter
        if stop_reason is not None:
            ctx.stop_reason = stop_reason
        return ctx

    def replicator(
        self,
        reporter: Reporter | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        stop_reason: Callable[[], str] | None = None,
    ) -> Replicator:
        """Whole runs in the foreground (`connector replicate`); a run stops at a safe
        point and is rolled back once `should_stop()` is true."""
        return Replicator(self.stage_context(reporter, should_stop, stop_reason))

    def open_repository_for_write(self) -> Repository:
        """Check S3 access, then open (or create) the replica store for writing.

        The check is retried like every other request to the store: a transient
        error (a reset, a 5xx) does not fail a run before its snapshot.
        """
        self.retry_policy.call(
            self.objects.check_access, "checking access to S3", retryable=(TransientError,)
        )
        return self.repository(create=True)

    # -- use cases -------------------------------------------------------------------------

    @cached_property
    def servers(self) -> Servers:
        return Servers(self.state, self.hypervisor)

    @cached_property
    def retention(self) -> Retention:
        return Retention(
            open_repo=self.repository,
            state=self.state,
            default_keep=self.config.retention.keep,
            stale_lock_age=dt.timedelta(hours=self.config.retention.stale_lock_hours),
            guard_path=self.config.state.path.parent / "purge.lock",
        )

    @cached_property
    def state_rebuild(self) -> StateRebuild:
        """The state database rebuilt from the replica store (`connector state rebuild`)."""
        return StateRebuild(
            open_repo=self.repository,
            store_exists=lambda: self.store_objects.stat("config") is not None,
            catalog=self.state,
            disks=self.state,
            runs=self.state,
            blocks=self.state,
        )

    @cached_property
    def status(self) -> Status:
        """`connector status`: vCenter and S3 probed with short timeouts, the jobs, the daemon.

        The clients are built here, so a config error fails the command (exit 2)
        rather than showing as an unreachable service."""
        probe_vcenter: Callable[[], None] | None = None
        vcenter_target: str | None = None
        if self.config.vcenter is not None:
            client = self.vsphere_client(timeout=PROBE_TIMEOUT)
            vcenter_target = client.url

            def probe_vcenter() -> None:
                try:
                    client.session_generation()  # connects and logs in
                finally:
                    client.close()

        store = self.s3_store(
            connect_timeout=PROBE_TIMEOUT, read_timeout=PROBE_TIMEOUT, max_attempts=1
        )

        def probe_s3() -> None:
            try:
                store.check_access()
            finally:
                store.close()

        s3 = self.config.s3
        bucket = f"s3://{s3.bucket}/{s3.prefix.strip('/')}".rstrip("/")
        return Status(
            jobs=self.jobs,
            catalog=self.state,
            runs=self.state,
            probe_vcenter=probe_vcenter,
            probe_s3=probe_s3,
            daemon_holder=StateLock(self.config.state.path, "status").holder,
            settings=StatusSettings(
                version=__version__,
                on_demand_quota=self.config.daemon.on_demand_quota_per_24h,
                schedule_unit_seconds=self.config.daemon.schedule_unit_seconds,
                vcenter_target=vcenter_target,
                s3_target=f"{bucket} at {store.endpoint_url}",
            ),
        )

    # -- the API and the daemon ------------------------------------------------------------

    def api_server(self) -> ApiServer:
        """The API of the [api] section, bound to its address but not yet serving."""
        cfg = self.config.api
        if cfg is None:
            raise ConfigError(
                "the API is not configured: add an [api] section with listen, cert_file, "
                "key_file and token_file (see docs/security.md)"
            )
        token = self.config.api_token()
        ctx = server_context(cfg.cert_file, resolve_secret_path(cfg.key_file, "API private key"))
        return ApiServer(
            cfg.host, cfg.port, ctx, token, self.state, collectors=(self.store_metrics,)
        )

    def daemon(self, api: ApiServer | None = None) -> Daemon:
        """The long-running connector: a job's retention removes old runs and their packs.

        With an [api] section and no `api` given, the HTTPS API is served while it runs.
        """
        if api is None and self.config.api is not None:
            api = self.api_server()
        return Daemon(
            self.config.daemon,
            StateLock(self.config.state.path, "run"),
            self._daemon_parts,
            api=api,
        )

    def _daemon_parts(self, stopping: threading.Event) -> DaemonParts:
        cfg = self.config.daemon
        queue = RunQueue(self.queue_path)
        reporter = LedgerReporter(self.ledger)
        pipeline = RunPipeline(self.stage_context(reporter, stopping.is_set))
        executor = RunExecutor(
            pipeline=pipeline,
            hv=self.hypervisor,
            state=self.state,
            ledger=self.ledger,
            jobs=self.jobs,
            queue=queue,
            limits=RunLimits(
                max_concurrent_runs=cfg.max_concurrent_runs,
                max_runs_per_host=cfg.max_runs_per_host,
                failures_before_pause=cfg.failures_before_pause,
                stage_retries=cfg.stage_retries,
                retry_backoff=cfg.retry_backoff,
                retry_backoff_max=cfg.retry_backoff_max,
                admission_interval=cfg.admission_interval,
                retention_retry_backoff=cfg.retention_retry_backoff,
            ),
            retention=self.retention.apply,
            stopping=stopping,
            on_run_end=reporter.forget,
        )

        def recover_all() -> RecoveryReport:
            return recover(
                self.state,
                self.ledger,
                queue,
                self.hypervisor,
                self.objects,
                cfg.resume_within,
                release_lock=pipeline.release_lock,
            )

        def sweep_leftovers() -> RecoveryReport:
            return sweep(
                self.state,
                self.ledger,
                self.hypervisor,
                self.objects,
                release_lock=pipeline.release_lock,
                stale_upload_age=dt.timedelta(seconds=cfg.stale_upload_age),
            )

        return DaemonParts(
            queue=queue,
            executor=executor,
            jobs=self.jobs,
            discovery=Discovery(self.discovery_hypervisor, self.state),
            recover=recover_all,
            sweep=sweep_leftovers,
        )

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
