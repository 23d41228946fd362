"""The replica store in an object store: config, packs, disk manifests, run commits.

Layout under the configured prefix (see docs/format.md):
    config                                   store format, block size, wrapped master key
    packs/<id[:2]>/<id>                      sealed blocks, then a sealed pack header
    servers/<server id>                      sealed server record: the VM's instance UUID and name
    runs/<server id>/<run id>/disk-<key>     sealed disk manifest
    runs/<server id>/<run id>/commit         sealed run record, written last
    locks/<run id>                           sealed lock of a run in flight
    condemned/<purge id>                     sealed list of packs a purge means to delete

Objects are written once and never modified. A run exists only when its
commit object exists; the commit is written after every manifest it names,
and each manifest after every pack it names.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from connector.domain.ids import (
    check_disk_key,
    check_pack_id,
    check_purge_id,
    check_run_id,
    check_server_id,
)
from connector.domain.manifest import BlockMap, BlockRef, DiskManifest, apply_changes
from connector.domain.times import iso
from connector.errors import IntegrityError, NotFoundError, StoreFormatError
from connector.ports import BlockIndex, ObjectStore
from connector.store.keys import DEFAULT_ZSTD_LEVEL, KEY_CONTEXT_PREFIX, KeyProvider, StoreKeys

STORE_FORMAT = "connector-replica-store"
STORE_VERSION = 1
DEFAULT_BLOCK_SIZE = 1024 * 1024
DEFAULT_PACK_SIZE = 32 * 1024 * 1024
PACK_MAGIC = b"CNP1"
_PACK_TRAILER = struct.Struct("<I4s")  # sealed header length, magic
_PACK_ENTRY = struct.Struct("<32sQII")  # block id, offset, length, raw length


@dataclass(frozen=True)
class StoreConfig:
    """The store's `config` object: its id, block size and wrapped master key."""

    store_id: str
    block_size: int
    key: dict[str, Any]
    created_at: str


# The key builders check every id (connector.domain.ids), so that no malformed id,
# from the command line or anywhere else, names an object outside its place.


def pack_key(pack_id: str) -> str:
    check_pack_id(pack_id)
    return f"packs/{pack_id[:2]}/{pack_id}"


def server_key(server_id: str) -> str:
    return f"servers/{server_id}"


def manifest_key(server_id: str, run_id: str, disk_key: int) -> str:
    check_server_id(server_id)
    check_run_id(run_id)
    check_disk_key(disk_key)
    return f"runs/{server_id}/{run_id}/disk-{disk_key}"


def commit_key(server_id: str, run_id: str) -> str:
    check_server_id(server_id)
    check_run_id(run_id)
    return f"runs/{server_id}/{run_id}/commit"


def lock_key(run_id: str) -> str:
    check_run_id(run_id)
    return f"locks/{run_id}"


def condemned_key(purge_id: str) -> str:
    check_purge_id(purge_id)
    return f"condemned/{purge_id}"


@dataclass(frozen=True)
class RunLock:
    """Written when a run starts, before its first dedup lookup; removed when it ends."""

    run_id: str
    server_id: str
    started_at: str  # ISO 8601 UTC, seconds
    host: str
    pid: int
    base_runs: tuple[str, ...] = ()  # runs whose maps this run may build on

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "server_id": self.server_id,
            "started_at": self.started_at,
            "host": self.host,
            "pid": self.pid,
            "base_runs": list(self.base_runs),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RunLock:
        return cls(
            run_id=doc["run_id"],
            server_id=doc["server_id"],
            started_at=doc["started_at"],
            host=doc["host"],
            pid=int(doc["pid"]),
            base_runs=tuple(doc.get("base_runs", ())),
        )


