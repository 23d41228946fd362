"""Retention and purge: delete the runs a policy no longer keeps, then the packs nobody needs.

Retention (`apply_retention`) works on one server: it keeps the N most recent
committed runs (N = 0 keeps all) and deletes the others' commit objects first,
so they stop existing, then their disk manifests. A manifest that a kept run's
chain resolves through stays (reported as a base "needed by" that run) until a
later full manifest makes it unnecessary. The commit of a run that the next run
of a disk will build on (the disk's last run in the state store, or a base named
by a lock of a run in flight) is never deleted.

Packs are shared across runs and servers (deduplication), so their garbage
collection (`collect_garbage`) is store-wide and in two phases, safe against
runs in flight (docs/format.md, "Purge"):

1. Condemn: the packs that the resolved maps of no committed run reference are
   removed from the dedup index (no new run can dedup against them any more),
   then the locks of runs in flight are listed, then `condemned/<purge id>` is
   written with those packs, that time T and those locks.
2. Delete: once every lock listed at T is gone, the committed runs are read
   again; a condemned pack that a run now references (a run in flight at T that
   deduplicated against it and then committed) is kept and its blocks return to
   the index; the others are deleted, then the record.

Phase 2 runs in the same invocation when no run was in flight at T, otherwise
in a later purge.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from connector.domain.jobs import RUN_ACTIVE
from connector.domain.manifest import BlockMap, DiskManifest, apply_changes
from connector.domain.times import compact, stamp
from connector.errors import ConnectorError, IntegrityError, NotFoundError, PermanentError
from connector.logging import get_logger
from connector.ports import BlockStore, DiskStates, RetentionSettings, Runs
from connector.store.repository import (
    CondemnedRecord,
    Repository,
    RunLock,
    RunObjects,
    commit_key,
    pack_key,
)

log = get_logger(__name__)

DEFAULT_STALE_LOCK_AGE = dt.timedelta(hours=24)

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class PurgeState(DiskStates, Runs, BlockStore, RetentionSettings, Protocol):
    """What retention and purge read and change of the connector's state."""


@dataclass
class RetentionResult:
    server_id: str
    keep: int
    kept: list[str] = field(default_factory=list)  # committed runs kept
    deleted: list[str] = field(default_factory=list)  # runs whose commit is deleted
    protected: dict[str, str] = field(default_factory=dict)  # run kept beyond N -> why
    bases: dict[str, list[str]] = field(default_factory=dict)  # base run -> runs needing it
    manifests_deleted: int = 0
    dry_run: bool = False


@dataclass
class LockInfo:
    run_id: str
    server_id: str | None
    started_at: str | None
    host: str | None
    pid: int | None
    stale: str | None  # why the lock looks stale; None: the run may be alive
    removed: bool = False


@dataclass
class PendingPurge:
    purge_id: str
    created_at: str
    packs: int
    waiting_for: list[str]  # runs in flight at that time, still holding their lock


@dataclass
class GcResult:
    dry_run: bool = False
    condemned: list[str] = field(default_factory=list)  # packs condemned by this purge
    deleted: list[str] = field(default_factory=list)  # packs deleted (dry run: would be)
    bytes_freed: int = 0
    restored: list[str] = field(default_factory=list)  # condemned packs a run came to use
    pending: list[PendingPurge] = field(default_factory=list)
    locks: list[LockInfo] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)


@dataclass
class PurgeReport:
    retention: list[RetentionResult]
    gc: GcResult


@dataclass
class PurgeSettings:
    stale_lock_age: dt.timedelta = DEFAULT_STALE_LOCK_AGE
    break_stale_locks: bool = False
    dry_run: bool = False
    clock: Clock = utcnow


# --------------------------------------------------------------------------- retention


