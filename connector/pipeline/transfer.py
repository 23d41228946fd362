"""Stages `read`, `pack` and `upload` for one disk: changed blocks into the store."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from connector.domain.extents import block_extent, blocks_touched, runs
from connector.domain.manifest import BlockMap, BlockRef
from connector.domain.model import Extent
from connector.ports import AllocationAware, DiskReader, StreamingReader
from connector.store.repository import PackWriter

# Progress callback: (bytes done, bytes total) for this disk.
Progress = Callable[[int, int], None]


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
    total = len(indices)
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
        done += count
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
