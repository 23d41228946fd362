"""Blocks that do not compress are stored raw, in a zstd frame of Raw blocks; text-like
ones are compressed; both, and blobs of stores written before (plain zstd), open."""

from __future__ import annotations

import os
import random

import pytest
import zstandard

from connector.errors import IntegrityError
from connector.store.keys import NONCE_SIZE, BlockCompressor, StoreKeys, raw_frame

MiB = 1024 * 1024


def text_like(rng: random.Random, size: int = MiB) -> bytes:
    words = [rng.randbytes(4).hex() for _ in range(300)]
    out = " ".join(rng.choice(words) for _ in range(size // 6)).encode()
    return out[:size]


def frame_of(keys: StoreKeys, blob: bytes, aad: bytes) -> bytes:
    """The zstd frame inside a sealed blob."""
    frame: bytes = keys._aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
    return frame


def first_block_type(frame: bytes) -> int:
    """Block_Type of the frame's first block (0 Raw, 1 RLE, 2 Compressed)."""
    assert frame[:4] == b"\x28\xb5\x2f\xfd"
    descriptor = frame[4]
    fcs = [1 if descriptor & 0x20 else 0, 2, 4, 8][descriptor >> 6]
    window = 0 if descriptor & 0x20 else 1
    header = frame[5 + window + fcs : 5 + window + fcs + 3]
    return (int.from_bytes(header, "little") >> 1) & 3


@pytest.fixture
def keys() -> StoreKeys:
    return StoreKeys(os.urandom(32))


def test_a_random_block_is_stored_raw_and_opens(keys: StoreKeys) -> None:
    plain = random.Random(1).randbytes(MiB)
    blob = keys.seal(plain, b"id")
    frame = frame_of(keys, blob, b"id")
    assert first_block_type(frame) == 0  # Raw: no compressed pass was kept
    assert len(frame) <= len(plain) + 9 + 3 * 8  # header and 8 block headers
    assert keys.open(blob, b"id", "block") == plain


def test_a_text_like_block_is_compressed_and_opens(keys: StoreKeys) -> None:
    plain = text_like(random.Random(2))
    blob = keys.seal(plain, b"id")
    frame = frame_of(keys, blob, b"id")
    assert first_block_type(frame) == 2
    assert len(frame) < len(plain) * 0.8
    assert keys.open(blob, b"id", "block") == plain


def test_the_sample_decides_without_compressing_the_whole_block() -> None:
    rng = random.Random(3)
    comp = BlockCompressor(3)
    # random where the sample is taken, text elsewhere: stored raw, on the sample's word
    plain = bytearray(text_like(rng))
    plain[: 32 * 1024] = rng.randbytes(32 * 1024)
    plain[MiB // 2 : MiB // 2 + 32 * 1024] = rng.randbytes(32 * 1024)
    out = comp.compress(bytes(plain))
    assert comp.raw == 1 and comp.compressed == 0
    assert zstandard.ZstdDecompressor().decompress(out) == plain
    # a small input is not sampled: compressed when that pays, raw when it does not
    assert comp.compress(b"a" * 1000) != raw_frame(b"a" * 1000)
    noise = rng.randbytes(1000)
    assert comp.compress(noise) == raw_frame(noise)
    assert comp.raw == 2 and comp.compressed == 1


@pytest.mark.parametrize(
    "size", [0, 1, 255, 256, 65535, 65791, 65792, 131072, 131073, MiB, MiB + 7, 3 * MiB]
)
def test_raw_frames_of_every_size_read_back_with_any_zstd_decoder(size: int) -> None:
    plain = random.Random(size).randbytes(size)
    frame = raw_frame(plain)
    assert zstandard.frame_content_size(frame) == size
    assert zstandard.ZstdDecompressor().decompress(frame) == plain


def test_blobs_of_older_stores_plain_zstd_at_level_3_still_open(keys: StoreKeys) -> None:
    rng = random.Random(4)
    for plain in (rng.randbytes(MiB), text_like(rng), b"manifest"):
        nonce = os.urandom(NONCE_SIZE)
        old = zstandard.ZstdCompressor(level=3).compress(plain)  # how blocks were sealed
        blob = nonce + keys._aead.encrypt(nonce, old, b"id")
        assert keys.open(blob, b"id", "block") == plain


def test_a_damaged_raw_block_is_refused(keys: StoreKeys) -> None:
    blob = bytearray(keys.seal(random.Random(5).randbytes(MiB), b"id"))
    blob[500] ^= 1
    with pytest.raises(IntegrityError, match="failed authentication"):
        keys.open(bytes(blob), b"id", "block 7")


def test_the_level_is_the_keys_setting_and_any_level_reads_back() -> None:
    master = os.urandom(32)
    plain = text_like(random.Random(6))
    fast, small = StoreKeys(master, zstd_level=-5), StoreKeys(master, zstd_level=9)
    a, b = fast.seal(plain, b"id"), small.seal(plain, b"id")
    assert a[NONCE_SIZE:] != b[NONCE_SIZE:] and fast.zstd_level == -5
    assert small.open(a, b"id", "x") == plain and fast.open(b, b"id", "x") == plain