def apply_retention(
    repo: Repository,
    state: PurgeState,
    server_id: str,
    keep: int,
    dry_run: bool = False,
) -> RetentionResult:
    """Keep the `keep` most recent committed runs of a server (0 keeps all); delete the rest.

    Also deletes the manifests of runs that never committed and are no longer in
    flight (a failed or killed run) unless a kept run's chain needs them.
    """
    if keep < 0:
        raise PermanentError(f"retention must keep 0 or more runs, not {keep}")
    result = RetentionResult(server_id=server_id, keep=keep, dry_run=dry_run)
    runs = repo.scan_runs(server_id).get(server_id, {})
    locks, _bad = _read_locks(repo)
    committed = sorted(r for r, objs in runs.items() if objs.commit)
    keep_set = set(committed if keep == 0 else committed[-keep:])
    protected: dict[str, str] = {}
    for row in state.disk_states(server_id):
        protected.setdefault(row.last_run_id, f"the next run of disk {row.disk_key} builds on it")
    for lock in locks:
        if lock.server_id == server_id:
            for base in lock.base_runs:
                protected.setdefault(base, f"run {lock.run_id}, in flight, builds on it")
    retained = keep_set | (set(protected) & set(committed))
    result.protected = {r: why for r, why in protected.items() if r in retained - keep_set}
    result.kept = [r for r in committed if r in retained]
    result.deleted = [r for r in committed if r not in retained]
    needed = _chain_bases(repo, server_id, runs, retained)
    in_flight = {lock.run_id for lock in locks}
    doomed: list[tuple[str, int]] = []
    for run_id, objs in sorted(runs.items()):
        if run_id in retained or run_id in in_flight:
            continue
        for disk_key in objs.disks:
            if (run_id, disk_key) not in needed:
                doomed.append((run_id, disk_key))
    result.bases = {
        run_id: sorted(needers)
        for (run_id, _disk), needers in sorted(needed.items())
        if run_id not in retained
    }
    # Manifests of runs that never committed may belong to a run that is writing them
    # now: only a run that holds no lock any more and has no commit is over.
    live = set(repo.lock_ids())
    uncommitted = {r for r, _ in doomed if not runs[r].commit}
    over = {
        r
        for r in uncommitted
        if r not in live and repo.objects.stat(commit_key(server_id, r)) is None
    }
    doomed = [(r, d) for r, d in doomed if runs[r].commit or r in over]
    result.manifests_deleted = len(doomed)
    if dry_run:
        return result
    for run_id in result.deleted:  # the commit first: the run stops existing
        repo.delete_commit(server_id, run_id)
    for run_id, disk_key in doomed:
        repo.delete_manifest(server_id, run_id, disk_key)
    state.mark_runs_deleted(set(result.deleted))
    if result.deleted or doomed:
        log.info(
            "retention applied",
            server=server_id,
            keep=keep,
            runs_deleted=len(result.deleted),
            manifests_deleted=len(doomed),
        )
    return result


def remove_server(
    repo: Repository, state: PurgeState, server_id: str, dry_run: bool = False
) -> RetentionResult:
    """Delete every run of a server (a VM or job that is gone); its packs go at the next GC."""
    result = RetentionResult(server_id=server_id, keep=0, dry_run=dry_run)
    if not dry_run:
        # From now on a new run of this server has no base run to build on.
        state.forget_disks(server_id)
    locks, _bad = _read_locks(repo)
    busy = sorted(lock.run_id for lock in locks if lock.server_id == server_id)
    if busy:
        raise PermanentError(
            f"run {busy[0]} of this server is in flight; wait for it to end (or, if its "
            "process is gone, remove its lock with `connector purge --break-stale-locks`)"
        )
    runs = repo.scan_runs(server_id).get(server_id, {})
    result.deleted = sorted(r for r, objs in runs.items() if objs.commit)
    result.manifests_deleted = sum(len(objs.disks) for objs in runs.values())
    if dry_run:
        return result
    for run_id in result.deleted:
        repo.delete_commit(server_id, run_id)
    for run_id, objs in sorted(runs.items()):
        for disk_key in objs.disks:
            repo.delete_manifest(server_id, run_id, disk_key)
    repo.delete_server(server_id)
    state.mark_runs_deleted(set(result.deleted))
    state.set_retention(server_id, None)
    log.info("server removed from the store", server=server_id, runs=len(result.deleted))
    return result


