"""Stage `commit`: the run record, written once, after every disk's manifest;
then the disks' next changeIds are stored. A run without its commit object
does not exist.

`build_manifest` makes a disk's manifest (block map, Merkle root, changeId);
the transfer stage writes it once the disk's packs are durable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from connector.domain.extents import block_count
from connector.domain.manifest import (
    BlockMap,
    BlockRef,
    DiskManifest,
    apply_changes,
    diff_maps,
    leaves,
)
from connector.domain.merkle import merkle_root
from connector.domain.model import DiskInfo, SnapshotInfo
from connector.domain.records import NO_DISK, DiskResult, DiskStateRow
from connector.domain.times import iso
from connector.errors import IntegrityError, NotFoundError, PermanentError, StoreFormatError
from connector.faults import crash_point
from connector.pipeline.context import RunRef, StageContext
from connector.store.repository import Repository, ServerRecord, commit_key

# After this many change manifests in a row, a disk's next manifest is a full one,
# so a restore never follows a long chain.
MAX_CHAIN = 15

# Summed over the disks into the run's stats (the stats key, and the result's field).
_STATS = {
    "bytes_read": "bytes_read",
    "bytes_changed": "bytes_changed",
    "bytes_uploaded": "pack_bytes",
    "blocks_new": "blocks_new",
    "blocks_dedup": "blocks_dedup",
    "packs": "packs",
}


def run(ctx: StageContext, ref: RunRef) -> None:
    run_id, server_id = ref.run_id, ref.server_id
    crash_point("before-commit")
    ctx.reporter.stage(run_id, "commit", "writing the run record")
    snap = ctx.run_snapshot(run_id)
    results = {k: DiskResult.from_json(v) for k, v in ctx.ledger.steps(run_id, "transfer").items()}
    keys = sorted(d.key for d in snap.disks)
    missing = [k for k in keys if k not in results]
    if missing:
        raise PermanentError(
            f"run {run_id} reached commit without the manifests of disks {missing}"
        )
    stats = {
        name: sum(int(getattr(results[k], attr)) for k in keys) for name, attr in _STATS.items()
    }
    repo = ctx.repo()
    if repo.objects.stat(commit_key(server_id, run_id)) is None:
        # The store names its servers itself, so that a connector that lost its state
        # database can rebuild its catalog from the store (`connector state rebuild`).
        server = ctx.catalog.server(server_id)
        repo.ensure_server(ServerRecord(server_id, server.vm_uuid, server.name, iso()))
        row = ctx.runs.run(run_id)
        repo.write_commit(
            server_id,
            run_id,
            {
                "run_id": run_id,
                "server_id": server_id,
                "type": row.type,
                "started_at": row.started_at,
                "created_at": iso(),
                "snapshot": {"name": snap.name, "ref": snap.ref},
                "disks": [
                    {
                        "disk_key": k,
                        "capacity": results[k].capacity,
                        "merkle_root": results[k].merkle_root,
                        "result": results[k].to_json(),
                    }
                    for k in keys
                ],
                "stats": stats,
            },
        )
    crash_point("after-commit")
    next_states = [
        DiskStateRow(
            server_id=server_id,
            disk_key=k,
            disk_uuid=results[k].disk_uuid,
            capacity=results[k].capacity,
            change_id=results[k].change_id_to,
            last_run_id=run_id,
            chain_length=results[k].chain,
        )
        for k in keys
    ]
    ctx.runs.record_commit(run_id, next_states, stats)
    ctx.ledger.step_done(run_id, "commit", NO_DISK, {"committed": True})
    ctx.reporter.stage(run_id, "commit", "committed")


# What makes a base run's manifest unusable: gone, damaged (it fails authentication), or
# of a format this version cannot read. Other errors (S3 down, access refused) are not
# about the manifest and propagate, to be retried or reported as they are.
UNREADABLE = (NotFoundError, IntegrityError, StoreFormatError)


def read_base_map(
    repo: Repository, server_id: str, base_run: str, disk_key: int
) -> tuple[BlockMap | None, str]:
    """The resolved block map of `base_run`'s manifest of a disk, or (None, why) when that
    run is no longer committed or that manifest (or one its chain resolves through)
    cannot be read: the disk is then read in full, and its new manifest is a full one
    that needs no base."""
    # A base without its commit is no run any more (dropped from the store): purge does
    # not keep the packs of its map, so nothing may be built on it.
    if repo.objects.stat(commit_key(server_id, base_run)) is None:
        return None, f"run {base_run} has no run record in the store any more"
    try:
        return repo.resolve_map(repo.read_manifest(server_id, base_run, disk_key)), ""
    except UNREADABLE as exc:
        return None, str(exc)


def unreadable_base_reason(base_run: str, why: str) -> str:
    """How a full read forced by an unreadable base manifest is recorded."""
    return f"the manifest of the previous run {base_run} cannot be read ({why}); full read"


def build_manifest(
    repo: Repository,
    server_id: str,
    run_id: str,
    snap: SnapshotInfo,
    disk: DiskInfo,
    *,
    base_run: str | None,
    changes: BlockMap,
    previous_chain: int,
    stats: dict[str, Any],
    base_map: Mapping[int, BlockRef | None] | None = None,
) -> tuple[DiskManifest, int]:
    """The manifest for one disk and the chain length it ends.

    `base_run` is the run whose map `changes` applies to (None: a full read);
    `base_map` is that run's resolved map when the caller has read it already.
    """
    if base_run is not None:
        if base_map is None:
            base = repo.read_manifest(server_id, base_run, disk.key)
            base_map = repo.resolve_map(base)
        previous = dict(base_map)
        full = apply_changes(previous, changes)
    else:
        previous = {}
        full = apply_changes({}, changes)
    nblocks = block_count(disk.capacity, repo.block_size)
    last_len = disk.capacity - (nblocks - 1) * repo.block_size if nblocks else 0
    root = merkle_root(leaves(full, nblocks, repo.zero_id(repo.block_size), repo.zero_id(last_len)))
    if base_run is not None and previous_chain < MAX_CHAIN:
        entries = diff_maps(previous, full)
        manifest_base: str | None = base_run
        chain = previous_chain + 1
    else:
        entries = dict(full)
        manifest_base = None
        chain = 0
    manifest = DiskManifest(
        server_id=server_id,
        run_id=run_id,
        disk_key=disk.key,
        disk_uuid=disk.uuid,
        capacity=disk.capacity,
        block_size=repo.block_size,
        change_id=disk.change_id,
        snapshot_name=snap.name,
        snapshot_ref=snap.ref,
        created_at=iso(),
        merkle_root=root,
        base_run=manifest_base,
        entries=entries,
        stats=stats,
    )
    return manifest, chain
