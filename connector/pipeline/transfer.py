"""Stage `transfer`: per disk, read the planned extents from the snapshot, pack
them (hash, deduplicate, compress, encrypt), upload the packs, then write the
disk's manifest, after every pack it names is durable.

A disk is redone from its start after a crash; blocks already uploaded are
found in the block index and not uploaded again. Disks of one VM go side by
side up to `max_disks_per_vm`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from connector.domain.extents import block_extent, blocks_touched, runs
from connector.domain.manifest import BlockMap, BlockRef
from connector.domain.model import DiskInfo, Extent, SnapshotInfo, VmInfo
from connector.domain.records import DiskResult
from connector.faults import crash_point
from connector.pipeline.changes import DiskPlan, skip_unallocated, without_base
from connector.pipeline.commit import build_manifest, read_base_map
from connector.pipeline.context import RunRef, StageContext
from connector.ports import AllocationAware, DiskReader, StreamingReader
from connector.store.repository import PackWriter, Repository

# Progress callback: (bytes done, bytes total) for this disk.
Progress = Callable[[int, int], None]


def run(ctx: StageContext, ref: RunRef) -> None:
    snap = ctx.run_snapshot(ref.run_id)
    plans = ctx.ledger.steps(ref.run_id, "changes")
    done = ctx.ledger.steps(ref.run_id, "transfer")
    todo = [d for d in sorted(snap.disks, key=lambda d: d.key) if d.key not in done]
    if not todo:
        return
    vm = ctx.hv.get_vm(ref.vm_uuid)
    repo = ctx.repo()
    # Again (it is idempotent): a resumed run may come from a process that has ended.
    ctx.write_lock(ref, vm)
    workers = min(ctx.settings.max_disks_per_vm, len(todo))
    if workers <= 1:
        for disk in todo:
            _transfer_disk(ctx, ref, vm, snap, disk, plans[disk.key], repo)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"disk-{ref.run_id}") as pool:
        futures = [
            pool.submit(_transfer_disk, ctx, ref, vm, snap, d, plans[d.key], repo) for d in todo
        ]
        errors = [f.exception() for f in futures]
    for exc in errors:
        if exc is not None:
            raise exc


def _transfer_disk(
    ctx: StageContext,
    ref: RunRef,
    vm: VmInfo,
    snap: SnapshotInfo,
    disk: DiskInfo,
    plan_json: dict[str, Any],
    repo: Repository,
) -> None:
    run_id = ref.run_id
    plan = DiskPlan.from_json(disk, plan_json)
    ctx.reporter.stage(run_id, "transfer", f"disk {disk.key}: {plan.mode} ({plan.reason})")

    def on_pack(pack_id: str, size: int, _refs: object) -> None:
        ctx.blocks.record_pack(pack_id, size, run_id)
        crash_point("pack-uploaded")

    writer = repo.pack_writer(ctx.blocks, ctx.settings.pack_size, on_pack=on_pack)
    report = functools.partial(ctx.reporter.disk_progress, run_id, disk.key)

    def progress(done: int, total: int) -> None:
        report(done, total)
        crash_point("block-read")
        ctx.check_stop()

    # The map this disk's manifest builds on, read before any block: when it went since
    # the plan was made (deleted, damaged), the disk is read in full instead.
    base_map = None
    if plan.base_run is not None:
        base_map, why = read_base_map(repo, ref.server_id, plan.base_run, disk.key)
        if base_map is None:
            plan = without_base(plan, why)
    reader = ctx.source.open(vm, snap, disk)
    try:
        plan = skip_unallocated(plan, allocated_extents(reader))
        compare_with = base_map if plan.mode == "compare" else None
        result = transfer_disk(
            reader,
            writer,
            plan.extents,
            disk.capacity,
            repo.block_size,
            ctx.settings.max_read,
            progress,
            compare_with=compare_with,
        )
    finally:
        reader.close()
    bytes_changed = result.bytes_changed if compare_with is not None else plan.bytes_changed
    writer.flush()
    crash_point("before-manifest")
    manifest, chain = build_manifest(
        repo,
        ref.server_id,
        run_id,
        snap,
        disk,
        base_run=plan.base_run,
        changes=result.changes,
        previous_chain=int(plan_json["previous_chain"]),
        stats={"mode": plan.mode, "reason": plan.reason},
        base_map=base_map,
    )
    outcome = DiskResult(
        disk_key=disk.key,
        mode=plan.mode,
        reason=plan.reason,
        capacity=disk.capacity,
        change_id_from=plan.change_id_from,
        change_id_to=disk.change_id,
        disk_uuid=disk.uuid,
        bytes_changed=bytes_changed,
        bytes_read=result.bytes_read,
        bytes_uploaded=writer.bytes_stored,
        pack_bytes=writer.bytes_uploaded,
        blocks_new=writer.blocks_new,
        blocks_dedup=writer.blocks_dedup,
        blocks_zero=result.blocks_zero,
        packs=len(writer.packs_written),
        chain=chain,
        merkle_root=manifest.merkle_root.hex(),
    )
    outcome.manifest_key = repo.write_manifest(manifest)
    ctx.runs.record_disk(run_id, outcome)
    ctx.ledger.step_done(run_id, "transfer", disk.key, outcome.to_json())
    crash_point("manifest-written")


@dataclass
class TransferResult:
    changes: BlockMap  # block index -> new ref, or None for a block that is now all zero
    bytes_read: int
    blocks_zero: int
    blocks_unchanged: int = 0  # compared with the previous map and found equal
    bytes_changed: int = 0  # bytes of the blocks in `changes`


def allocated_extents(reader: DiskReader) -> list[Extent] | None:
    """The reader's allocation map, when it has one (NBD block status, SEEK_DATA)."""
    if isinstance(reader, AllocationAware):
        return reader.allocated_extents()
    return None