def drop_run(
    repo: Repository, state: PurgeState, server_id: str, run_id: str, dry_run: bool = False
) -> RetentionResult:
    """Delete one committed run whose map cannot be resolved (a manifest deleted or damaged),
    so that purge can go on: its commit goes, so it stops existing; its manifests go with
    retention, unless a kept run's chain resolves through them. The next run of its
    disks does not build on it (it has no commit any more): it reads them in full."""
    result = RetentionResult(server_id=server_id, keep=0, dry_run=dry_run)
    if repo.objects.stat(commit_key(server_id, run_id)) is None:
        raise NotFoundError(
            f"run {run_id} has no run record in the store (server {server_id}); list the "
            "runs with `connector runs`"
        )
    result.deleted = [run_id]
    if dry_run:
        return result
    repo.delete_commit(server_id, run_id)
    state.mark_runs_deleted({run_id})
    log.warning("run dropped from the store", server=server_id, run=run_id)
    return result


def _chain_bases(
    repo: Repository, server_id: str, runs: dict[str, RunObjects], retained: set[str]
) -> dict[tuple[str, int], set[str]]:
    """(run, disk) manifests that the chains of retained runs resolve through -> who needs them."""
    needed: dict[tuple[str, int], set[str]] = {}
    base_of: dict[tuple[str, int], str | None] = {}

    def base(run_id: str, disk_key: int) -> str | None:
        key = (run_id, disk_key)
        if key not in base_of:
            try:
                base_of[key] = repo.read_manifest(server_id, run_id, disk_key).base_run
            except ConnectorError as exc:
                raise IntegrityError(
                    f"retention stopped, nothing was deleted: the manifest of run {run_id} "
                    f"disk {disk_key} cannot be read ({exc}); run `connector verify`"
                ) from exc
        return base_of[key]

    for run_id in sorted(retained):
        for disk_key in runs[run_id].disks:
            seen = {run_id}
            cur = base(run_id, disk_key)
            while cur is not None and cur not in seen:
                seen.add(cur)
                needed.setdefault((cur, disk_key), set()).add(run_id)
                if cur not in runs or disk_key not in runs[cur].disks:
                    break  # a broken chain: `verify` reports it
                cur = base(cur, disk_key)
    return needed


# ------------------------------------------------------------------- garbage collection


def collect_garbage(
    repo: Repository,
    state: PurgeState,
    settings: PurgeSettings | None = None,
    exclude_runs: Iterable[tuple[str, str]] = (),
    progress: Callable[[int, int], None] | None = None,
) -> GcResult:
    """Condemn the packs no committed run references, and delete condemned packs when safe.

    `exclude_runs` ((server, run) pairs) counts those runs as already deleted;
    it is for dry runs, which change nothing. `progress(done, total)` follows the
    deletion in bytes of packs deleted so far and in all.
    """
    settings = settings or PurgeSettings()
    result = GcResult(dry_run=settings.dry_run)
    now = settings.clock()
    locks, unreadable = _read_locks(repo)
    infos = [_lock_info(lock, state, now, settings.stale_lock_age) for lock in locks]
    infos += [
        LockInfo(run_id, None, None, None, None, f"it cannot be read ({why})")
        for run_id, why in unreadable
    ]
    if settings.break_stale_locks and not settings.dry_run:
        for info in infos:
            if info.stale is not None:
                repo.remove_lock(info.run_id)
                info.removed = True
                log.warning("stale lock removed", run=info.run_id, reason=info.stale)
    result.locks = infos
    records = repo.condemned_records()

    if settings.dry_run:
        referenced = referenced_packs(repo, set(exclude_runs))
        live = {i.run_id for i in infos if not (settings.break_stale_locks and i.stale)}
        pending_packs = {p for rec in records for p in rec.packs}
        ready_packs = {p for rec in records if not set(rec.locks) & live for p in rec.packs}
        candidates = set(repo.pack_ids()) - referenced - pending_packs - state.packs_of_runs(live)
        if live:  # new condemned packs wait for the runs in flight
            candidates = set()
        result.deleted = sorted(candidates | (ready_packs - referenced))
        result.bytes_freed = sum(repo.objects.stat(pack_key(p)) or 0 for p in result.deleted)
        result.pending = _pending(records, live)
        return result

    # Phase 1: condemn.
    referenced = referenced_packs(repo)
    all_packs = set(repo.pack_ids())
    pending_packs = {p for rec in records for p in rec.packs}
    live_runs = set(repo.lock_ids())
    candidates = all_packs - referenced - pending_packs - state.packs_of_runs(live_runs)
    if candidates:
        state.forget_blocks_in_packs(candidates)  # before listing the locks: see the docstring
        record = CondemnedRecord(
            purge_id=_purge_id(now),
            created_at=stamp(now),
            locks=tuple(sorted(repo.lock_ids())),
            packs=tuple(sorted(candidates)),
        )
        repo.write_condemned(record)
        records.append(record)
        result.condemned = list(record.packs)
        log.info("packs condemned", purge=record.purge_id, packs=len(candidates))

    # Phase 2: delete what is still unreferenced once every run in flight at T is over.
    live_now = set(repo.lock_ids())
    ready = [rec for rec in records if not set(rec.locks) & live_now]
    result.pending = _pending(records, live_now)
    if not ready:
        return result
    referenced = referenced_packs(repo)  # after the lock check: runs that ended are committed
    sizes = {
        pack_id: repo.objects.stat(pack_key(pack_id))
        for rec in ready
        for pack_id in rec.packs
        if pack_id not in referenced
    }
    total = sum(size or 0 for size in sizes.values())
    for rec in ready:
        gone: set[str] = set()
        for pack_id in rec.packs:
            if pack_id in referenced:
                _restore_index(repo, state, pack_id, result)
                continue
            size = sizes.get(pack_id)
            if size is not None:
                repo.objects.delete(pack_key(pack_id))
                result.bytes_freed += size
                result.deleted.append(pack_id)
                if progress is not None:
                    progress(result.bytes_freed, total)
            gone.add(pack_id)
        state.forget_packs(gone)
        repo.remove_condemned(rec.purge_id)
        log.info("condemned packs processed", purge=rec.purge_id, deleted=len(gone))
    return result


