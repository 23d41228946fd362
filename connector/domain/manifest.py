"""Disk manifests: the block map of one disk at one run, and its binary encoding.

A manifest is either full (every non-zero block of the disk) or a change
against the manifest of an earlier run of the same disk (`base_run`): only the
blocks that changed, with zero blocks marked explicitly. Resolving a chain of
manifests gives the disk's complete block map at that run.

Encoding (before compression and encryption by the store):
    b"CNM1" | u32 header length | header (JSON, UTF-8) | entries
    entry = u64 block index | 32-byte block id | u32 pack number | u32 offset | u32 length
The pack number indexes the header's "packs" list; ZERO_PACK marks an all-zero block.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connector.errors import StoreFormatError

MANIFEST_MAGIC = b"CNM1"
MANIFEST_VERSION = 1
ZERO_PACK = 0xFFFFFFFF
_ENTRY = struct.Struct("<Q32sIII")
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class BlockRef:
    """Where a stored block lives: its id, the pack that holds it, and its place there."""

    block_id: bytes
    pack_id: str
    offset: int
    length: int


# A block map: block index -> BlockRef, or None for an all-zero block.
BlockMap = dict[int, BlockRef | None]


@dataclass
class DiskManifest:
    server_id: str
    run_id: str
    disk_key: int
    capacity: int
    block_size: int
    change_id: str | None
    snapshot_name: str
    snapshot_ref: str
    created_at: str
    merkle_root: bytes
    base_run: str | None  # None: full map; else the run whose map this one changes
    entries: BlockMap = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    disk_uuid: str | None = None

    def encode(self) -> bytes:
        packs: dict[str, int] = {}
        for ref in self.entries.values():
            if ref is not None and ref.pack_id not in packs:
                packs[ref.pack_id] = len(packs)
        header = {
            "version": MANIFEST_VERSION,
            "server_id": self.server_id,
            "run_id": self.run_id,
            "disk_key": self.disk_key,
            "disk_uuid": self.disk_uuid,
            "capacity": self.capacity,
            "block_size": self.block_size,
            "change_id": self.change_id,
            "snapshot": {"name": self.snapshot_name, "ref": self.snapshot_ref},
            "created_at": self.created_at,
            "merkle_root": self.merkle_root.hex(),
            "base_run": self.base_run,
            "packs": list(packs),
            "entries": len(self.entries),
            "stats": self.stats,
        }
        hdr = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        parts = [MANIFEST_MAGIC, _U32.pack(len(hdr)), hdr]
        for index in sorted(self.entries):
            ref = self.entries[index]
            if ref is None:
                parts.append(_ENTRY.pack(index, b"\0" * 32, ZERO_PACK, 0, 0))
            else:
                parts.append(
                    _ENTRY.pack(index, ref.block_id, packs[ref.pack_id], ref.offset, ref.length)
                )
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> DiskManifest:
        if data[:4] != MANIFEST_MAGIC:
            raise StoreFormatError("not a disk manifest (bad magic)")
        (hlen,) = _U32.unpack_from(data, 4)
        try:
            header = json.loads(data[8 : 8 + hlen])
        except ValueError as exc:
            raise StoreFormatError(f"disk manifest header is not valid JSON: {exc}") from exc
        version = header.get("version")
        if version != MANIFEST_VERSION:
            raise StoreFormatError(
                f"disk manifest version {version} is not supported by this connector "
                f"(it reads version {MANIFEST_VERSION}); upgrade the connector"
            )
        packs: list[str] = header["packs"]
        body = memoryview(data)[8 + hlen :]
        count = header["entries"]
        if len(body) != count * _ENTRY.size:
            raise StoreFormatError("disk manifest is truncated")
        entries: BlockMap = {}
        for index, block_id, pack_no, offset, length in _ENTRY.iter_unpack(body):
            if pack_no == ZERO_PACK:
                entries[index] = None
            else:
                entries[index] = BlockRef(bytes(block_id), packs[pack_no], offset, length)
        snap = header["snapshot"]
        return cls(
            server_id=header["server_id"],
            run_id=header["run_id"],
            disk_key=header["disk_key"],
            disk_uuid=header.get("disk_uuid"),
            capacity=header["capacity"],
            block_size=header["block_size"],
            change_id=header["change_id"],
            snapshot_name=snap["name"],
            snapshot_ref=snap["ref"],
            created_at=header["created_at"],
            merkle_root=bytes.fromhex(header["merkle_root"]),
            base_run=header["base_run"],
            entries=entries,
            stats=header.get("stats", {}),
        )


def apply_changes(base: Mapping[int, BlockRef | None], changes: BlockMap) -> BlockMap:
    """The full map after `changes`: zero markers drop blocks, refs replace them."""
    out: BlockMap = {i: r for i, r in base.items() if r is not None}
    for index, ref in changes.items():
        if ref is None:
            out.pop(index, None)
        else:
            out[index] = ref
    return out


def diff_maps(old: Mapping[int, BlockRef | None], new: Mapping[int, BlockRef | None]) -> BlockMap:
    """The change map that turns `old` into `new` (zero markers for removed blocks)."""
    changes: BlockMap = {}
    for index, ref in new.items():
        if ref is None:
            continue
        prev = old.get(index)
        if prev is None or prev.block_id != ref.block_id:
            changes[index] = ref
    for index, ref in old.items():
        if ref is not None and new.get(index) is None:
            changes[index] = None
    return changes


def leaves(
    full_map: Mapping[int, BlockRef | None], nblocks: int, zero_full: bytes, zero_last: bytes
) -> list[bytes]:
    """Merkle leaves in block order: the block id, or the id an all-zero block would have.

    `zero_last` is the id of the (possibly shorter) all-zero last block.
    """
    out: list[bytes] = []
    for i in range(nblocks):
        ref = full_map.get(i)
        if ref is not None:
            out.append(ref.block_id)
        else:
            out.append(zero_last if i == nblocks - 1 else zero_full)
    return out
