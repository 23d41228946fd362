"""Stage `commit`: disk manifests, then the run record, written after every pack."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from connector.domain.extents import block_count
from connector.domain.manifest import BlockMap, DiskManifest, apply_changes, diff_maps, leaves
from connector.domain.merkle import merkle_root
from connector.store.repository import Repository, now_iso

# After this many change manifests in a row, a disk's next manifest is a full one,
# so a restore never follows a long chain.
MAX_CHAIN = 15


@dataclass
class DiskCommit:
    disk_key: int
    disk_uuid: str | None
    capacity: int
    change_id: str | None
    base_run: str | None  # None: full manifest
    changes: BlockMap
    previous_chain: int
    stats: dict[str, Any]


def build_manifest(
    repo: Repository,
    server_id: str,
    run_id: str,
    snapshot_name: str,
    snapshot_ref: str,
    d: DiskCommit,
) -> tuple[DiskManifest, int]:
    """The manifest for one disk and the chain length it ends."""
    if d.base_run is not None:
        base = repo.read_manifest(server_id, d.base_run, d.disk_key)
        previous = repo.resolve_map(base)
        full = apply_changes(previous, d.changes)
    else:
        previous = {}
        full = apply_changes({}, d.changes)
    nblocks = block_count(d.capacity, repo.block_size)
    last_len = d.capacity - (nblocks - 1) * repo.block_size if nblocks else 0
    root = merkle_root(leaves(full, nblocks, repo.zero_id(repo.block_size), repo.zero_id(last_len)))
    if d.base_run is not None and d.previous_chain < MAX_CHAIN:
        entries = diff_maps(previous, full)
        base_run: str | None = d.base_run
        chain = d.previous_chain + 1
    else:
        entries = dict(full)
        base_run = None
        chain = 0
    manifest = DiskManifest(
        server_id=server_id,
        run_id=run_id,
        disk_key=d.disk_key,
        disk_uuid=d.disk_uuid,
        capacity=d.capacity,
        block_size=repo.block_size,
        change_id=d.change_id,
        snapshot_name=snapshot_name,
        snapshot_ref=snapshot_ref,
        created_at=now_iso(),
        merkle_root=root,
        base_run=base_run,
        entries=entries,
        stats=d.stats,
    )
    return manifest, chain
