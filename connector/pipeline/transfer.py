"""Stage `transfer`: per disk, read the planned extents from the snapshot, pack
them (hash, deduplicate, compress, encrypt), upload the packs, then write the
disk's manifest, after every pack it names is durable.

A disk is redone from its start after a crash; blocks already uploaded are
found in the block index and not uploaded again. Disks of one VM go side by
side up to `max_disks_per_vm`.

The stages of one disk overlap (docs/architecture.md, "The transfer
pipeline"): a reader thread keeps reads in flight; a pool of workers, shared by
the disks of the run, hashes each read's blocks, asks the block index about
them in one batch, and compresses and encrypts the new ones (hashlib, zstandard
and cryptography release the GIL on large buffers); the disk's own thread
appends the sealed blocks to packs in disk order; full packs upload in the
background, several at once. Memory is set by the settings, never by the size
of the disk: at most `reads_in_flight` reads per disk are held between the
reader and the packs, and at most `uploads_in_flight` packs per run upload at
once while one more per disk fills. A failure anywhere (reader, worker,
upload) stops the disk: the reads stop, the work under way ends, and the first
error is raised; no manifest is written.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
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
from connector.store.repository import PackWriter, Repository, UploadSlots

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
    settings = ctx.settings
    disks = min(settings.max_disks_per_vm, len(todo))
    with (
        ThreadPoolExecutor(settings.workers, thread_name_prefix=f"seal-{ref.run_id}") as workers,
        UploadSlots(settings.uploads_in_flight, f"upload-{ref.run_id}") as uploads,
    ):
        pool = TransferPool(workers, uploads, settings.reads_in_flight)
        if disks <= 1:
            for disk in todo:
                _transfer_disk(ctx, ref, vm, snap, disk, plans[disk.key], repo, pool)
            return
        with ThreadPoolExecutor(max_workers=disks, thread_name_prefix=f"disk-{ref.run_id}") as each:
            futures = [
                each.submit(_transfer_disk, ctx, ref, vm, snap, d, plans[d.key], repo, pool)
                for d in todo
            ]
            errors = [f.exception() for f in futures]
    for exc in errors:
        if exc is not None:
            raise exc


@dataclass(frozen=True)
class TransferPool:
    """What the disks of one run share: the sealing workers and the upload slots."""

    workers: ThreadPoolExecutor
    uploads: UploadSlots
    reads_in_flight: int  # per disk


def _transfer_disk(
    ctx: StageContext,
    ref: RunRef,
    vm: VmInfo,
    snap: SnapshotInfo,
    disk: DiskInfo,
    plan_json: dict[str, Any],
    repo: Repository,
    pool: TransferPool,
) -> None:
    run_id = ref.run_id
    plan = DiskPlan.from_json(disk, plan_json)
    ctx.reporter.stage(run_id, "transfer", f"disk {disk.key}: {plan.mode} ({plan.reason})")

    def on_pack(pack_id: str, size: int, _refs: object) -> None:
        ctx.blocks.record_pack(pack_id, size, run_id)
        crash_point("pack-uploaded")

    writer = repo.pack_writer(
        ctx.blocks, ctx.settings.pack_size, on_pack=on_pack, uploads=pool.uploads
    )
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
            workers=pool.workers,
            reads_in_flight=pool.reads_in_flight,
        )
    finally:
        reader.close()
    bytes_changed = result.bytes_changed if compare_with is not None else plan.bytes_changed
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
    *,
    workers: ThreadPoolExecutor | None = None,
    reads_in_flight: int = 4,
) -> TransferResult:
    """Read every block the extents touch, store the non-zero ones, return the change map.

    Extents are widened to block boundaries; consecutive blocks are read in one
    request of at most `max_read` bytes. At most `reads_in_flight` reads are
    held at once, from the moment a read is asked for until its blocks are in a
    pack; `workers` hash, deduplicate and seal them (a pool of one thread when
    None). Returns after every pack is uploaded (`writer.flush`): the refs in
    the map are durable.

    With `compare_with` (the previous run's full block map; the disk has no
    changed block tracking), only blocks whose id differs from that map are
    stored and listed, and blocks of that map outside the extents (now
    unallocated, so zero) are listed as zero.
    """
    if reads_in_flight < 1:
        raise ValueError("reads in flight must be at least 1")
    indices = blocks_touched(extents, block_size, capacity)
    total = sum(min(block_size, capacity - i * block_size) for i in indices)  # bytes to read
    per_read = max(1, max_read // block_size)
    requests = (
        Extent(first * block_size, min(count * block_size, capacity - first * block_size))
        for first, count in runs(indices, per_read)
    )
    own_pool = workers is None
    pool = workers or ThreadPoolExecutor(1, thread_name_prefix="seal")
    tally = _Tally(total=total)
    reads = _ReadAhead(read_extents(reader, requests), reads_in_flight)
    window: deque[Future[_Unit]] = deque()
    try:
        for extent, data in reads:
            while window and window[0].done():
                _consume(window.popleft().result(), writer, tally, progress)
                reads.release()
            window.append(pool.submit(_seal_unit, writer, extent, data, block_size, compare_with))
            del data
            # Every read in flight is waiting for a worker: the oldest one is next.
            while len(window) >= reads_in_flight:
                _consume(window.popleft().result(), writer, tally, progress)
                reads.release()
            writer.check()
        while window:
            _consume(window.popleft().result(), writer, tally, progress)
            reads.release()
        writer.flush()
    except BaseException:
        reads.stop()
        for future in window:
            future.cancel()
        wait(window)
        writer.abandon()
        raise
    finally:
        reads.stop()
        if own_pool:
            pool.shutdown(wait=True)
    changes: BlockMap = dict(tally.changes)
    for index, block_id in tally.stored.items():
        changes[index] = writer.ref(block_id)
    if compare_with is not None:
        read = set(indices)
        for index, old in compare_with.items():
            if old is not None and index not in read:
                changes[index] = None
    changed_bytes = sum(block_extent(i, block_size, capacity).length for i in changes)
    return TransferResult(changes, tally.bytes_read, tally.zero, tally.unchanged, changed_bytes)


@dataclass
class _Unit:
    """One read, hashed, deduplicated and sealed by a worker."""

    first: int  # block index of its first block
    count: int  # blocks in it
    nbytes: int
    changes: dict[int, BlockRef | None]  # zero blocks (None), blocks stored before
    stored: dict[int, bytes]  # block index -> id of a block this writer stores
    sealed: list[tuple[bytes, bytes, int]]  # (block id, sealed bytes, plain length) to append
    zero: int
    unchanged: int


@dataclass
class _Tally:
    total: int  # bytes to read
    done: int = 0  # bytes read and consumed
    bytes_read: int = 0
    zero: int = 0
    unchanged: int = 0
    changes: dict[int, BlockRef | None] = field(default_factory=dict)
    stored: dict[int, bytes] = field(default_factory=dict)


def _seal_unit(
    writer: PackWriter,
    extent: Extent,
    data: bytes,
    block_size: int,
    compare_with: Mapping[int, BlockRef | None] | None,
) -> _Unit:
    """In a worker: hash the read's blocks, look them up in one batch, seal the new ones."""
    keys = writer.repo.keys
    first = extent.offset // block_size
    count = (len(data) + block_size - 1) // block_size
    changes: dict[int, BlockRef | None] = {}
    candidates: list[tuple[int, bytes, bytes]] = []
    zero = unchanged = 0
    for i in range(count):
        index = first + i
        chunk = data[i * block_size : (i + 1) * block_size]
        previous = compare_with.get(index) if compare_with is not None else None
        if not any_nonzero(chunk):
            zero += 1
            if compare_with is None or previous is not None:
                changes[index] = None
            continue
        block_id = keys.block_id(chunk)
        if previous is not None and previous.block_id == block_id:
            unchanged += 1
            continue
        candidates.append((index, block_id, chunk))
    known, mine = writer.claim([block_id for _, block_id, _ in candidates])
    claimed = set(mine)
    stored: dict[int, bytes] = {}
    sealed: list[tuple[bytes, bytes, int]] = []
    for index, block_id, chunk in candidates:
        ref = known.get(block_id)
        if ref is not None:
            changes[index] = ref
            continue
        stored[index] = block_id
        if block_id in claimed:
            claimed.discard(block_id)
            sealed.append((block_id, keys.seal(chunk, block_id), len(chunk)))
    return _Unit(first, count, len(data), changes, stored, sealed, zero, unchanged)


