"""Rebuilding the state database from the replica store (`connector state rebuild`).

The bucket is the source of truth; the state database is a cache of it. The
store names each server (a sealed server record: its id, the VM's instance
UUID and name), holds each committed run (its commit record, with the
per-disk results) and each disk's manifest (capacity, changeId, chain). From
those this use case puts back into the state:

- the catalog: every server under its original id, keyed by the VM's
  instance UUID, so that object keys keep matching and discovery refreshes the
  server instead of adding a new one;
- the runs: every committed run, COMPLETED, with its per-disk results;
- the disks' CBT state: for each disk, the manifest of its last committed run
  (disk uuid, capacity, changeId, chain length), so that the next run is
  incremental where vCenter still accepts that changeId;
- the block index: the blocks of each disk's last committed run, so that the
  next run deduplicates against them.

It reads everything it needs before it writes anything: a key that does not
open the store changes nothing. It only adds: a server, run or disk state the
database has already is kept (a disk's state is replaced only by that of a
later run). A run whose objects cannot be read is skipped and reported.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from connector.domain.jobs import RUN_COMPLETED
from connector.domain.manifest import DiskManifest
from connector.domain.records import DiskResult, DiskStateRow, RunRow
from connector.domain.times import parse, stamp
from connector.errors import ConnectorError, StoreFormatError
from connector.logging import get_logger
from connector.ports import BlockIndex, Catalog, DiskStates, Runs
from connector.store.repository import Repository, ServerRecord, manifest_key

log = get_logger(__name__)

# The instance UUID given to a server whose store has no server record (written by a
# connector older than the record): it is listed under its server id.
UNNAMED_PREFIX = "unknown:"
UNKNOWN_TYPE = "UNKNOWN"  # the run type of a commit record that does not say it
DONE_STAGE = "done"


@dataclass
class RebuildReport:
    """What a rebuild found in the store and added to the state database."""

    servers: int = 0  # servers in the store
    servers_added: int = 0
    unnamed: list[str] = field(default_factory=list)  # server ids without a server record
    runs: int = 0  # committed runs read from the store
    runs_added: int = 0
    disks: int = 0  # disk states set
    blocks: int = 0  # blocks put into the dedup index
    faults: list[str] = field(default_factory=list)  # what could not be read or added


@dataclass
class _Server:
    record: ServerRecord | None
    runs: list[RunRow] = field(default_factory=list)
    # disk key -> the manifest of the disk's last committed run, and its chain length
    last: dict[int, tuple[DiskManifest, int]] = field(default_factory=dict)


@dataclass
class StateRebuild:
    """The state database rebuilt from the replica store, over the state ports."""

    open_repo: Callable[[], Repository]
    store_exists: Callable[[], bool]
    catalog: Catalog
    disks: DiskStates
    runs: Runs
    blocks: BlockIndex

    def state_is_empty(self) -> bool:
        """No server and no run: a new or a lost state database."""
        return not self.catalog.servers() and not self.runs.runs()

    def needed(self) -> bool:
        """The state database is empty and the bucket holds a store: rebuild it."""
        return self.state_is_empty() and self.store_exists()

    def rebuild(self, repo: Repository | None = None) -> RebuildReport:
        """Add to the state database what the store holds and the database lacks.

        `repo`: the store, opened already (else it is opened first, before the state
        is read or written: a key that does not open it changes nothing).
        """
        if repo is None:
            repo = self.open_repo()
        report = RebuildReport()
        servers = self._read(repo, report)
        report.servers = len(servers)
        for server_id, found in sorted(servers.items()):
            self._write(repo, server_id, found, report)
        log.info(
            "state rebuilt from the replica store",
            servers=report.servers_added,
            runs=report.runs_added,
            disks=report.disks,
            faults=len(report.faults),
        )
        return report

    # -- reading the store -------------------------------------------------------------

    def _read(self, repo: Repository, report: RebuildReport) -> dict[str, _Server]:
        servers: dict[str, _Server] = {}
        for server_id in repo.server_ids():
            try:
                servers[server_id] = _Server(repo.read_server(server_id))
            except ConnectorError as exc:
                report.faults.append(f"server {server_id}: {exc}")
        for server_id, runs in sorted(repo.scan_runs().items()):
            found = servers.setdefault(server_id, _Server(None))
            if found.record is None:
                report.unnamed.append(server_id)
            chains: dict[tuple[str, int], int] = {}
            for run_id in sorted(r for r, objs in runs.items() if objs.commit):
                try:
                    run, manifests = _read_run(repo, server_id, run_id, chains)
                except ConnectorError as exc:
                    report.faults.append(f"run {run_id} of server {server_id}: {exc}")
                    continue
                found.runs.append(run)
                chain = {d.disk_key: d.chain for d in run.disks}
                for key, manifest in manifests.items():  # runs in time order: the last wins
                    found.last[key] = (manifest, chain[key])
                report.runs += 1
        return servers

    # -- writing the state ---------------------------------------------------------------

    def _write(
        self, repo: Repository, server_id: str, found: _Server, report: RebuildReport
    ) -> None:
        rec = found.record
        vm_uuid = rec.vm_uuid if rec is not None else UNNAMED_PREFIX + server_id
        name = rec.name if rec is not None else server_id
        known = {s.id for s in self.catalog.servers()}
        try:
            self.catalog.add_server(server_id, vm_uuid, name)
        except ValueError as exc:
            report.faults.append(
                f"server {server_id} ({len(found.runs)} runs) was not added: {exc}; "
                "move the state database aside and rebuild it"
            )
            return
        report.servers_added += server_id not in known
        for run in found.runs:
            report.runs_added += self.runs.import_run(run)
        for disk_key, (manifest, chain) in sorted(found.last.items()):
            have = self.disks.disk_state(server_id, disk_key)
            if have is not None and have.last_run_id >= manifest.run_id:
                continue
            self.disks.put_disk_state(
                DiskStateRow(
                    server_id=server_id,
                    disk_key=disk_key,
                    disk_uuid=manifest.disk_uuid,
                    capacity=manifest.capacity,
                    change_id=manifest.change_id,
                    last_run_id=manifest.run_id,
                    chain_length=chain,
                )
            )
            report.disks += 1
            try:
                refs = [r for r in repo.resolve_map(manifest).values() if r is not None]
            except ConnectorError as exc:
                report.faults.append(
                    f"the block map of disk {disk_key} of run {manifest.run_id} "
                    f"(server {server_id}) did not resolve: {exc}"
                )
                continue
            self.blocks.add(refs)
            report.blocks += len(refs)


def _read_run(
    repo: Repository, server_id: str, run_id: str, chains: dict[tuple[str, int], int]
) -> tuple[RunRow, dict[int, DiskManifest]]:
    """A committed run as the state database keeps it, and its disks' manifests."""
    commit = repo.read_commit(server_id, run_id)
    manifests: dict[int, DiskManifest] = {}
    results: list[DiskResult] = []
    for disk in sorted(commit.get("disks", []), key=lambda d: int(d["disk_key"])):
        key = int(disk["disk_key"])
        manifest = repo.read_manifest(server_id, run_id, key)
        manifests[key] = manifest
        results.append(_disk_result(repo, manifest, disk.get("result"), chains))
    created = str(commit.get("created_at") or "")
    run = RunRow(
        id=run_id,
        server_id=server_id,
        type=str(commit.get("type") or UNKNOWN_TYPE),
        state=RUN_COMPLETED,
        stage=DONE_STAGE,
        started_at=str(commit.get("started_at") or _run_id_time(run_id)),
        finished_at=stamp(parse(created)) if created else None,
        error=None,
        snapshot_name=(commit.get("snapshot") or {}).get("name"),
        snapshot_ref=(commit.get("snapshot") or {}).get("ref"),
        stats=dict(commit.get("stats") or {}),
        disks=results,
    )
    return run, manifests


