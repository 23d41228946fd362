"""Throughput and ratio of zstd per level on the blocks a disk holds, to choose the default.

Builds deterministic 1 MiB blocks of the realistic mix (text-like: log lines from
a fixed vocabulary; random: incompressible, like encrypted or already compressed
data; all-zero blocks are never compressed by the connector, so they are left
out) and compresses each with every level asked for, on one core:

    python bench/zstd_levels.py [--mib 48] [--levels -3,-1,1,2,3,6] [--rounds 3]

Prints, per level and per kind of block, MiB/s of input and the stored size as a
share of the input, then the mix (half text-like, half random, as in the
benchmark's disk without its zeros). "raw-check" is the connector's way with a
block: a sample is compressed first, and a block whose sample does not shrink
is stored raw without compressing the rest (connector.store.keys).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connector.store.keys import BlockCompressor

MiB = 1024 * 1024


def text_corpus(rng: random.Random, size: int = 8 * MiB) -> bytes:
    """Log-like lines: time stamps, host names, words of a fixed vocabulary, hex ids."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(2000)]
    lines, n = [], 0
    while n < size:
        line = (
            f"2026-11-{rng.randint(1, 30):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
            f" host{rng.randint(1, 40)} {' '.join(rng.choices(words, k=rng.randint(4, 14)))}"
            f" id={rng.getrandbits(32):08x}\n"
        )
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()


def text_block(rng: random.Random, corpus: bytes) -> bytes:
    """1 MiB of slices of the corpus at random places: compresses like text, never dedups."""
    parts, n = [], 0
    while n < MiB:
        offset = rng.randrange(len(corpus) - 8192)
        length = rng.randint(1024, 8192)
        parts.append(corpus[offset : offset + length])
        n += length
    return b"".join(parts)[:MiB]


def measure(blocks: list[bytes], compress: object, rounds: int) -> tuple[float, float]:
    """(MiB/s, stored share) of compressing every block, the median of `rounds`."""
    speeds = []
    stored = 0
    for _ in range(rounds):
        start = time.perf_counter()
        stored = sum(len(compress(b)) for b in blocks)  # type: ignore[operator]
        speeds.append(len(blocks) / (time.perf_counter() - start))
    return statistics.median(speeds), stored / (len(blocks) * MiB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=48, help="MiB of each kind of block")
    parser.add_argument("--levels", default="-3,-1,1,2,3,6")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(12)
    corpus = text_corpus(rng)
    kinds = {
        "text-like": [text_block(rng, corpus) for _ in range(args.mib)],
        "random": [rng.randbytes(MiB) for _ in range(args.mib)],
    }
    pairs = zip(kinds["text-like"], kinds["random"], strict=True)
    kinds["mix"] = [b for pair in pairs for b in pair]
    print(f"{'level':>10} " + " ".join(f"{k + ' MiB/s':>16} {'stored':>7}" for k in kinds))
    for level in (int(x) for x in args.levels.split(",")):
        cells = []
        for name in ("plain", "raw-check"):
            if name == "plain":
                fn = zstandard.ZstdCompressor(level=level).compress
            else:
                fn = BlockCompressor(level).compress
            row = [measure(blocks, fn, args.rounds) for blocks in kinds.values()]
            cells.append((name, row))
        for name, row in cells:
            label = f"{level}" if name == "plain" else f"{level}+check"
            print(f"{label:>10} " + " ".join(f"{s:>16.0f} {r:>7.1%}" for s, r in row))


if __name__ == "__main__":
    main()
