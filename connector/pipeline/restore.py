"""Restore: a raw image of one disk at one committed run, checked block by block."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from connector.domain.extents import block_count
from connector.domain.manifest import BlockRef, leaves
from connector.domain.merkle import merkle_root
from connector.errors import IntegrityError, NotFoundError, PermanentError
from connector.store.repository import Repository, pack_key

# Contiguous blobs of one pack are fetched in one ranged GET up to this size.
MAX_FETCH = 16 * 1024 * 1024


@dataclass(frozen=True)
class RestoreResult:
    path: Path
    size: int
    sha256: str
    blocks: int


def restore_disk(
    repo: Repository,
    server_id: str,
    run_id: str,
    disk_key: int,
    target: Path,
    progress: Callable[[int, int], None] | None = None,
) -> RestoreResult:
    """Write the disk's image at `run_id` to `target` and return its SHA-256.

    A regular file is written beside the target and renamed into place only
    when every block has authenticated; a block device is written in place.
    """
    commit = repo.read_commit(server_id, run_id)
    if not any(d["disk_key"] == disk_key for d in commit["disks"]):
        keys = ", ".join(str(d["disk_key"]) for d in commit["disks"])
        raise NotFoundError(f"run {run_id} has no disk {disk_key} (its disks: {keys})")
    manifest = repo.read_manifest(server_id, run_id, disk_key)
    full = repo.resolve_map(manifest)
    nblocks = block_count(manifest.capacity, manifest.block_size)
    last_len = manifest.capacity - (nblocks - 1) * manifest.block_size if nblocks else 0
    root = merkle_root(
        leaves(full, nblocks, repo.zero_id(manifest.block_size), repo.zero_id(last_len))
    )
    if root != manifest.merkle_root:
        raise IntegrityError(
            f"the block map of run {run_id} disk {disk_key} does not match its Merkle root"
        )
    is_device = target.exists() and stat.S_ISBLK(target.stat().st_mode)
    if is_device:
        out_path = target
        fd = os.open(target, os.O_WRONLY)
    else:
        if target.is_dir():
            raise PermanentError(f"restore target {target} is a directory; give a file path")
        out_path = target.with_name(f".{target.name}.partial")
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    ok = False
    try:
        if not is_device:
            os.ftruncate(fd, manifest.capacity)
        refs = sorted(((i, r) for i, r in full.items() if r is not None), key=lambda x: x[0])
        done = 0
        for group in _fetch_groups(refs):
            first = group[0][1]
            last = group[-1][1]
            span = last.offset + last.length - first.offset
            data = repo.objects.get(pack_key(first.pack_id), first.offset, span)
            for index, ref in group:
                blob = data[ref.offset - first.offset : ref.offset - first.offset + ref.length]
                what = f"block {index} of run {run_id} disk {disk_key} (pack {ref.pack_id[:16]})"
                plain = repo.open_block(ref, blob, what)
                os.pwrite(fd, plain, index * manifest.block_size)
            done += len(group)
            if progress is not None:
                progress(done, len(refs))
        os.fsync(fd)
        ok = True
    finally:
        os.close(fd)
        if not ok and not is_device:
            out_path.unlink(missing_ok=True)
    if not is_device:
        os.replace(out_path, target)
    return RestoreResult(
        target, manifest.capacity, sha256_file(target, manifest.capacity), len(refs)
    )


def _fetch_groups(refs: list[tuple[int, BlockRef]]) -> list[list[tuple[int, BlockRef]]]:
    """Group refs that sit back to back in the same pack, for ranged GETs."""
    by_pack: dict[str, list[tuple[int, BlockRef]]] = {}
    for item in refs:
        by_pack.setdefault(item[1].pack_id, []).append(item)
    groups: list[list[tuple[int, BlockRef]]] = []
    for items in by_pack.values():
        items.sort(key=lambda x: x[1].offset)
        cur: list[tuple[int, BlockRef]] = []
        for item in items:
            ref = item[1]
            if cur:
                start = cur[0][1].offset
                prev = cur[-1][1]
                contiguous = ref.offset == prev.offset + prev.length
                if not contiguous or ref.offset + ref.length - start > MAX_FETCH:
                    groups.append(cur)
                    cur = []
            cur.append(item)
        if cur:
            groups.append(cur)
    return groups


def sha256_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = size
        while remaining > 0:
            chunk = f.read(min(8 * 1024 * 1024, remaining))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()