def _disk_result(
    repo: Repository,
    manifest: DiskManifest,
    recorded: dict[str, Any] | None,
    chains: dict[tuple[str, int], int],
) -> DiskResult:
    """The disk's result as its commit record keeps it, or, in a commit written before
    it kept one, as far as the manifest tells it (mode, reason, changeId, chain)."""
    if recorded is not None:
        result = DiskResult.from_json(recorded)
    else:
        stats = manifest.stats
        result = DiskResult(
            disk_key=manifest.disk_key,
            mode=str(stats.get("mode") or "unknown"),
            reason=stats.get("reason"),
            capacity=manifest.capacity,
            change_id_from=None,
            change_id_to=manifest.change_id,
            disk_uuid=manifest.disk_uuid,
            chain=_chain(repo, manifest, chains),
            merkle_root=manifest.merkle_root.hex(),
            manifest_key=manifest_key(manifest.server_id, manifest.run_id, manifest.disk_key),
        )
    chains[(manifest.run_id, manifest.disk_key)] = result.chain
    return result


def _chain(repo: Repository, manifest: DiskManifest, chains: dict[tuple[str, int], int]) -> int:
    """Change manifests since the last full one, following `base_run`."""
    path: list[str] = []
    m = manifest
    while m.base_run is not None and (m.base_run, m.disk_key) not in chains:
        if m.base_run in path or len(path) > 1000:
            raise StoreFormatError(f"the manifest chain of disk {m.disk_key} loops")
        path.append(m.base_run)
        m = repo.read_manifest(m.server_id, m.base_run, m.disk_key)
    n = 0 if m.base_run is None else chains[(m.base_run, m.disk_key)] + 1
    for run_id in reversed(path):
        chains[(run_id, manifest.disk_key)] = n
        n += 1
    return n


def _run_id_time(run_id: str) -> str:
    """The start time a run id carries (r-YYYYMMDDTHHMMSSmmmZ-...), as a state timestamp."""
    try:
        when = dt.datetime.strptime(run_id.split("-")[1], "%Y%m%dT%H%M%S%fZ")
    except (IndexError, ValueError):
        return stamp(dt.datetime(1970, 1, 1, tzinfo=dt.UTC))
    return stamp(when.replace(tzinfo=dt.UTC))
