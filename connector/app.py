"""The composition root: builds every adapter, use case and service from one Config.

The only module that knows which adapter implements which port. The daemon,
the API and the pipeline are each handed the parts they use (narrow ports,
settings, callables), never the `App` itself; the CLI, outermost, asks the
`App` for what a command needs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc

from connector import __version__
from connector.adapters.datastore_reader import DatastoreHttpsSource
from connector.adapters.ebs import EbsTarget
from connector.adapters.fleet import Fleet
from connector.adapters.jobstore import JobStore
from connector.adapters.kms import KmsKeyProvider
from connector.adapters.landings import SqlLandings
from connector.adapters.ledger import RunLedger
from connector.adapters.local import (
    LocalDiskSource,
    LocalDiskSpec,
    LocalHypervisor,
    LocalVmSpec,
    local_vm_uuid,
)
from connector.adapters.localstore import LocalDirObjectStore
from connector.adapters.nbd import parse_nbd_uri
from connector.adapters.s3 import S3ObjectStore
from connector.adapters.sql import Database
from connector.adapters.state import StateStore
from connector.adapters.vddk import VddkParams, VddkSource, sha1_thumbprint
from connector.adapters.vsphere import VSphereClient
from connector.application.fleet import FleetStatus, fleet_status
from connector.application.jobs import JobActions, JobSettings
from connector.application.readiness import Readiness
from connector.application.rebuild import StateRebuild
from connector.application.retention import Retention
from connector.application.servers import Servers
from connector.application.status import Status, StatusSettings
from connector.audit import FAILURE, SUCCESS, AuditLog
from connector.check import require_vddk
from connector.config import Config
from connector.daemon.api import ApiServer, ApiServices
from connector.daemon.api.metrics import StateCollector
from connector.daemon.discovery import Discovery
from connector.daemon.fleet import FleetDuty
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
from connector.decorators.landing import BandwidthLimitedTarget, RetryingTarget
from connector.decorators.metrics import MeteredStore, ProcessMetrics, StoreMetrics
from connector.decorators.retry import RetryingStore
from connector.domain.landing import LandingSpec
from connector.domain.records import Control, RunRow, ServerRow
from connector.errors import ConfigError, ConnectorError, PermanentError, TransientError
from connector.logging import register_secret, scrub
from connector.network import Proxy
from connector.pipeline.context import (
    Lander,
    LandSettings,
    PipelineSettings,
    Reporter,
    StageContext,
)
from connector.pipeline.driver import RunPipeline
from connector.pipeline.replicate import Replicator
from connector.ports import DiskSource, Hypervisor, ObjectStore, SnapshotTarget
from connector.retry import RetryPolicy
from connector.secrets import Secret, is_credential, resolve_secret_path, secret_file_path
from connector.store.keys import KeyProvider, LocalKeyProvider, generate_key_file
from connector.store.repository import Repository
from connector.tls import server_context


@dataclass
class _MetricsState:
    """The state store and the run controls, as the API's metrics read them."""

    state: StateStore
    ledger: RunLedger

    def servers(self) -> list[ServerRow]:
        return self.state.servers()

    def runs(self, server_id: str | None = None) -> list[RunRow]:
        return self.state.runs(server_id)

    def controls(self, run_ids: list[str]) -> dict[str, Control]:
        return self.ledger.controls(run_ids)


# Seconds `connector status` waits for vCenter or S3 to answer.
PROBE_TIMEOUT = 5.0
# Hours a run may stay ACTIVE before the API's status counts it as stuck (as the CLI's).
STUCK_RUN_HOURS = 12.0