@dataclass(frozen=True)
class ServerRecord:
    """Which VM a server id names: written once, before the server's first commit."""

    server_id: str
    vm_uuid: str  # the VM's instance UUID
    name: str  # the VM's name when the record was written
    created_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "server_id": self.server_id,
            "vm_uuid": self.vm_uuid,
            "name": self.name,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ServerRecord:
        return cls(
            server_id=str(doc["server_id"]),
            vm_uuid=str(doc["vm_uuid"]),
            name=str(doc["name"]),
            created_at=str(doc["created_at"]),
        )


@dataclass(frozen=True)
class CondemnedRecord:
    """Packs that no committed run referenced at `created_at`, and the locks that existed then."""

    purge_id: str
    created_at: str
    locks: tuple[str, ...]
    packs: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "purge_id": self.purge_id,
            "created_at": self.created_at,
            "locks": list(self.locks),
            "packs": list(self.packs),
        }


@dataclass
class RunObjects:
    """What the store holds for one run: its commit, and its disk manifests by disk key."""

    commit: bool = False
    disks: list[int] = field(default_factory=list)


def now_iso() -> str:
    """Now in UTC as ISO 8601, to the second."""
    return iso()


class Repository:
    """Reads and writes one replica store."""

    def __init__(self, objects: ObjectStore, config: StoreConfig, keys: StoreKeys) -> None:
        self.objects = objects
        self.config = config
        self.keys = keys
        self.block_size = config.block_size
        self.zero_block_id = keys.block_id(bytes(self.block_size))

    # -- opening -----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        objects: ObjectStore,
        provider: KeyProvider,
        create: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
    ) -> Repository:
        """Open the store; with `create`, initialise it when it has no config yet.

        `zstd_level` is the level this connector compresses what it writes at;
        any level reads back the same (it is not part of the store's format).
        """
        try:
            raw = objects.get("config")
        except NotFoundError:
            if not create:
                raise NotFoundError(
                    "no replica store at this bucket and prefix (no config object); "
                    "run a replication first, or check [s3] bucket and prefix"
                ) from None
            return cls._create(objects, provider, block_size, zstd_level)
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise StoreFormatError(f"the store's config object is not JSON: {exc}") from exc
        if doc.get("format") != STORE_FORMAT:
            raise StoreFormatError("the object named config at this prefix is not a replica store")
        if doc.get("version") != STORE_VERSION:
            raise StoreFormatError(
                f"replica store format version {doc.get('version')} is not supported "
                f"(this connector reads version {STORE_VERSION}); upgrade the connector"
            )
        config = StoreConfig(doc["store_id"], doc["block_size"], doc["key"], doc["created_at"])
        master = provider.unwrap(config.key, _key_context(config.store_id))
        return cls(objects, config, StoreKeys(master, zstd_level))

    @classmethod
    def _create(
        cls, objects: ObjectStore, provider: KeyProvider, block_size: int, zstd_level: int
    ) -> Repository:
        """Make a new store: a random id, a master key wrapped by `provider`, the config object."""
        store_id = os.urandom(16).hex()
        master, wrapped = provider.new_master(_key_context(store_id))
        config = StoreConfig(store_id, block_size, wrapped, now_iso())
        doc = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "store_id": config.store_id,
            "block_size": config.block_size,
            "key": config.key,
            "created_at": config.created_at,
        }
        objects.put("config", json.dumps(doc, indent=2).encode())
        return cls(objects, config, StoreKeys(master, zstd_level))

    # -- blocks ------------------------------------------------------------------

    def zero_id(self, length: int) -> bytes:
        """The block id of `length` zero bytes (zero blocks are not stored)."""
        if length == self.block_size:
            return self.zero_block_id
        return self.keys.block_id(bytes(length))

    def open_block(self, ref: BlockRef, blob: bytes, what: str) -> bytes:
        """Decrypt a block's sealed bytes and check them against its id (IntegrityError)."""
        plain = self.keys.open(blob, ref.block_id, what)
        if self.keys.block_id(plain) != ref.block_id:
            raise IntegrityError(f"{what} does not match its hash")
        return plain

    def pack_header(self, pack_id: str) -> list[BlockRef]:
        """The block entries of a pack, read from its sealed header.

        The trailer (header length, magic) must be whole and the header must
        authenticate against the pack's id: a damaged one is a StoreFormatError
        or an IntegrityError that names the pack, never garbage entries.
        """
        key = pack_key(pack_id)
        size = self.objects.stat(key)
        if size is None:
            raise NotFoundError(f"pack {pack_id} is missing from the store")
        if size < _PACK_TRAILER.size:
            raise StoreFormatError(f"pack {pack_id} is {size} bytes, too short for a trailer")
        tail = self.objects.get(key, size - _PACK_TRAILER.size, _PACK_TRAILER.size)
        hlen, magic = _PACK_TRAILER.unpack(tail)
        if magic != PACK_MAGIC:
            raise StoreFormatError(f"pack {pack_id} has no valid trailer (its magic is damaged)")
        start = size - _PACK_TRAILER.size - hlen
        if start < 0:
            raise StoreFormatError(
                f"pack {pack_id} has a damaged trailer: it gives a header of {hlen} bytes "
                f"in a pack of {size}"
            )
        sealed = self.objects.get(key, start, hlen)
        plain = self.keys.open(
            sealed, b"pack-header:" + pack_id.encode(), f"header of pack {pack_id}"
        )
        if len(plain) % _PACK_ENTRY.size:
            raise StoreFormatError(f"the header of pack {pack_id} is not a list of entries")
        return [
            BlockRef(bytes(bid), pack_id, off, length)
            for bid, off, length, _raw in _PACK_ENTRY.iter_unpack(plain)
        ]

    # -- server records ------------------------------------------------------------

    def ensure_server(self, record: ServerRecord) -> bool:
        """Write the server's record unless it has one; True when it was written."""
        key = server_key(record.server_id)
        if self.objects.stat(key) is not None:
            return False
        self._put_sealed(key, record.to_json())
        return True

    def server_ids(self) -> list[str]:
        """The server ids that have a record in the store."""
        return [key.removeprefix("servers/") for key in self.objects.list("servers/")]

    def read_server(self, server_id: str) -> ServerRecord:
        """The record of one server (NotFoundError if it has none)."""
        key = server_key(server_id)
        doc = self._get_sealed(key, f"server record {key}")
        record = ServerRecord.from_json(doc)
        if record.server_id != server_id:
            raise IntegrityError(f"server record {key} names server {record.server_id}")
        return record

    def delete_server(self, server_id: str) -> None:
        """Delete a server's record (once none of its runs is left)."""
        self.objects.delete(server_key(server_id))

    # -- manifests and commits ---------------------------------------------------

    def write_manifest(self, manifest: DiskManifest) -> str:
        """Seal and write a disk manifest; returns its key."""
        key = manifest_key(manifest.server_id, manifest.run_id, manifest.disk_key)
        self.objects.put(key, self.keys.seal(manifest.encode(), key.encode()))
        return key

    def read_manifest(self, server_id: str, run_id: str, disk_key: int) -> DiskManifest:
        """Read and open the manifest of one disk of one run (NotFoundError if absent)."""
        key = manifest_key(server_id, run_id, disk_key)
        try:
            blob = self.objects.get(key)
        except NotFoundError:
            raise NotFoundError(f"run {run_id} has no manifest for disk {disk_key}") from None
        return DiskManifest.decode(self.keys.open(blob, key.encode(), f"manifest {key}"))

    def resolve_map(self, manifest: DiskManifest) -> dict[int, BlockRef | None]:
        """The full block map of a manifest, following its chain of base runs."""
        chain = [manifest]
        seen = {manifest.run_id}
        while chain[-1].base_run is not None:
            base_run = chain[-1].base_run
            if base_run in seen:
                raise StoreFormatError(f"manifest chain of disk {manifest.disk_key} loops")
            seen.add(base_run)
            chain.append(self.read_manifest(manifest.server_id, base_run, manifest.disk_key))
        full: BlockMap = {}
        for m in reversed(chain):
            full = apply_changes(full, m.entries)
        return full

    def write_commit(self, server_id: str, run_id: str, record: Mapping[str, Any]) -> None:
        """Seal and write a run's record: from then on the run exists."""
        key = commit_key(server_id, run_id)
        body = json.dumps(dict(record), sort_keys=True).encode()
        self.objects.put(key, self.keys.seal(body, key.encode()))

    def read_commit(self, server_id: str, run_id: str) -> dict[str, Any]:
        """The record of a committed run (NotFoundError if it was not committed)."""
        key = commit_key(server_id, run_id)
        try:
            blob = self.objects.get(key)
        except NotFoundError:
            raise NotFoundError(
                f"run {run_id} was not committed to the store (it failed or is still running)"
            ) from None
        doc: dict[str, Any] = json.loads(self.keys.open(blob, key.encode(), f"run record {key}"))
        return doc

    def committed_runs(self, server_id: str) -> Iterator[str]:
        """The ids of the server's runs that have a commit object."""
        prefix = f"runs/{server_id}/"
        for key in self.objects.list(prefix):
            if key.endswith("/commit"):
                yield key[len(prefix) :].split("/", 1)[0]

    def scan_runs(self, server_id: str | None = None) -> dict[str, dict[str, RunObjects]]:
        """Every run object in the store (or of one server): server id -> run id -> objects."""
        prefix = "runs/" if server_id is None else f"runs/{server_id}/"
        out: dict[str, dict[str, RunObjects]] = {}
        for key in self.objects.list(prefix):
            parts = key.split("/")
            if len(parts) != 4:
                continue
            _, server, run, name = parts
            objs = out.setdefault(server, {}).setdefault(run, RunObjects())
            if name == "commit":
                objs.commit = True
            elif name.startswith("disk-") and name[5:].isdigit():
                objs.disks.append(int(name[5:]))
        return out

    def delete_commit(self, server_id: str, run_id: str) -> None:
        """The run stops existing: restore and verify no longer see it."""
        self.objects.delete(commit_key(server_id, run_id))

    def delete_manifest(self, server_id: str, run_id: str, disk_key: int) -> None:
        """Delete the manifest of one disk of one run."""
        self.objects.delete(manifest_key(server_id, run_id, disk_key))

    def pack_ids(self) -> Iterator[str]:
        """The ids of every pack object in the store."""
        for key in self.objects.list("packs/"):
            parts = key.split("/")
            if len(parts) == 3 and parts[1] == parts[2][:2]:
                yield parts[2]

    # -- locks of runs in flight, and condemned packs ------------------------------

    def write_lock(self, lock: RunLock) -> None:
        """Record a run in flight, so that purge keeps the packs it may reuse."""
        self._put_sealed(lock_key(lock.run_id), lock.to_json())

    def remove_lock(self, run_id: str) -> None:
        """Remove the lock of a run that ended."""
        self.objects.delete(lock_key(run_id))

    def lock_ids(self) -> list[str]:
        """The run ids of every lock in the store."""
        return [key.removeprefix("locks/") for key in self.objects.list("locks/")]

    def read_lock(self, run_id: str) -> RunLock:
        """Read and open the lock of a run."""
        return RunLock.from_json(self._get_sealed(lock_key(run_id), f"lock of run {run_id}"))

    def write_condemned(self, record: CondemnedRecord) -> None:
        """Record the packs a purge means to delete, before it deletes any."""
        self._put_sealed(condemned_key(record.purge_id), record.to_json())

    def condemned_records(self) -> list[CondemnedRecord]:
        """Every purge record in the store."""
        out = []
        for key in self.objects.list("condemned/"):
            doc = self._get_sealed(key, f"purge record {key}")
            out.append(
                CondemnedRecord(
                    purge_id=doc["purge_id"],
                    created_at=doc["created_at"],
                    locks=tuple(doc["locks"]),
                    packs=tuple(doc["packs"]),
                )
            )
        return out

    def remove_condemned(self, purge_id: str) -> None:
        """Remove a purge record whose packs are settled."""
        self.objects.delete(condemned_key(purge_id))

    def _put_sealed(self, key: str, doc: Mapping[str, Any]) -> None:
        """Seal a JSON document under its key and write it."""
        body = json.dumps(dict(doc), sort_keys=True).encode()
        self.objects.put(key, self.keys.seal(body, key.encode()))

    def _get_sealed(self, key: str, what: str) -> dict[str, Any]:
        """Read and open a sealed JSON document."""
        doc: dict[str, Any] = json.loads(self.keys.open(self.objects.get(key), key.encode(), what))
        return doc

    def pack_writer(
        self,
        index: BlockIndex,
        pack_size: int = DEFAULT_PACK_SIZE,
        on_pack: Callable[[str, int, list[BlockRef]], None] | None = None,
        uploads: UploadSlots | None = None,
    ) -> PackWriter:
        """A PackWriter that deduplicates against `index` and calls `on_pack` per uploaded pack.

        With `uploads`, full packs are uploaded in the background, in those slots;
        without, each is uploaded before `append` returns.
        """
        return PackWriter(self, index, pack_size, on_pack, uploads)


