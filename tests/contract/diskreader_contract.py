"""The DiskReader contract: every reader, fake included, must pass this one suite.

Every implementation serves the same disk, `DISK`: a few regions of known bytes,
zeros elsewhere, and `DISK.tail` right after its capacity wherever the backing
file or export can hold more than the disk (so reading past the capacity cannot
return the tail's bytes unnoticed).

Subclass `DiskReaderContract` in a test module and provide the `reader` fixture (a
fresh reader on `DISK` per test, closed afterwards). A reader with the optional
capabilities of the port also takes their suites: `StreamingReaderContract` for a
`StreamingReader`, `AllocationAwareContract` for an `AllocationAware` reader (with
`knows_allocation = False` for one that cannot tell and answers None).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest

from connector.domain.extents import merge
from connector.domain.model import Extent
from connector.ports import AllocationAware, DiskReader, StreamingReader

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class DiskImage:
    """A disk's whole content and where its data was written."""

    data: bytes  # `capacity` bytes
    regions: tuple[Extent, ...]  # where non-zero data was written
    tail: bytes  # what a longer backing file or export holds after the disk

    @property
    def capacity(self) -> int:
        return len(self.data)


def make_disk() -> DiskImage:
    capacity = 4 * MiB
    regions = (
        Extent(0, 64 * KiB),  # the first block
        Extent(MiB + 512, 300_001),  # unaligned both ends, across 64 KiB boundaries
        Extent(2 * MiB + 100_000, 5),  # a few bytes in the middle of nowhere
        Extent(capacity - 8 * KiB, 8 * KiB),  # the very end
    )
    rng = random.Random(20261201)
    data = bytearray(capacity)
    for e in regions:
        # no zero bytes, so that a region read as zeros cannot pass
        data[e.offset : e.end] = bytes(rng.randrange(1, 256) for _ in range(e.length))
    tail = bytes([0xA5]) * (64 * KiB)
    return DiskImage(bytes(data), regions, tail)


DISK = make_disk()


class DiskReaderContract:
    @pytest.fixture
    def reader(self) -> DiskReader:
        raise NotImplementedError("a contract subclass must provide the `reader` fixture")

    def expect(self, offset: int, length: int) -> bytes:
        return DISK.data[offset : offset + length]

    # -- capabilities

    def test_runs_the_suites_of_its_optional_capabilities(self, reader: DiskReader) -> None:
        assert isinstance(reader, StreamingReader) == isinstance(self, StreamingReaderContract)
        assert isinstance(reader, AllocationAware) == isinstance(self, AllocationAwareContract)

    # -- read

    @pytest.mark.parametrize(
        ("offset", "length"),
        [(0, 4096), (4096, 64 * KiB), (MiB, MiB), (64 * KiB, 3 * MiB), (0, DISK.capacity)],
    )
    def test_reads_exact_bytes_at_aligned_offsets(
        self, reader: DiskReader, offset: int, length: int
    ) -> None:
        assert reader.read(offset, length) == self.expect(offset, length)

    @pytest.mark.parametrize(
        ("offset", "length"),
        [
            (1, 1),
            (511, 513),
            (64 * KiB - 3, 7),  # the end of the first region and the zeros after it
            (MiB + 511, 300_003),  # one byte more than the region on either side
            (12_345, 654_321),
            (2 * MiB + 100_001, 3),
        ],
    )
    def test_reads_exact_bytes_at_unaligned_offsets(
        self, reader: DiskReader, offset: int, length: int
    ) -> None:
        got = reader.read(offset, length)
        assert len(got) == length
        assert got == self.expect(offset, length)

    def test_reads_at_the_very_end(self, reader: DiskReader) -> None:
        end = DISK.capacity
        assert reader.read(end - 1, 1) == DISK.data[-1:]
        assert reader.read(end - 4096, 4096) == DISK.data[-4096:]
        assert reader.read(end - 70_003, 70_003) == DISK.data[-70_003:]

    @pytest.mark.parametrize(
        ("offset", "length"),
        [(DISK.capacity - 1, 2), (DISK.capacity, 1), (DISK.capacity + 4096, 10), (0, 5 * MiB)],
    )
    def test_a_read_past_the_capacity_is_an_error_not_short_data(
        self, reader: DiskReader, offset: int, length: int
    ) -> None:
        with pytest.raises(ValueError):
            reader.read(offset, length)
        # and the reader still works afterwards
        assert reader.read(DISK.capacity - 10, 10) == DISK.data[-10:]

    @pytest.mark.parametrize("offset", [0, 12_345, DISK.capacity])
    def test_zero_length_read_is_empty(self, reader: DiskReader, offset: int) -> None:
        assert reader.read(offset, 0) == b""

    @pytest.mark.parametrize(("offset", "length"), [(-1, 10), (0, -1), (-4096, 4096)])
    def test_negative_offset_or_length_is_an_error(
        self, reader: DiskReader, offset: int, length: int
    ) -> None:
        with pytest.raises(ValueError):
            reader.read(offset, length)

    def test_many_reads_in_a_row(self, reader: DiskReader) -> None:
        rng = random.Random(5)
        for _ in range(60):
            length = rng.choice([1, 512, 4096, 65_536, rng.randrange(1, 200_000)])
            offset = rng.randrange(0, DISK.capacity - length + 1)
            assert reader.read(offset, length) == self.expect(offset, length), (offset, length)

    # -- close

    def test_close_is_idempotent_and_a_later_read_is_an_error(self, reader: DiskReader) -> None:
        assert reader.read(0, 16) == self.expect(0, 16)
        reader.close()
        reader.close()
        with pytest.raises(ValueError):
            reader.read(0, 16)


