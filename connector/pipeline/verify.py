"""Verify: every block each committed run needs is present and authenticates.

For each run: its commit and disk manifests open (they are sealed, so a
damaged or swapped one fails), the manifest chain resolves, and the Merkle root
of the resolved map equals the manifest's and the commit's. Then every stored
block the runs reference is read once, with ranged GETs grouped per pack, and
its ciphertext is authenticated against its block id. `deep` also decrypts,
decompresses and re-hashes each block with the keyed block-id hash,
recomputes each disk's Merkle root from those hashes, and authenticates the
trailer and sealed header of every pack it reads (the header must list each
block the manifests place in the pack).

A fault names the server, run, disk, block index and pack; one damaged blob
shared by several runs (deduplicated) is a fault of each of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from connector.domain.extents import block_count
from connector.domain.manifest import BlockMap, BlockRef, leaves
from connector.domain.merkle import merkle_root
from connector.errors import ConnectorError, NotFoundError
from connector.store.repository import Repository, pack_key

# Contiguous blobs of one pack are fetched in one ranged GET up to this size.
MAX_FETCH = 16 * 1024 * 1024

# Progress callback: (bytes checked, bytes to check).
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Fault:
    server_id: str
    run_id: str
    disk_key: int | None
    block: int | None
    pack_id: str | None
    reason: str


@dataclass
class VerifyReport:
    deep: bool
    runs: int = 0
    disks: int = 0
    blocks: int = 0  # block references checked (a deduplicated blob counts once per use)
    blobs: int = 0  # distinct stored blobs read
    bytes_read: int = 0
    faults: list[Fault] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.faults


@dataclass(frozen=True)
class _Use:
    server_id: str
    run_id: str
    disk_key: int
    block: int
    length: int  # plaintext length this block must have


@dataclass
class _DiskCheck:
    server_id: str
    run_id: str
    disk_key: int
    full: BlockMap
    nblocks: int
    block_size: int
    last_len: int
    root: bytes


def verify_store(
    repo: Repository,
    targets: dict[str, list[str] | None],
    deep: bool = False,
    progress: Progress | None = None,
) -> VerifyReport:
    """Verify the runs of `targets` (server id -> run ids, or None for every committed run)."""
    report = VerifyReport(deep=deep)
    uses: dict[BlockRef, list[_Use]] = {}
    disks: list[_DiskCheck] = []
    for server_id, run_ids in sorted(targets.items()):
        if run_ids is None:
            scan = repo.scan_runs(server_id).get(server_id, {})
            run_ids = sorted(r for r, objs in scan.items() if objs.commit)
        for run_id in run_ids:
            report.runs += 1
            _check_run(repo, server_id, run_id, report, uses, disks)
    hashes = _check_blocks(repo, uses, deep, report, progress)
    if deep:
        for d in disks:
            _check_deep_root(repo, d, hashes, report)
    return report


def _check_run(
    repo: Repository,
    server_id: str,
    run_id: str,
    report: VerifyReport,
    uses: dict[BlockRef, list[_Use]],
    disks: list[_DiskCheck],
) -> None:
    def fault(disk: int | None, reason: str) -> None:
        report.faults.append(Fault(server_id, run_id, disk, None, None, reason))

    try:
        commit = repo.read_commit(server_id, run_id)
    except ConnectorError as exc:
        fault(None, str(exc))
        return
    for entry in commit.get("disks", []):
        disk_key = int(entry["disk_key"])
        report.disks += 1
        try:
            manifest = repo.read_manifest(server_id, run_id, disk_key)
        except ConnectorError as exc:
            fault(disk_key, str(exc))
            continue
        if (manifest.server_id, manifest.run_id, manifest.disk_key) != (
            server_id,
            run_id,
            disk_key,
        ):
            fault(disk_key, "the manifest names another server, run or disk")
            continue
        if manifest.merkle_root.hex() != entry.get("merkle_root"):
            fault(disk_key, "the manifest's Merkle root differs from the run record's")
        if manifest.capacity != entry.get("capacity"):
            fault(disk_key, "the manifest's capacity differs from the run record's")
        try:
            full = repo.resolve_map(manifest)
        except NotFoundError as exc:
            fault(disk_key, f"the manifest chain is broken: {exc}")
            continue
        except ConnectorError as exc:
            fault(disk_key, f"the manifest chain cannot be read: {exc}")
            continue
        nblocks = block_count(manifest.capacity, manifest.block_size)
        last_len = manifest.capacity - (nblocks - 1) * manifest.block_size if nblocks else 0
        zero_full, zero_last = repo.zero_id(manifest.block_size), repo.zero_id(last_len)
        root = merkle_root(leaves(full, nblocks, zero_full, zero_last))
        if root != manifest.merkle_root:
            fault(disk_key, "the resolved block map does not match the manifest's Merkle root")
        outside = [i for i in full if i >= nblocks]
        if outside:
            fault(disk_key, f"the block map lists block {outside[0]} beyond the disk's end")
        for index, ref in full.items():
            if ref is None or index >= nblocks:
                continue
            length = last_len if index == nblocks - 1 else manifest.block_size
            uses.setdefault(ref, []).append(_Use(server_id, run_id, disk_key, index, length))
            report.blocks += 1
        disks.append(
            _DiskCheck(
                server_id,
                run_id,
                disk_key,
                full,
                nblocks,
                manifest.block_size,
                last_len,
                manifest.merkle_root,
            )
        )


def _check_blocks(
    repo: Repository,
    uses: dict[BlockRef, list[_Use]],
    deep: bool,
    report: VerifyReport,
    progress: Progress | None,
) -> dict[BlockRef, bytes | None]:
    """Read every referenced blob once; in deep mode, return its re-hashed id (None: bad)."""
    hashes: dict[BlockRef, bytes | None] = {}

    def bad(ref: BlockRef, reason: str) -> None:
        hashes[ref] = None
        for u in sorted(uses[ref], key=lambda u: (u.server_id, u.run_id, u.disk_key, u.block)):
            report.faults.append(
                Fault(u.server_id, u.run_id, u.disk_key, u.block, ref.pack_id, reason)
            )

    by_pack: dict[str, list[BlockRef]] = {}
    for ref in uses:
        by_pack.setdefault(ref.pack_id, []).append(ref)
    present = set(repo.pack_ids()) if by_pack else set()
    total = sum(r.length for r in uses)
    done = 0
    for pack_id in sorted(by_pack):
        refs = by_pack[pack_id]
        if pack_id not in present:
            for ref in refs:
                bad(ref, "its pack is missing from the store")
            done += sum(r.length for r in refs)
            if progress is not None:
                progress(done, total)
            continue
        if deep:
            _check_pack_header(repo, pack_id, refs, uses, report)
        for group in _groups(refs):
            first, last = group[0], group[-1]
            span = last.offset + last.length - first.offset
            try:
                data = repo.objects.get(pack_key(pack_id), first.offset, span)
            except ConnectorError as exc:
                for ref in group:
                    bad(ref, f"its pack cannot be read: {exc}")
                continue
            report.bytes_read += len(data)
            for ref in group:
                report.blobs += 1
                blob = data[ref.offset - first.offset : ref.offset - first.offset + ref.length]
                if len(blob) != ref.length:
                    bad(ref, "its pack is shorter than the manifest says (truncated)")
                    continue
                _check_blob(repo, ref, blob, deep, uses[ref], hashes, bad)
            done += sum(r.length for r in group)
            if progress is not None:
                progress(done, total)
    return hashes


def _check_pack_header(
    repo: Repository,
    pack_id: str,
    refs: list[BlockRef],
    uses: dict[BlockRef, list[_Use]],
    report: VerifyReport,
) -> None:
    """The pack's trailer and sealed header authenticate and list every block used from it.

    A damaged header or trailer is a fault of each disk of each run that uses
    the pack (not of each block: the blocks are checked on their own).
    """
    reason = ""
    try:
        listed = set(repo.pack_header(pack_id))
    except ConnectorError as exc:
        reason = (
            f"pack {pack_id} has a damaged header or trailer ({exc}). Its blocks are "
            "checked one by one and restore does not need the header, but purge cannot index "
            "the pack again from it: put the object back from an earlier S3 object version "
            "or a copy of the bucket"
        )
    else:
        unlisted = [r for r in refs if r not in listed]
        if unlisted:
            reason = (
                f"the header of pack {pack_id} does not list {len(unlisted)} of the blocks "
                "the manifests place in it (the pack object was replaced, or a manifest names "
                "the wrong pack): put the object back from an earlier S3 object version"
            )
    if not reason:
        return
    where = sorted({(u.server_id, u.run_id, u.disk_key) for r in refs for u in uses[r]})
    for server_id, run_id, disk_key in where:
        report.faults.append(Fault(server_id, run_id, disk_key, None, pack_id, reason))


def _check_blob(
    repo: Repository,
    ref: BlockRef,
    blob: bytes,
    deep: bool,
    block_uses: list[_Use],
    hashes: dict[BlockRef, bytes | None],
    bad: Callable[[BlockRef, str], None],
) -> None:
    if not deep:
        if not repo.keys.authenticate(blob, ref.block_id):
            bad(ref, "its ciphertext failed authentication (damaged or altered)")
        return
    try:
        plain = repo.keys.open(blob, ref.block_id, "its ciphertext")
    except ConnectorError as exc:
        bad(ref, str(exc))
        return
    rehashed = repo.keys.block_id(plain)
    if rehashed != ref.block_id:
        bad(ref, "its plaintext does not match its block id (keyed hash mismatch)")
        return
    lengths = {u.length for u in block_uses}
    if len(lengths) == 1 and len(plain) not in lengths:
        bad(ref, f"its plaintext is {len(plain)} bytes, the disk needs {lengths.pop()}")
        return
    hashes[ref] = rehashed


def _check_deep_root(
    repo: Repository, d: _DiskCheck, hashes: dict[BlockRef, bytes | None], report: VerifyReport
) -> None:
    """The Merkle root over the hashes of the data as actually stored."""
    zero_full, zero_last = repo.zero_id(d.block_size), repo.zero_id(d.last_len)
    out: list[bytes] = []
    for i in range(d.nblocks):
        ref = d.full.get(i)
        if ref is None:
            out.append(zero_last if i == d.nblocks - 1 else zero_full)
        else:
            out.append(hashes.get(ref) or b"")
    if merkle_root(out) != d.root:
        report.faults.append(
            Fault(
                d.server_id,
                d.run_id,
                d.disk_key,
                None,
                None,
                "the Merkle root over the stored data does not match the manifest's",
            )
        )


def _groups(refs: Iterable[BlockRef]) -> list[list[BlockRef]]:
    """Blobs of one pack in offset order, cut into back-to-back runs of at most MAX_FETCH."""
    groups: list[list[BlockRef]] = []
    cur: list[BlockRef] = []
    for ref in sorted(set(refs), key=lambda r: (r.offset, r.length)):
        if cur:
            prev = cur[-1]
            contiguous = ref.offset == prev.offset + prev.length
            if not contiguous or ref.offset + ref.length - cur[0].offset > MAX_FETCH:
                groups.append(cur)
                cur = []
        cur.append(ref)
    if cur:
        groups.append(cur)
    return groups