@dataclass
class App:
    config: Config

    @cached_property
    def database(self) -> Database:
        """The state database: [fleet]'s PostgreSQL, or the SQLite file of [state]."""
        if self.config.fleet is None:
            return Database.at_path(self.config.state.path)
        return fleet_database(self.config)

    @cached_property
    def state(self) -> StateStore:
        return StateStore(self.database)

    @cached_property
    def ledger(self) -> RunLedger:
        return RunLedger(self.state, member=self.member_id if self.config.fleet else None)

    @property
    def member_id(self) -> str:
        """This connector's id in the fleet: [fleet] member_id, or its host name and a
        digest of its state folder (two connectors on one machine differ)."""
        fleet = self.config.fleet
        if fleet is not None and fleet.member_id:
            return fleet.member_id
        digest = hashlib.sha256(str(self.config.state_dir.resolve()).encode()).hexdigest()
        return f"{socket.gethostname()}-{digest[:6]}"

    @cached_property
    def fleet(self) -> Fleet:
        lease = self.config.fleet.lease_timeout if self.config.fleet else 30.0
        return Fleet(self.database, self.member_id, lease)

    def capabilities(self) -> list[str]:
        """What this connector can do: its transport (and VDDK when it is there)."""
        caps = [f"transport:{self.config.transport.kind}"]
        if self.config.transport.kind == "vddk":
            caps.append("vddk")
        return caps

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.state, self.ledger)

    def run_queue(self) -> RunQueue:
        """The job queue: [fleet]'s PostgreSQL (shared), or queue.db beside the state."""
        if self.config.fleet is not None:
            return RunQueue.in_database(self.database)
        return RunQueue(self.queue_path)

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
    def objects(self) -> S3ObjectStore | LocalDirObjectStore:
        """The replica store's own objects, unwrapped: [s3], or [store] kind = "local"."""
        return self.replica_objects()

    def replica_objects(self, **limits: Any) -> S3ObjectStore | LocalDirObjectStore:
        """A new object store of [store] kind; `limits` go to an S3 client (see s3_store)."""
        st = self.config.store
        if st.kind == "local":
            assert st.path is not None  # the config's validation
            return LocalDirObjectStore(st.path, "the replica store directory ([store] path)")
        return self.s3_store(**limits)

    def s3_store(self, **limits: Any) -> S3ObjectStore:
        """A new S3 client of the [s3] section; `limits` are its connect_timeout,
        read_timeout and max_attempts, its defaults when absent."""
        s3 = self.config.require_s3()
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
        return RetryPolicy(
            attempts=r.attempts,
            base_delay=r.base_delay,
            max_delay=r.max_delay,
            on_retry=self.process_metrics.retried,
        )

    @cached_property
    def process_metrics(self) -> ProcessMetrics:
        """This process's retries and bandwidth waits; the API's /metrics serves them."""
        return ProcessMetrics(
            lambda: self.bandwidth_bucket.waited if self.bandwidth_bucket else 0.0
        )

    @cached_property
    def bandwidth_schedule(self) -> RateSchedule:
        d = self.config.daemon
        return RateSchedule(
            d.bandwidth_limit,
            tuple(
                Window(parse_hhmm(w.start), parse_hhmm(w.end), w.limit) for w in d.bandwidth_windows
            ),
        )

    @cached_property
    def bandwidth_bucket(self) -> TokenBucket | None:
        """The upload limit's token bucket, None when uploads are unlimited."""
        schedule = self.bandwidth_schedule
        return None if schedule.unlimited else TokenBucket(schedule)

    @cached_property
    def store_metrics(self) -> StoreMetrics:
        """This process's object-store metrics; the API's /metrics serves them."""
        return StoreMetrics()

    @cached_property
    def store_objects(self) -> ObjectStore:
        """The object store the replica store writes through: S3 wrapped by
        `wrap_object_store` (retry, bandwidth limit, metrics)."""
        return wrap_object_store(
            self.objects,
            self.retry_policy,
            self.bandwidth_schedule,
            self.store_metrics,
            bucket=self.bandwidth_bucket,
        )

    @cached_property
    def kms_provider(self) -> KmsKeyProvider:
        """[store] kms_key_id: region, endpoint and trust default to those of [s3]."""
        st, s3 = self.config.store, self.config.s3
        assert st.kms_key_id is not None
        secret = self.config.s3_secret_key()
        if secret is not None:
            register_secret(secret)
        if st.kms_endpoint_url is not None or s3 is None:
            endpoint_url, ca_file = st.kms_endpoint_url, st.kms_ca_file
        else:
            endpoint_url, ca_file = s3.endpoint_url, st.kms_ca_file or s3.ca_file
        region = st.kms_region or (s3.region if s3 is not None else None)
        assert region is not None  # the config's validation: a local store names kms_region
        return KmsKeyProvider(
            st.kms_key_id,
            region=region,
            endpoint_url=endpoint_url,
            ca_file=ca_file,
            access_key_id=Secret(s3.access_key_id) if s3 and s3.access_key_id else None,
            secret_access_key=secret,
            use_fips_endpoint=s3.use_fips_endpoint if s3 is not None else False,
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
        return Repository.open(
            self.store_objects,
            self.key_provider(create),
            create=create,
            zstd_level=self.config.pipeline.zstd_level,
        )

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
            pack_size=self.config.pipeline.pack_size,
            workers=self.config.pipeline.workers,
            reads_in_flight=self.config.pipeline.reads_in_flight,
            uploads_in_flight=self.config.pipeline.uploads_in_flight,
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
            lander=self.lander,
        )
        if reporter is not None:
            ctx.reporter = reporter
        if stop_reason is not None:
            ctx.stop_reason = stop_reason
        return ctx

    # -- landing in AWS ---------------------------------------------------------------

    @cached_property
    def landings(self) -> SqlLandings:
        return SqlLandings(self.state.db)

    @cached_property
    def lander(self) -> Lander:
        """The land stage's ports: landings, a snapshot target per job setting, and the
        release of staging data in temporary mode."""
        cfg = self.config.landing
        return Lander(
            landings=self.landings,
            target=self.snapshot_target,
            spec_for=self.landing_spec,
            settings=LandSettings(
                concurrency=cfg.concurrency,
                snapshot_timeout_minutes=cfg.snapshot_timeout_minutes,
                wait_timeout=cfg.wait_timeout,
                ena_support=cfg.ena_support,
            ),
            release_staging=self.release_staging,
        )

    def landing_spec(self, server_id: str) -> LandingSpec:
        """The landing settings of the server's job, else the [landing] defaults."""
        job = self.jobs.for_server(server_id)
        spec = job.landing_spec if job is not None else None
        if spec is not None:
            return spec
        return self.default_landing_spec()

    def landing_enabled(self) -> bool:
        """Whether any run may be landed: [landing] mode, or a job of its own."""
        if self.config.landing.mode != "never":
            return True
        return any(
            (job.landing_spec is not None and job.landing_spec.mode != "never")
            for job in self.jobs.all()
        )

    def landing_probe(self) -> dict[str, str]:
        """The landing permissions of the [landing] credentials (`connector check`)."""
        target = self._ebs_target(self.default_landing_spec().role_name)
        try:
            return target.probe_permissions()
        finally:
            target.close()

    def _ebs_target(self, role_name: str | None, **limits: Any) -> EbsTarget:
        """A new EBS and EC2 client of [landing] (defaults: [s3]'s region, endpoint, trust
        and keys), as `role_name` when given; `limits` as EbsTarget takes them."""
        cfg, s3 = self.config.landing, self.config.require_s3()
        secret = self.config.s3_secret_key()
        if secret is not None:
            register_secret(secret)
        own_endpoint = cfg.endpoint_url is not None
        return EbsTarget(
            region=cfg.region or s3.region,
            endpoint_url=cfg.endpoint_url if own_endpoint else s3.endpoint_url,
            ca_file=cfg.ca_file if own_endpoint else (cfg.ca_file or s3.ca_file),
            access_key_id=Secret(s3.access_key_id) if s3.access_key_id else None,
            secret_access_key=secret,
            role_name=role_name,
            use_fips_endpoint=s3.use_fips_endpoint,
            proxy=self.proxy,
            **limits,
        )

    def default_landing_spec(self) -> LandingSpec:
        cfg = self.config.landing
        return LandingSpec(
            mode=cfg.mode,
            license_type=cfg.license_type,
            encrypted=cfg.encrypted,
            kms_key_id=cfg.kms_key_id,
            role_name=cfg.role_name,
            keep_amis=cfg.keep_amis,
            staging=cfg.staging,
        )

    def snapshot_target(self, spec: LandingSpec) -> SnapshotTarget:
        """EBS and EC2 of [landing] (defaults: [s3]'s region, endpoint, trust and keys),
        as the job's role when it names one; retried and under the upload limit."""
        concurrency = self.config.landing.concurrency
        target: SnapshotTarget = self._ebs_target(
            spec.role_name, max_pool_connections=max(10, concurrency * 2)
        )
        if self.bandwidth_bucket is not None:  # one limit for uploads to S3 and to EBS
            target = BandwidthLimitedTarget(target, self.bandwidth_bucket)
        return RetryingTarget(target, self.retry_policy)

    def release_staging(self, server_id: str, run_id: str) -> None:
        """Temporary staging: once `run_id` is landed, the server's earlier runs leave
        the store, and with them every pack no remaining run uses (purge's rules). The
        landed run stays: the next incremental builds on it."""
        repo = self.repository()
        committed = sorted(repo.committed_runs(server_id))
        keep = len([r for r in committed if r >= run_id])
        if keep == 0:
            return
        self.retention.apply(server_id, keep)

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
        """Check access to the store (S3 or the directory), then open (or create) the
        replica store for writing.

        The check is retried like every other request to the store: a transient
        error (a reset, a 5xx) does not fail a run before its snapshot.
        """
        self.retry_policy.call(
            self.objects.check_access,
            "checking access to S3"
            if self.config.s3 is not None
            else "checking access to the replica store directory",
            retryable=(TransientError,),
        )
        return self.repository(create=True)

    # -- use cases -------------------------------------------------------------------------

    @cached_property
    def servers(self) -> Servers:
        return Servers(self.state, self.hypervisor)

    @cached_property
    def job_actions(self) -> JobActions:
        """Jobs as users manage them (`connector jobs` and the API): checked and audited."""

        def enqueue(run_id: str) -> None:
            queue = self.run_queue()
            try:
                queue.enqueue(run_id, 0)
            finally:
                queue.close()

        return JobActions(
            jobs=self.jobs,
            catalog=self.state,
            controls=self.ledger,
            resolve_vm=self.servers.resolve,
            enqueue=enqueue,
            audit=self.audit,
            settings=JobSettings(
                on_demand_quota=self.config.daemon.on_demand_quota_per_24h,
                schedule_unit_seconds=self.config.daemon.schedule_unit_seconds,
            ),
            retention=self.retention,
            retention_settings=self.state,
        )

    @cached_property
    def retention(self) -> Retention:
        return Retention(
            open_repo=self.repository,
            state=self.state,
            default_keep=self.config.retention.keep,
            stale_lock_age=dt.timedelta(hours=self.config.retention.stale_lock_hours),
            guard_path=self.config.state.path.parent / "purge.lock",
            shared_guard=lambda: self.database.session_lock("purge"),
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

        store = self.replica_objects(
            connect_timeout=PROBE_TIMEOUT, read_timeout=PROBE_TIMEOUT, max_attempts=1
        )

        def probe_s3() -> None:
            try:
                store.check_access()
            finally:
                store.close()

        s3 = self.config.s3
        if s3 is None:
            s3_target = f"the directory {store.endpoint_url}"
        else:
            bucket = f"s3://{s3.bucket}/{s3.prefix.strip('/')}".rstrip("/")
            s3_target = f"{bucket} at {store.endpoint_url}"
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
                s3_target=s3_target,
                store_name="S3" if s3 is not None else "replica store",
            ),
        )

    # -- the API and the daemon ------------------------------------------------------------

    def api_server(self, loops: Callable[[], str] | None = None) -> ApiServer:
        """The API of the [api] section, bound to its address but not yet serving.

        `loops` is the daemon's check of its own loops (`Daemon.loops`) when the API
        runs inside it; without it (`connector api`), readiness asks whether a
        `connector run` holds the state lock."""
        cfg = self.config.api
        if cfg is None:
            raise ConfigError(
                "the API is not configured: add an [api] section with listen, cert_file, "
                "key_file and token_file (see docs/api.md)"
            )
        token = self.config.api_token()
        ctx = server_context(cfg.cert_file, resolve_secret_path(cfg.key_file, "API private key"))
        registry = CollectorRegistry()
        registry.register(StateCollector(_MetricsState(self.state, self.ledger), self.queue_depth))
        services = ApiServices(
            jobs=self.job_actions,
            catalog=self.state,
            runs=self.state,
            status=lambda: self.status.report(dt.timedelta(hours=STUCK_RUN_HOURS)),
            readiness=Readiness(
                self._readiness_checks(cfg.ready_timeout_seconds, loops),
                ttl=cfg.ready_cache_seconds,
            ),
            registry=registry,
            fleet=self.fleet_report if self.config.fleet is not None else None,
        )
        return ApiServer(
            cfg.host,
            cfg.port,
            ctx,
            token,
            services,
            collectors=(self.store_metrics, self.process_metrics),
        )

    def fleet_report(self) -> FleetStatus:
        """The fleet's status for the API; a TransientError (503) that names the database
        (never its password) while it does not answer."""
        fleet = self.config.fleet
        assert fleet is not None
        try:
            return fleet_status(self.fleet)
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            reason = scrub(str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc))
            raise TransientError(
                f"the fleet database {fleet.redacted_url()} does not answer: {reason}; the "
                "members go on when it is back: check that PostgreSQL runs there"
            ) from None

    def queue_depth(self) -> int:
        """Tasks waiting in the run queue."""
        queue = self.run_queue()
        try:
            return queue.pending()
        finally:
            queue.close()

    def _readiness_checks(
        self, timeout: float, loops: Callable[[], str] | None
    ) -> dict[str, Callable[[], str]]:
        """/readyz: vCenter (a login), S3 (HeadBucket), the queue, the daemon's loops."""
        checks: dict[str, Callable[[], str]] = {}
        if self.config.vcenter is not None and self.config.transport.kind in (
            "datastore-https",
            "vddk",
        ):
            client = self.vsphere_client(timeout=timeout)

            def vcenter() -> str:
                try:
                    client.session_generation()  # connects and logs in
                finally:
                    client.close()
                return f"logged in to {client.url}"

            checks["vcenter"] = vcenter
        s3_cfg = self.config.s3
        if s3_cfg is None:  # [store] kind = "local": the directory must answer instead
            directory = self.objects

            def store_dir() -> str:
                directory.check_access()
                return f"replica store directory {self.config.store.path} is writable"

            checks["store"] = store_dir
        else:
            store = self.s3_store(connect_timeout=timeout, read_timeout=timeout, max_attempts=1)
            bucket = s3_cfg.bucket

            def s3() -> str:
                store.check_access()
                return f"bucket {bucket} answers"

            checks["s3"] = s3
        checks["queue"] = lambda: f"{self.queue_depth()} task(s) waiting"
        if loops is not None:
            checks["daemon"] = loops
        else:
            lock = StateLock(self.config.state.path, "status")

            def daemon() -> str:
                holder = lock.holder()
                if holder is None or not holder.endswith("connector run"):
                    raise PermanentError(
                        "the daemon (`connector run`) is not running: start it "
                        "(systemctl start connector)"
                    )
                return f"held by {holder}"

            checks["daemon"] = daemon
        return checks

    def daemon(self, api: ApiServer | None = None) -> Daemon:
        """The long-running connector: a job's retention removes old runs and their packs.

        With an [api] section and no `api` given, the HTTPS API is served while it runs,
        and its /readyz checks the daemon's loops.
        """
        daemon = Daemon(
            self.config.daemon,
            StateLock(self.config.state.path, "run"),
            self._daemon_parts,
            api=api,
        )
        if api is None and self.config.api is not None:
            daemon.api = self.api_server(loops=daemon.loops)
        return daemon

    def _daemon_parts(self, stopping: threading.Event) -> DaemonParts:
        cfg = self.config.daemon
        fleet_cfg = self.config.fleet
        queue = self.run_queue()
        reporter = LedgerReporter(self.ledger)
        duty_box: list[FleetDuty] = []

        def should_stop() -> bool:
            return stopping.is_set() or (bool(duty_box) and duty_box[0].fenced)

        pipeline = RunPipeline(self.stage_context(reporter, should_stop))
        executor = RunExecutor(
            pipeline=pipeline,
            hv=self.hypervisor,
            state=self.state,
            ledger=self.ledger,
            jobs=self.jobs,
            queue=queue,
            limits=RunLimits(
                max_concurrent_runs=fleet_cfg.max_concurrent_runs
                if fleet_cfg is not None
                else cfg.max_concurrent_runs,
                max_runs_per_host=cfg.max_runs_per_host,
                failures_before_pause=cfg.failures_before_pause,
                stage_retries=cfg.stage_retries,
                retry_backoff=cfg.retry_backoff,
                retry_backoff_max=cfg.retry_backoff_max,
                admission_interval=cfg.admission_interval,
                retention_retry_backoff=cfg.retention_retry_backoff,
            ),
            retention=self.retention.apply_policy,
            stopping=stopping,
            on_run_end=reporter.forget,
            claims=self.fleet,
            transient_faults=(sa_exc.OperationalError, sa_exc.InterfaceError),
        )
        duty: FleetDuty | None = None
        if fleet_cfg is not None:
            self.fleet.register(__version__, self.capabilities())
            duty = FleetDuty(
                self.fleet,
                self.ledger,
                queue,
                self.objects,
                executing=lambda: set(executor.executing),
                heartbeat_interval=fleet_cfg.heartbeat_interval,
                run_state=lambda run_id: self.state.run(run_id).state,
            )
            duty_box.append(duty)

        def recover_all() -> RecoveryReport:
            if duty is not None:
                # Only this member's own runs (of its last life) and the orphans of
                # dead members: the other members' runs are theirs.
                report = RecoveryReport()
                report.resumed.extend(duty.take_over())
                sweep_leftovers(report)
                return report
            return recover(
                self.state,
                self.ledger,
                queue,
                self.hypervisor,
                self.objects,
                cfg.resume_within,
                release_lock=pipeline.release_lock,
            )

        def sweep_leftovers(report: RecoveryReport | None = None) -> RecoveryReport:
            return sweep(
                self.state,
                self.ledger,
                self.hypervisor,
                self.objects,
                report,
                release_lock=pipeline.release_lock,
                stale_upload_age=dt.timedelta(seconds=cfg.stale_upload_age),
                others_uploads=self.fleet if duty is not None else None,
            )

        return DaemonParts(
            queue=queue,
            executor=executor,
            jobs=self.jobs,
            discovery=Discovery(self.discovery_hypervisor, self.state),
            recover=recover_all,
            sweep=sweep_leftovers,
            fleet=duty,
            leave=self.fleet.leave if duty is not None else (lambda: None),
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


def database_connect_args(config: Config) -> dict[str, Any]:
    """How psycopg reaches [fleet]'s server: the password (from its file, credential or
    environment variable, never the URL) and, for a server not on this machine, TLS
    with the server's name verified against its certificate."""
    fleet = config.fleet
    assert fleet is not None
    args: dict[str, Any] = {
        "connect_timeout": max(1, round(fleet.connect_timeout)),
        "application_name": "connector",
    }
    password = config.database_password()
    if password is not None:
        register_secret(password)
        args["password"] = password.reveal()
    if not fleet.is_local:
        args["sslmode"] = "verify-full"
        args["sslrootcert"] = str(fleet.ca_file) if fleet.ca_file is not None else "system"
    elif fleet.ca_file is not None:
        args["sslmode"] = "verify-full"
        args["sslrootcert"] = str(fleet.ca_file)
    return args


def fleet_database(config: Config) -> Database:
    """[fleet]'s PostgreSQL, its schema migrated; a ConfigError or a TransientError that
    says what failed (never with the password) when it cannot be opened."""
    fleet = config.fleet
    assert fleet is not None
    args = database_connect_args(config)
    try:
        return Database(fleet.database_url, connect_args=args)
    except sa_exc.OperationalError as exc:
        reason = scrub(str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc))
        if "password" in reason.lower() or "authentication" in reason.lower():
            raise ConfigError(
                f"the fleet database {fleet.redacted_url()} refused the login: {reason}; "
                "check [fleet] password_file (or password_env) and the user in database_url"
            ) from None
        if "certificate" in reason.lower() or "ssl" in reason.lower():
            raise ConfigError(
                f"TLS to the fleet database {fleet.redacted_url()} failed: {reason}; give "
                "the CA of the server's certificate in [fleet] ca_file"
            ) from None
        raise TransientError(
            f"the fleet database {fleet.redacted_url()} cannot be reached: {reason}; "
            "check that PostgreSQL runs there and that this machine may connect"
        ) from None


def wrap_object_store(
    store: ObjectStore,
    retry: RetryPolicy,
    bandwidth: RateSchedule,
    metrics: StoreMetrics | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    bucket: TokenBucket | None = None,
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
    `sleep` is the retry's pause (tests pass their own); `bucket` the limiter's token
    bucket (made from `bandwidth` when not given), shared with landing's
    PutSnapshotBlock, so its waits can be measured.
    """
    wrapped = store
    if metrics is not None:
        wrapped = MeteredStore(wrapped, metrics)
    if not bandwidth.unlimited:
        wrapped = BandwidthLimitedStore(wrapped, bucket or TokenBucket(bandwidth))
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
                guest_id=vm.guest_id,
                firmware=vm.firmware,
            )
        )
    return specs
