"""Deterministic test disks: the same seed gives the same bytes on every machine.

- `make_mix_image`: the realistic mix, in runs of 1-32 MiB: 40% never written
  (holes), 30% text-like (words from a fixed vocabulary: compresses about 3-4x,
  but no two blocks alike, so deduplication cannot cheat), 30% random.
- `change_rounds`: incremental rounds, each rewriting a share of the blocks in
  clusters of 4-16 consecutive blocks (half text-like, half random).
- `make_sparse_pair`: a large sparse disk holding `data` bytes in 16 MiB regions
  spread over its capacity, and a dense disk holding the very same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MiB = 1024 * 1024
BLOCK = MiB  # the connector's block size

HOLE, TEXT, RANDOM = "hole", "text", "random"


def _vocabulary(seed: int) -> np.ndarray:
    """65,536 eight-byte tokens: a word of 2-7 letters, then spaces or punctuation."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", dtype=np.uint8)
    # English letter frequencies, in the order of `letters`
    freq = "12 9 8 7.5 7 6.7 6.3 6 6 4.3 4 2.8 2.8 2.4 2.4 2.2 2 2 1.9 1.5 1 0.8 0.2 0.2 0.1 0.1"
    weights = np.array([float(w) for w in freq.split(" ")])
    tokens = np.full((65536, 8), ord(" "), dtype=np.uint8)
    lengths = rng.integers(2, 8, size=65536)
    picks = rng.choice(letters, size=(65536, 7), p=weights / weights.sum())
    for n in range(2, 8):
        rows = lengths == n
        tokens[rows, :n] = picks[rows, :n]
    tail = rng.random(65536)
    tokens[(tail < 0.06) & (lengths < 7), 7] = ord(",")
    tokens[(tail > 0.97) & (lengths < 7), 7] = ord("\n")
    return tokens


_VOCAB: dict[int, np.ndarray] = {}


def text_bytes(rng: np.random.Generator, length: int, seed: int = 1) -> bytes:
    vocab = _VOCAB.setdefault(seed, _vocabulary(seed))
    idx = rng.integers(0, len(vocab), size=-(-length // 8))
    return vocab[idx].tobytes()[:length]


def random_bytes(rng: np.random.Generator, length: int) -> bytes:
    return rng.bytes(length)


def content(rng: np.random.Generator, kind: str, length: int) -> bytes:
    return text_bytes(rng, length) if kind == TEXT else random_bytes(rng, length)


@dataclass(frozen=True)
class Layout:
    capacity: int
    extents: tuple[tuple[int, int, str], ...]  # (offset, length, kind) of the data

    @property
    def data_bytes(self) -> int:
        return sum(length for _, length, _ in self.extents)


def _write_extents(path: Path, capacity: int, extents: Iterator[tuple[int, int, bytes]]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, capacity)
        for offset, _length, data in extents:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def make_mix_image(path: Path, capacity: int, seed: int) -> Layout:
    """The realistic mix (40% holes, 30% text-like, 30% random) in 1-32 MiB runs."""
    rng = np.random.default_rng(seed)
    segments: list[tuple[int, int, str]] = []
    offset = 0
    while offset < capacity:
        length = min(int(rng.integers(1, 33)) * MiB, capacity - offset)
        kind = str(rng.choice([HOLE, TEXT, RANDOM], p=[0.4, 0.3, 0.3]))
        if kind != HOLE:
            segments.append((offset, length, kind))
        offset += length

    def chunks() -> Iterator[tuple[int, int, bytes]]:
        for off, length, kind in segments:
            for start in range(off, off + length, 16 * MiB):
                n = min(16 * MiB, off + length - start)
                yield start, n, content(rng, kind, n)

    _write_extents(path, capacity, chunks())
    return Layout(capacity, tuple(segments))


@dataclass(frozen=True)
class Cluster:
    offset: int
    length: int
    kind: str
    seed: int

    def data(self) -> bytes:
        return content(np.random.default_rng(self.seed), self.kind, self.length)


def change_rounds(capacity: int, seed: int, rounds: int, share: float) -> list[list[Cluster]]:
    """Per round, clusters of 4-16 whole blocks covering `share` of the disk's blocks."""
    rng = np.random.default_rng(seed)
    nblocks = capacity // BLOCK
    out: list[list[Cluster]] = []
    for r in range(rounds):
        want = max(1, round(nblocks * share))
        taken: set[int] = set()
        clusters: list[Cluster] = []
        while len(taken) < want:
            n = min(int(rng.integers(4, 17)), want - len(taken), nblocks)
            start = int(rng.integers(0, nblocks - n + 1))
            blocks = range(start, start + n)
            if any(b in taken for b in blocks):
                continue
            taken.update(blocks)
            kind = TEXT if len(clusters) % 2 == 0 else RANDOM
            clusters.append(Cluster(start * BLOCK, n * BLOCK, kind, seed * 1000 + r * 100 + n))
        clusters.sort(key=lambda c: c.offset)
        out.append(clusters)
    return out


def apply_round(path: Path, clusters: list[Cluster]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for c in clusters:
            os.pwrite(fd, c.data(), c.offset)
    finally:
        os.close(fd)


def make_sparse_pair(
    sparse: Path, dense: Path, capacity: int, data: int, seed: int
) -> tuple[Layout, Layout]:
    """A `capacity` disk holding `data` bytes in 16 MiB regions spread evenly, and a
    `data`-sized disk holding the same bytes back to back."""
    region = min(16 * MiB, data)
    count = data // region
    stride = capacity // count
    rng = np.random.default_rng(seed)
    blobs = [content(rng, TEXT if i % 2 == 0 else RANDOM, region) for i in range(count)]
    spread = [(i * stride, region, blobs[i]) for i in range(count)]
    packed = [(i * region, region, blobs[i]) for i in range(count)]
    _write_extents(sparse, capacity, iter(spread))
    _write_extents(dense, count * region, iter(packed))
    kinds = [TEXT if i % 2 == 0 else RANDOM for i in range(count)]
    return (
        Layout(capacity, tuple((o, n, k) for (o, n, _), k in zip(spread, kinds, strict=True))),
        Layout(
            count * region, tuple((o, n, k) for (o, n, _), k in zip(packed, kinds, strict=True))
        ),
    )


def allocated_bytes(path: Path) -> int:
    """Bytes of data (not holes) in a file, from SEEK_DATA/SEEK_HOLE."""
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
    finally:
        os.close(fd)
    return total
