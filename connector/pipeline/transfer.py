"""Stages `read`, `pack` and `upload` for one disk: changed blocks into the store."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from connector.domain.extents import blocks_touched, runs
from connector.domain.manifest import BlockMap, BlockRef
from connector.domain.model import Extent
from connector.ports import DiskReader
from connector.store.repository import PackWriter

# Progress callback: (bytes done, bytes total) for this disk.
Progress = Callable[[int, int], None]


@dataclass
class TransferResult:
    changes: BlockMap  # block index -> new ref, or None for a block that is now all zero
    bytes_read: int
    blocks_zero: int


def transfer_disk(
    reader: DiskReader,
    writer: PackWriter,
    extents: Iterable[Extent],
    capacity: int,
    block_size: int,
    max_read: int,
    progress: Progress | None = None,
) -> TransferResult:
    """Read every block the extents touch, store the non-zero ones, return the change map.

    Extents are widened to block boundaries; consecutive blocks are read in one
    request of at most `max_read` bytes.
    """
    indices = blocks_touched(extents, block_size, capacity)
    total = len(indices)
    changes: BlockMap = {}
    bytes_read = 0
    zero = 0
    done = 0
    per_read = max(1, max_read // block_size)
    for first, count in runs(indices, per_read):
        start = first * block_size
        length = min(count * block_size, capacity - start)
        data = reader.read(start, length)
        bytes_read += len(data)
        for i in range(count):
            index = first + i
            chunk = data[i * block_size : (i + 1) * block_size]
            if not any_nonzero(chunk):
                changes[index] = None
                zero += 1
                continue
            block_id = writer.repo.keys.block_id(chunk)
            ref: BlockRef = writer.add(block_id, chunk)
            changes[index] = ref
        done += count
        if progress is not None:
            progress(done, total)
    return TransferResult(changes, bytes_read, zero)


_ZERO = bytes(1024 * 1024)


def any_nonzero(chunk: bytes) -> bool:
    if len(chunk) == len(_ZERO):
        return chunk != _ZERO
    return chunk.count(0) != len(chunk)