def read_extents(reader: DiskReader, extents: Iterable[Extent]) -> Iterator[tuple[Extent, bytes]]:
    """Stream the extents through the reader, several in flight when it can."""
    if isinstance(reader, StreamingReader):
        yield from reader.read_extents(extents)
        return
    for extent in extents:
        yield extent, reader.read(extent.offset, extent.length)


def transfer_disk(
    reader: DiskReader,
    writer: PackWriter,
    extents: Iterable[Extent],
    capacity: int,
    block_size: int,
    max_read: int,
    progress: Progress | None = None,
    compare_with: Mapping[int, BlockRef | None] | None = None,
) -> TransferResult:
    """Read every block the extents touch, store the non-zero ones, return the change map.

    Extents are widened to block boundaries; consecutive blocks are read in one
    request of at most `max_read` bytes.

    With `compare_with` (the previous run's full block map; the disk has no
    changed block tracking), only blocks whose id differs from that map are
    stored and listed, and blocks of that map outside the extents (now
    unallocated, so zero) are listed as zero.
    """
    indices = blocks_touched(extents, block_size, capacity)
    total = sum(min(block_size, capacity - i * block_size) for i in indices)  # bytes to read
    changes: BlockMap = {}
    bytes_read = 0
    zero = 0
    unchanged = 0
    done = 0
    per_read = max(1, max_read // block_size)
    requests = (
        Extent(first * block_size, min(count * block_size, capacity - first * block_size))
        for first, count in runs(indices, per_read)
    )
    for extent, data in read_extents(reader, requests):
        bytes_read += len(data)
        first = extent.offset // block_size
        count = (len(data) + block_size - 1) // block_size
        for i in range(count):
            index = first + i
            chunk = data[i * block_size : (i + 1) * block_size]
            previous = compare_with.get(index) if compare_with is not None else None
            if not any_nonzero(chunk):
                zero += 1
                if compare_with is None or previous is not None:
                    changes[index] = None
                continue
            block_id = writer.repo.keys.block_id(chunk)
            if previous is not None and previous.block_id == block_id:
                unchanged += 1
                continue
            ref: BlockRef = writer.add(block_id, chunk)
            changes[index] = ref
        done += extent.length
        if progress is not None:
            progress(done, total)
    if compare_with is not None:
        read = set(indices)
        for index, old in compare_with.items():
            if old is not None and index not in read:
                changes[index] = None
    changed_bytes = sum(block_extent(i, block_size, capacity).length for i in changes)
    return TransferResult(changes, bytes_read, zero, unchanged, changed_bytes)


_ZERO = bytes(1024 * 1024)


def any_nonzero(chunk: bytes) -> bool:
    if len(chunk) == len(_ZERO):
        return chunk != _ZERO
    return chunk.count(0) != len(chunk)
