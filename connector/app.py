"""The composition root: builds every adapter and service from one Config."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from connector.adapters.datastore_reader import DatastoreHttpsSource
from connector.adapters.jobstore import JobStore
from connector.adapters.ledger import RunLedger
from connector.adapters.s3 import S3ObjectStore
from connector.adapters.state import ServerRow, StateStore
from connector.adapters.vsphere import VSphereClient
from connector.config import Config
from connector.decorators.bandwidth import (
    BandwidthLimitedStore,
    RateSchedule,
    TokenBucket,
    Window,
    parse_hhmm,
)
from connector.errors import ConfigError, NotFoundError
from connector.logging import register_secret
from connector.pipeline.replicate import ReplicationSettings, Replicator, Reporter
from connector.pipeline.stages import PipelineSettings
from connector.ports import ObjectStore
from connector.secrets import Secret
from connector.store.keys import LocalKeyProvider, generate_key_file
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
    def vsphere(self) -> VSphereClient:
        return self.vsphere_client()

    def vsphere_client(self) -> VSphereClient:
        """A new vCenter client with its own session (the daemon's discovery uses one)."""
        vc = self.config.vcenter
        password = self.config.vcenter_password()
        register_secret(password)
        return VSphereClient(
            url=vc.url,
            user=vc.user,
            password=password,
            ca_file=vc.ca_file,
            thumbprint=vc.thumbprint,
        )

    @cached_property
    def objects(self) -> S3ObjectStore:
        s3 = self.config.s3
        secret = self.config.s3_secret_key()
        if secret is not None:
            register_secret(secret)
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
        )

    @cached_property
    def store_objects(self) -> ObjectStore:
        """The object store the replica store writes through: S3, under the bandwidth limit."""
        d = self.config.daemon
        schedule = RateSchedule(
            d.bandwidth_limit,
            tuple(
                Window(parse_hhmm(w.start), parse_hhmm(w.end), w.limit) for w in d.bandwidth_windows
            ),
        )
        if schedule.unlimited:
            return self.objects
        return BandwidthLimitedStore(self.objects, TokenBucket(schedule))

    def key_provider(self, create: bool) -> LocalKeyProvider:
        path = self.config.key_file
        if create and not path.exists():
            if self.objects.stat("config") is not None:
                raise ConfigError(
                    f"the store key file {path} is missing but the bucket already holds a "
                    "replica store; restore the key file from your backup"
                )
            generate_key_file(path)
        return LocalKeyProvider(path)

    def repository(self, create: bool = False) -> Repository:
        return Repository.open(self.store_objects, self.key_provider(create), create=create)

    def disk_source(self) -> DatastoreHttpsSource:
        return DatastoreHttpsSource(self.vsphere, max_request=self.config.transport.max_request)

    def pipeline_settings(self) -> PipelineSettings:
        return PipelineSettings(
            enable_cbt=self.config.vcenter.enable_cbt,
            max_read=self.config.transport.max_request,
            max_disks_per_vm=self.config.daemon.max_disks_per_vm,
        )

    def replicator(self, reporter: Reporter | None = None) -> Replicator:
        source = self.disk_source()
        settings = ReplicationSettings(
            enable_cbt=self.config.vcenter.enable_cbt,
            max_read=self.config.transport.max_request,
        )
        rep = Replicator(
            hv=self.vsphere,
            source=source,
            open_repo=self._open_for_write,
            state=self.state,
            settings=settings,
            ledger=self.ledger,
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
        """The long-running connector, with the default retention."""
        from connector.daemon.retention import keep_recent_runs
        from connector.daemon.service import Daemon

        return Daemon(self, retention=keep_recent_runs(self.state, self.jobs), api=api)

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
        vms = self.vsphere.list_vms()
        rows = [self.state.upsert_server(vm) for vm in vms]
        self.state.mark_removed({vm.uuid for vm in vms})
        return rows

    def close(self) -> None:
        if "vsphere" in self.__dict__:
            self.vsphere.close()
        if "state" in self.__dict__:
            self.state.close()


@contextmanager
def build(config: Config) -> Iterator[App]:
    app = App(config)
    try:
        yield app
    finally:
        app.close()
