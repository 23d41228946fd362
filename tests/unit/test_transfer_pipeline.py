"""The transfer pipeline's concurrency: memory bounded by the settings, uploads in
the background up to their limit, batched dedup lookups, errors that stop the disk.

Over the in-memory fakes, with small blocks and packs so that a disk of a few MiB
makes many reads and packs. The store and the reader are instrumented: they count
what is read and what is durable, so the bounds are checked from outside the
pipeline.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from connector.adapters.state import StateStore
from connector.domain.model import Extent
from connector.errors import PermanentError
from connector.fakes import FakeDiskSource, FakeHypervisor, MemoryObjectStore
from connector.fakestate import MemoryState
from connector.pipeline.context import PipelineSettings
from connector.pipeline.restore import restore_disk
from connector.pipeline.transfer import transfer_disk
from connector.store.keys import LocalKeyProvider, generate_key_file
from connector.store.repository import Repository, UploadSlots
from tests.harness.pipeline import replicator

KiB = 1024
MiB = 1024 * KiB
BLOCK = 64 * KiB
PACK = 4 * BLOCK  # a pack closes after 4 random blocks
PER_PACK = 4
WAIT = 30.0  # seconds a stalled put waits for its company at most (a failing test only)


class Gate:
    """Shared by the instrumented reader and store: what is read, what is durable."""

    def __init__(self, total_blocks: int, uploads: int, stall: bool = True) -> None:
        self.cond = threading.Condition()
        self.stall = stall  # pack puts wait for `uploads` of them to be under way
        self.total = total_blocks
        self.uploads = uploads
        self.read = 0  # blocks returned by the reader
        self.durable = 0  # blocks in packs whose put completed
        self.active = 0  # puts of packs under way
        self.max_active = 0
        self.max_in_memory = 0
        self.puts = 0


class CountingReader:
    """A DiskReader over bytes that records how many blocks are in memory at each read."""

    def __init__(self, data: bytes, gate: Gate, fail_at: int | None = None) -> None:
        self.data = data
        self.gate = gate
        self.fail_at = fail_at

    def read(self, offset: int, length: int) -> bytes:
        if self.fail_at is not None and offset >= self.fail_at:
            raise PermanentError(f"disk read failed at offset {offset}")
        with self.gate.cond:
            self.gate.read += -(-length // BLOCK)
            in_memory = self.gate.read - self.gate.durable
            self.gate.max_in_memory = max(self.gate.max_in_memory, in_memory)
            self.gate.cond.notify_all()
        return self.data[offset : offset + length]

    def close(self) -> None:
        return None


class StallingStore:
    """A MemoryObjectStore whose pack puts wait until `uploads` of them are under way
    (or everything was read), so the pipeline is made to run ahead of its uploads."""

    def __init__(self, gate: Gate, fail_on_pack: int | None = None) -> None:
        self.inner = MemoryObjectStore()
        self.gate = gate
        self.fail_on_pack = fail_on_pack
        self.repo: Repository | None = None

    def put(self, key: str, data: bytes) -> None:
        if not key.startswith("packs/"):
            self.inner.put(key, data)
            return
        g = self.gate
        with g.cond:
            g.active += 1
            g.puts += 1
            number = g.puts
            g.max_active = max(g.max_active, g.active)
            g.cond.notify_all()
            if g.stall:
                g.cond.wait_for(lambda: g.active >= g.uploads or g.read >= g.total, WAIT)
        try:
            if number == self.fail_on_pack:
                raise PermanentError("the store refused the pack")
            self.inner.put(key, data)
            assert self.repo is not None
            blocks = len(self.repo.pack_header(key.rsplit("/", 1)[1]))
            with g.cond:
                g.durable += blocks
        finally:
            with g.cond:
                g.active -= 1
                g.cond.notify_all()

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(key, offset, length)

    def stat(self, key: str) -> int | None:
        return self.inner.stat(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def store(tmp_path: Path, gate: Gate, fail_on_pack: int | None = None):
    generate_key_file(tmp_path / "key")
    objects = StallingStore(gate, fail_on_pack)
    repo = Repository.open(
        objects, LocalKeyProvider(tmp_path / "key"), create=True, block_size=BLOCK
    )
    objects.repo = repo
    return objects, repo


def random_disk(blocks: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(blocks * BLOCK)


def run_transfer(repo, index, data, *, reads: int, uploads: int, workers: int = 3, reader=None):
    with ThreadPoolExecutor(workers) as pool, UploadSlots(uploads) as slots:
        writer = repo.pack_writer(index, PACK, uploads=slots)
        result = transfer_disk(
            reader,
            writer,
            [Extent(0, len(data))],
            len(data),
            BLOCK,
            2 * BLOCK,  # two blocks per read
            workers=pool,
            reads_in_flight=reads,
        )
    return writer, result


@pytest.mark.parametrize(("reads", "uploads"), [(1, 1), (3, 2), (6, 4)])
def test_blocks_in_memory_never_exceed_the_configured_bound(
    tmp_path: Path, reads: int, uploads: int
) -> None:
    total = 160
    data = random_disk(total)
    gate = Gate(total, uploads)
    _objects, repo = store(tmp_path, gate)
    writer, result = run_transfer(
        repo, MemoryState(), data, reads=reads, uploads=uploads, reader=CountingReader(data, gate)
    )
    # reads held (2 blocks each) + the open pack + the packs uploading or waiting a slot
    bound = reads * 2 + (uploads + 1) * PER_PACK
    assert gate.max_in_memory <= bound
    assert gate.max_in_memory > PER_PACK  # it did read ahead of the uploads
    assert gate.max_active == uploads  # as many uploads at once as allowed, no more
    assert gate.durable == total and len(writer.packs_written) == total // PER_PACK
    assert result.bytes_read == len(data) and len(result.changes) == total
    assert restored(repo, result.changes, len(data)) == data


def restored(repo: Repository, changes, capacity: int) -> bytes:
    out = bytearray(capacity)
    for index, ref in changes.items():
        if ref is None:
            continue
        header = {r.block_id: r for r in repo.pack_header(ref.pack_id)}
        assert header[ref.block_id] == ref
        blob = repo.objects.get(f"packs/{ref.pack_id[:2]}/{ref.pack_id}", ref.offset, ref.length)
        out[index * BLOCK : (index + 1) * BLOCK] = repo.open_block(ref, blob, "block")
    return bytes(out)


def test_a_failed_upload_stops_the_disk_and_raises_its_error(tmp_path: Path) -> None:
    total = 160
    data = random_disk(total)
    gate = Gate(total, 2, stall=False)
    _objects, repo = store(tmp_path, gate, fail_on_pack=2)
    with pytest.raises(PermanentError, match="the store refused the pack"):
        run_transfer(
            repo, MemoryState(), data, reads=3, uploads=2, reader=CountingReader(data, gate)
        )
    assert gate.active == 0  # no upload is left running
    assert gate.read < total  # the reads stopped: the disk was not read to its end
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]


def test_a_failed_read_stops_the_disk_after_the_uploads_under_way(tmp_path: Path) -> None:
    total = 64
    data = random_disk(total)
    gate = Gate(total, 2, stall=False)
    _objects, repo = store(tmp_path, gate)
    reader = CountingReader(data, gate, fail_at=40 * BLOCK)
    with pytest.raises(PermanentError, match=f"disk read failed at offset {40 * BLOCK}"):
        run_transfer(repo, MemoryState(), data, reads=3, uploads=2, reader=reader)
    assert gate.active == 0
    puts = gate.puts
    assert puts <= 40 // PER_PACK
    assert gate.puts == puts  # nothing uploads after the error was raised
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]


class BrokenIndex(MemoryState):
    """A block index that fails once some blocks were asked about (a worker's error)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def lookup_many(self, block_ids):
        self.asked += 1
        if self.asked == 5:
            raise RuntimeError("the block index is unreadable")
        return super().lookup_many(block_ids)


def test_an_error_in_a_worker_stops_the_disk_and_raises_it(tmp_path: Path) -> None:
    total = 160
    data = random_disk(total)
    gate = Gate(total, 2, stall=False)
    _objects, repo = store(tmp_path, gate)
    with pytest.raises(RuntimeError, match="the block index is unreadable"):
        run_transfer(
            repo, BrokenIndex(), data, reads=3, uploads=2, reader=CountingReader(data, gate)
        )
    assert gate.active == 0
    assert gate.read < total


class CountingIndex(MemoryState):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.single = 0

    def lookup(self, block_id):
        self.single += 1
        return super().lookup(block_id)

    def lookup_many(self, block_ids):
        self.batches.append(len(block_ids))
        return super().lookup_many(block_ids)


def test_the_block_index_is_asked_once_per_read_and_repeats_are_stored_once(
    tmp_path: Path,
) -> None:
    rng = random.Random(3)
    distinct = [rng.randbytes(BLOCK) for _ in range(5)]
    # 120 blocks, each one of 5 contents: read 2 at a time, by several workers at once
    picks = [rng.randrange(5) for _ in range(120)]
    data = b"".join(distinct[p] for p in picks)
    gate = Gate(120, 2)
    _objects, repo = store(tmp_path, gate)
    index = CountingIndex()
    writer, result = run_transfer(
        repo, index, data, reads=4, uploads=2, reader=CountingReader(data, gate)
    )
    assert index.single == 0
    assert len(index.batches) <= 60  # one batch per read at most (fewer once all are known)
    assert all(n <= 2 for n in index.batches)
    assert writer.blocks_new == 5 and writer.blocks_new + writer.blocks_dedup == 120
    assert restored(repo, result.changes, len(data)) == data
    # a second disk with the same contents finds every block in the index
    gate2 = Gate(120, 2)
    writer2, result2 = run_transfer(
        repo, index, data, reads=4, uploads=2, reader=CountingReader(data, gate2)
    )
    assert writer2.blocks_new == 0 and writer2.packs_written == []
    assert restored(repo, result2.changes, len(data)) == data


class ConcurrentPuts:
    """A MemoryObjectStore that records how many pack puts run at once."""

    def __init__(self) -> None:
        self.inner = MemoryObjectStore()
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.packs = 0

    @property
    def objects(self) -> dict[str, bytes]:
        return self.inner.objects

    def put(self, key: str, data: bytes) -> None:
        if key.startswith("packs/"):
            with self.lock:
                self.active += 1
                self.packs += 1
                self.max_active = max(self.max_active, self.active)
            try:
                self.inner.put(key, data)
            finally:
                with self.lock:
                    self.active -= 1
            return
        self.inner.put(key, data)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(key, offset, length)

    def stat(self, key: str) -> int | None:
        return self.inner.stat(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


def test_disks_of_a_run_share_the_upload_slots_and_restore_exactly(tmp_path: Path) -> None:
    hv = FakeHypervisor(page=2)
    uuid = hv.add_vm("two-disks", [6 * MiB, 5 * MiB])
    rng = random.Random(9)
    hv.write(uuid, 2000, 0, rng.randbytes(6 * MiB))
    hv.write(uuid, 2001, MiB, rng.randbytes(3 * MiB))
    objects = ConcurrentPuts()
    generate_key_file(tmp_path / "key")
    provider = LocalKeyProvider(tmp_path / "key")
    state = StateStore.at_path(tmp_path / "state.db")
    settings = PipelineSettings(
        pack_size=MiB, max_disks_per_vm=2, workers=2, reads_in_flight=2, uploads_in_flight=2
    )
    settings.max_read = MiB
    rep = replicator(
        hv,
        FakeDiskSource(hv),
        lambda: Repository.open(objects, provider, create=True),
        state,
        settings,
    )
    run = rep.replicate(uuid)
    assert run.state == "COMPLETED"
    assert objects.packs >= 9
    assert 1 <= objects.max_active <= 2  # both disks together: two uploads at most
    repo = Repository.open(objects, provider)
    for key in (2000, 2001):
        out = tmp_path / f"{key}.img"
        sha = restore_disk(repo, run.server_id, run.id, key, out).sha256
        assert sha == hashlib.sha256(hv.vms[uuid].disks[key].data).hexdigest()