class UploadSlots:
    """Pack uploads in the background, at most `limit` at once.

    `submit` waits for a free slot, so a writer that fills packs faster than
    they upload is held back: at most `limit` packs are in flight, whatever the
    size of the disk. One set of slots may serve several writers (the disks of
    a run). `close` waits for the uploads under way.
    """

    def __init__(self, limit: int, name: str = "pack-upload") -> None:
        if limit < 1:
            raise ValueError("uploads in flight must be at least 1")
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)
        self._pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix=name)

    def submit(self, fn: Callable[[], None]) -> Future[None]:
        self._free.acquire()
        try:
            future = self._pool.submit(fn)
        except BaseException:
            self._free.release()
            raise
        future.add_done_callback(lambda _f: self._free.release())
        return future

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> UploadSlots:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PackWriter:
    """Deduplicates blocks and appends sealed ones to packs; uploads each pack when full.

    Several threads may `claim` at once (the pipeline's workers); `append` and
    `flush` are called by one thread, in the order the blocks are to be packed.
    The ref of a stored block is known once it is appended (`ref`), and is
    durable only after the pack holding it is uploaded, which `flush`
    guarantees for all of them: a manifest naming them is written after it.
    """

    def __init__(
        self,
        repo: Repository,
        index: BlockIndex,
        pack_size: int,
        on_pack: Callable[[str, int, list[BlockRef]], None] | None,
        uploads: UploadSlots | None = None,
    ) -> None:
        self.repo = repo
        self.index = index
        self.pack_size = pack_size
        self.on_pack = on_pack
        self.uploads = uploads
        self._lock = threading.Lock()
        self._claimed: set[bytes] = set()  # new blocks this writer stores (or stored)
        self._refs: dict[bytes, BlockRef] = {}  # their refs, once appended
        self._buf: list[bytes] = []
        self._entries: list[tuple[BlockRef, int]] = []
        self._size = 0
        self._pack_id = _new_pack_id()
        self._in_flight: list[Future[None]] = []
        self.bytes_uploaded = 0  # whole packs written
        self.bytes_stored = 0  # sealed bytes of new blocks
        self.blocks_new = 0
        self.blocks_dedup = 0
        self.packs_written: list[str] = []

    def claim(self, block_ids: Sequence[bytes]) -> tuple[dict[bytes, BlockRef], list[bytes]]:
        """Which of these blocks are known, and which the caller must seal and append.

        The block index is asked once for all of them. Returns the refs of the
        blocks stored before this writer, and the ids this caller claims: new
        ones no other caller of this writer claimed first, each once. The rest
        (claimed by another caller, or twice in `block_ids`) are this writer's,
        and `ref` gives their refs after `flush`.
        """
        wanted = list(dict.fromkeys(block_ids))
        with self._lock:
            ask = [b for b in wanted if b not in self._claimed]
        known = self.index.lookup_many(ask) if ask else {}
        mine: list[bytes] = []
        with self._lock:
            for block_id in block_ids:
                if block_id in known or block_id in self._claimed:
                    self.blocks_dedup += 1
                else:
                    self._claimed.add(block_id)
                    mine.append(block_id)
                    self.blocks_new += 1
        return known, mine

    def append(self, block_id: bytes, sealed: bytes, raw_length: int) -> BlockRef:
        """Put a claimed block, sealed, into the open pack; upload the pack when it is full."""
        ref = BlockRef(block_id, self._pack_id, self._size, len(sealed))
        self._buf.append(sealed)
        self._entries.append((ref, raw_length))
        self._size += len(sealed)
        self.bytes_stored += len(sealed)
        with self._lock:
            self._refs[block_id] = ref
        if self._size >= self.pack_size:
            self._close_pack()
        return ref

    def ref(self, block_id: bytes) -> BlockRef:
        """The ref of a block this writer appended."""
        with self._lock:
            return self._refs[block_id]

    def check(self) -> None:
        """Raise the error of a background upload that failed, if one did."""
        done = [f for f in self._in_flight if f.done()]
        for future in done:
            self._in_flight.remove(future)
            future.result()

    def flush(self) -> None:
        """Upload the open pack and wait for every upload; afterwards every ref is durable.

        The first failed upload's error is raised, after all of them ended.
        """
        if self._entries:
            self._close_pack()
        futures, self._in_flight = self._in_flight, []
        wait(futures)
        for future in futures:
            future.result()

    def abandon(self) -> None:
        """Wait for the uploads under way and drop their outcome (the disk failed)."""
        futures, self._in_flight = self._in_flight, []
        wait(futures)
        self._buf, self._entries, self._size = [], [], 0

    def _close_pack(self) -> None:
        """Seal the open pack's header and upload it (in the background with slots)."""
        pack_id = self._pack_id
        entries = self._entries
        header = b"".join(
            _PACK_ENTRY.pack(ref.block_id, ref.offset, ref.length, raw) for ref, raw in entries
        )
        sealed_header = self.repo.keys.seal(header, b"pack-header:" + pack_id.encode())
        body = b"".join(
            [*self._buf, sealed_header, _PACK_TRAILER.pack(len(sealed_header), PACK_MAGIC)]
        )
        refs = [ref for ref, _ in entries]
        self._buf, self._entries, self._size = [], [], 0
        self._pack_id = _new_pack_id()
        if self.uploads is None:
            self._upload(pack_id, body, refs)
        else:
            self._in_flight.append(self.uploads.submit(lambda: self._upload(pack_id, body, refs)))

    def _upload(self, pack_id: str, body: bytes, refs: list[BlockRef]) -> None:
        """Write one pack (blocks, sealed header, trailer), then index it."""
        self.repo.objects.put(pack_key(pack_id), body)
        self.index.add(refs)
        if self.on_pack is not None:
            self.on_pack(pack_id, len(body), refs)
        with self._lock:
            self.bytes_uploaded += len(body)
            self.packs_written.append(pack_id)


def _new_pack_id() -> str:
    """A random pack id: 64 hex digits."""
    return os.urandom(32).hex()


def _key_context(store_id: str) -> bytes:
    """What the master key's wrapping is bound to: the store's id."""
    return KEY_CONTEXT_PREFIX + store_id.encode()
