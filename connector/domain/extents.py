"""Extent arithmetic: merging, clipping and widening to block boundaries."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from connector.domain.model import Extent


def merge(extents: Iterable[Extent]) -> list[Extent]:
    """Sort and merge overlapping or touching extents; drop empty ones."""
    out: list[Extent] = []
    for e in sorted((e for e in extents if e.length > 0), key=lambda e: e.offset):
        if out and e.offset <= out[-1].end:
            last = out[-1]
            out[-1] = Extent(last.offset, max(last.end, e.end) - last.offset)
        else:
            out.append(e)
    return out


def clip(extents: Iterable[Extent], capacity: int) -> list[Extent]:
    """Keep only the parts of `extents` inside [0, capacity)."""
    out: list[Extent] = []
    for e in extents:
        start, end = max(e.offset, 0), min(e.end, capacity)
        if end > start:
            out.append(Extent(start, end - start))
    return out


def blocks_touched(extents: Iterable[Extent], block_size: int, capacity: int) -> list[int]:
    """Indices of the blocks that any extent touches, ascending, within the disk."""
    nblocks = block_count(capacity, block_size)
    seen: set[int] = set()
    for e in clip(extents, capacity):
        first = e.offset // block_size
        last = (e.end - 1) // block_size
        seen.update(range(first, min(last, nblocks - 1) + 1))
    return sorted(seen)


def block_count(capacity: int, block_size: int) -> int:
    return (capacity + block_size - 1) // block_size


def block_extent(index: int, block_size: int, capacity: int) -> Extent:
    """The byte range of block `index` (the last block may be short)."""
    start = index * block_size
    return Extent(start, min(block_size, capacity - start))


def runs(indices: Iterable[int], max_run: int) -> Iterator[tuple[int, int]]:
    """Group ascending block indices into (first, count) runs of consecutive blocks."""
    first = -1
    count = 0
    for i in indices:
        if count and i == first + count and count < max_run:
            count += 1
            continue
        if count:
            yield first, count
        first, count = i, 1
    if count:
        yield first, count