class StreamingReaderContract(DiskReaderContract):
    """For a StreamingReader: read_extents."""

    def test_read_extents_yields_each_extent_in_the_order_given(self, reader: DiskReader) -> None:
        assert isinstance(reader, StreamingReader)
        extents = [
            Extent(MiB + 512, 300_001),
            Extent(0, 1),
            Extent(DISK.capacity - 8 * KiB, 8 * KiB),
            Extent(5, 0),
            Extent(64 * KiB - 3, 7),
            Extent(0, DISK.capacity),  # larger than any single request
            *(Extent(o, 4096) for o in range(3 * MiB, 3 * MiB + 40 * 4096, 4096)),  # many
            Extent(MiB + 512, 300_001),  # the same extent again
        ]
        # a generator: the reader may not look ahead by calling len() or indexing
        got = list(reader.read_extents(e for e in extents))
        assert [e for e, _ in got] == extents
        for extent, data in got:
            assert data == self.expect(extent.offset, extent.length), extent

    def test_read_extents_past_the_capacity_is_an_error(self, reader: DiskReader) -> None:
        assert isinstance(reader, StreamingReader)
        with pytest.raises(ValueError):
            list(reader.read_extents([Extent(0, 4096), Extent(DISK.capacity - 1, 2)]))
        assert reader.read(0, 4096) == self.expect(0, 4096)


class AllocationAwareContract(DiskReaderContract):
    """For an AllocationAware reader: allocated_extents."""

    #: False for a reader that cannot tell (it answers None: every range may hold data)
    knows_allocation: bool = True

    def test_allocated_extents_are_sorted_merged_and_cover_the_data(
        self, reader: DiskReader
    ) -> None:
        assert isinstance(reader, AllocationAware)
        extents = reader.allocated_extents()
        if not self.knows_allocation:
            assert extents is None
            return
        assert extents is not None
        assert all(e.length > 0 and e.offset >= 0 for e in extents)
        assert all(e.end <= DISK.capacity for e in extents)  # nothing of the tail
        assert extents == merge(extents)  # sorted and merged
        assert all(a.end < b.offset for a, b in itertools.pairwise(extents))
        for region in DISK.regions:
            assert any(e.offset <= region.offset and region.end <= e.end for e in extents), region
        # "everything else reads as zeros"
        position = 0
        for e in [*extents, Extent(DISK.capacity, 0)]:
            if e.offset > position:
                assert reader.read(position, e.offset - position) == bytes(e.offset - position)
            position = e.end