def _consume(unit: _Unit, writer: PackWriter, tally: _Tally, progress: Progress | None) -> None:
    """In the disk's thread, in disk order: append the unit's blocks to packs, count it."""
    for block_id, sealed, length in unit.sealed:
        writer.append(block_id, sealed, length)
    tally.changes.update(unit.changes)
    tally.stored.update(unit.stored)
    tally.bytes_read += unit.nbytes
    tally.zero += unit.zero
    tally.unchanged += unit.unchanged
    tally.done += unit.nbytes
    if progress is not None:
        progress(tally.done, tally.total)


_END = object()


class _ReadAhead:
    """Iterates `source` in a thread of its own, at most `limit` items ahead of `release`.

    A permit is taken before each item is read and given back by `release`,
    once the consumer is done with one: at most `limit` items exist at once.
    An error of the source is raised by the iteration, after the items before it.
    """

    def __init__(self, source: Iterator[tuple[Extent, bytes]], limit: int) -> None:
        self._source = source
        self._permits = threading.Semaphore(limit)
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                while not self._permits.acquire(timeout=0.5):
                    if self._stopping.is_set():
                        return
                if self._stopping.is_set():
                    return
                try:
                    item = next(self._source)
                except StopIteration:
                    self._items.put(_END)
                    return
                except BaseException as exc:
                    self._items.put(_Failed(exc))
                    return
                self._items.put(item)
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[tuple[Extent, bytes]]:
        while True:
            item = self._items.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def release(self) -> None:
        self._permits.release()

    def stop(self) -> None:
        """Stop reading and wait for the thread (the read under way ends first)."""
        self._stopping.set()
        self._permits.release()
        self._thread.join()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_ZERO = bytes(1024 * 1024)


def any_nonzero(chunk: bytes) -> bool:
    if len(chunk) == len(_ZERO):
        return chunk != _ZERO
    return chunk.count(0) != len(chunk)