def referenced_packs(
    repo: Repository, exclude_runs: set[tuple[str, str]] | None = None
) -> set[str]:
    """Every pack that the resolved block map of a committed run references."""
    exclude = exclude_runs or set()
    out: set[str] = set()
    for server_id, runs in sorted(repo.scan_runs().items()):
        manifests = _Manifests(repo, server_id)  # a chain's manifests are read once
        for run_id, objs in sorted(runs.items()):
            if not objs.commit or (server_id, run_id) in exclude:
                continue
            for disk_key in _committed_disks(repo, server_id, run_id, objs):
                chain = [manifests.get(run_id, disk_key)]
                while chain[-1].base_run is not None:
                    base = chain[-1].base_run
                    if any(m.run_id == base for m in chain):
                        raise IntegrityError(f"the manifest chain of run {run_id} loops")
                    chain.append(manifests.get(base, disk_key, needed_by=run_id))
                full: BlockMap = {}
                for m in reversed(chain):
                    full = apply_changes(full, m.entries)
                out.update(ref.pack_id for ref in full.values() if ref is not None)
    return out


def _committed_disks(repo: Repository, server_id: str, run_id: str, objs: RunObjects) -> list[int]:
    """The disks a committed run's record names, each of which must have its manifest."""
    try:
        record = repo.read_commit(server_id, run_id)
        disks = sorted(int(d["disk_key"]) for d in record["disks"])
    except NotFoundError:
        return []  # deleted since the listing: the run no longer exists
    except (ConnectorError, KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(
            f"purge stopped, nothing was deleted: the run record of run {run_id} "
            f"(server {server_id}) cannot be read ({exc}), so the packs it needs are "
            f"unknown. {_WHAT_TO_DO}"
        ) from exc
    missing = [d for d in disks if d not in objs.disks]
    if missing:
        raise IntegrityError(
            f"purge stopped, nothing was deleted: committed run {run_id} (server "
            f"{server_id}) has no manifest for disk {missing[0]} (object "
            f"runs/{server_id}/{run_id}/disk-{missing[0]} is missing), so the packs it "
            f"needs are unknown. {_WHAT_TO_DO}"
        )
    return disks


# What a user does about a committed run whose manifest or record cannot be read.
_WHAT_TO_DO = (
    "Run `connector verify` to list every damaged run; put the object back from a copy "
    "(an earlier version, if the bucket keeps versions), or, if that run is lost, remove "
    "it with `connector purge --drop-run RUN --yes`; then run purge again"
)


class _Manifests:
    def __init__(self, repo: Repository, server_id: str) -> None:
        self.repo = repo
        self.server_id = server_id
        self.cache: dict[tuple[str, int], DiskManifest] = {}

    def get(self, run_id: str, disk_key: int, needed_by: str | None = None) -> DiskManifest:
        key = (run_id, disk_key)
        if key not in self.cache:
            try:
                self.cache[key] = self.repo.read_manifest(self.server_id, run_id, disk_key)
            except ConnectorError as exc:
                whose = f", the base of committed run {needed_by}," if needed_by else ""
                raise IntegrityError(
                    f"purge stopped, nothing was deleted: the manifest of run {run_id} "
                    f"disk {disk_key}{whose} (server {self.server_id}) cannot be read ({exc}), "
                    f"so the packs it needs are unknown. {_WHAT_TO_DO}"
                ) from exc
        return self.cache[key]


def _restore_index(repo: Repository, state: PurgeState, pack_id: str, result: GcResult) -> None:
    """A condemned pack that a run committed against: keep it, index its blocks again."""
    result.restored.append(pack_id)
    try:
        state.add(repo.pack_header(pack_id))
    except ConnectorError as exc:
        result.faults.append(f"pack {pack_id} is referenced but its header cannot be read: {exc}")


def _pending(records: list[CondemnedRecord], live: set[str]) -> list[PendingPurge]:
    return [
        PendingPurge(rec.purge_id, rec.created_at, len(rec.packs), sorted(set(rec.locks) & live))
        for rec in records
        if set(rec.locks) & live
    ]


def _read_locks(repo: Repository) -> tuple[list[RunLock], list[tuple[str, str]]]:
    locks: list[RunLock] = []
    bad: list[tuple[str, str]] = []
    for run_id in repo.lock_ids():
        try:
            locks.append(repo.read_lock(run_id))
        except NotFoundError:
            continue  # removed since the listing: its run ended
        except (ConnectorError, KeyError, ValueError) as exc:
            bad.append((run_id, str(exc)))
    return locks, bad


def _lock_info(
    lock: RunLock, state: PurgeState, now: dt.datetime, stale_age: dt.timedelta
) -> LockInfo:
    info = LockInfo(lock.run_id, lock.server_id, lock.started_at, lock.host, lock.pid, None)
    try:
        run_state: str | None = state.run(lock.run_id).state
    except NotFoundError:
        run_state = None
    if run_state is not None and run_state != RUN_ACTIVE:
        info.stale = f"its run is {run_state}"
        return info
    if lock.host == socket.gethostname() and not _pid_alive(lock.pid):
        info.stale = f"its process {lock.pid} on this host is gone"
        return info
    try:
        started = dt.datetime.strptime(lock.started_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        info.stale = f"its start time {lock.started_at!r} cannot be read"
        return info
    if now - started > stale_age:
        hours = stale_age.total_seconds() / 3600
        info.stale = f"it is older than {hours:g} h (its run may still be alive on {lock.host})"
    return info


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _purge_id(now: dt.datetime) -> str:
    return f"p-{compact(now)}-{os.urandom(4).hex()}"


# ------------------------------------------------------------------------------ purge


def purge(
    repo: Repository,
    state: PurgeState,
    policies: dict[str, int],
    settings: PurgeSettings | None = None,
    exclude_runs: Iterable[tuple[str, str]] = (),
    progress: Callable[[int, int], None] | None = None,
) -> PurgeReport:
    """Apply retention to each server of `policies` (server id -> runs to keep), then GC.

    `exclude_runs` ((server, run) pairs) are runs a dry run counts as deleted already.
    """
    settings = settings or PurgeSettings()
    excluded = set(exclude_runs)
    # Before anything is deleted: every committed run's map must resolve, or the packs
    # it needs are unknown and purge stops here (an IntegrityError naming the run).
    referenced_packs(repo, excluded)
    results = [
        apply_retention(repo, state, server_id, keep, dry_run=settings.dry_run)
        for server_id, keep in sorted(policies.items())
    ]
    exclude = excluded | {(r.server_id, run_id) for r in results for run_id in r.deleted}
    gc = collect_garbage(repo, state, settings, exclude_runs=exclude, progress=progress)
    return PurgeReport(results, gc)
