"""An in-memory SnapshotTarget: EBS snapshots and AMIs as the EBS direct APIs and EC2
behave (parents, client tokens, checked blocks, completion, snapshots in use).

For unit tests of the land stage; the same contract suite runs over it and over
the boto3 adapter against moto_server (tests/contract/test_snapshot_target.py).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from connector.domain.landing import EBS_BLOCK, GiB
from connector.errors import InvalidInputError, NotFoundError, PermanentError


@dataclass
class _Snap:
    id: str
    size: int
    status: str
    encrypted: bool
    kms: str | None
    tags: dict[str, str]
    blocks: dict[int, bytes] = field(default_factory=dict)
    written: set[int] = field(default_factory=set)


class FakeSnapshotTarget:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.snapshots: dict[str, _Snap] = {}
        self.tokens: dict[str, str] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, int]] = []  # (op, snapshot id, block index)

    def start_snapshot(
        self,
        *,
        volume_size: int,
        client_token: str,
        parent_snapshot_id: str | None,
        encrypted: bool,
        kms_key_id: str | None,
        tags: dict[str, str],
        description: str,
        timeout_minutes: int,
    ) -> tuple[str, str]:
        with self._lock:
            if client_token in self.tokens:
                snap = self.snapshots[self.tokens[client_token]]
                return snap.id, snap.status
            blocks: dict[int, bytes] = {}
            if parent_snapshot_id:
                parent = self._get(parent_snapshot_id)
                if parent.status != "completed":
                    raise PermanentError(f"parent snapshot {parent_snapshot_id} is not completed")
                if parent.encrypted and not encrypted:
                    raise PermanentError("a child of an encrypted snapshot must be encrypted")
                blocks = dict(parent.blocks)
            sid = f"snap-{next(self._ids):017x}"
            self.snapshots[sid] = _Snap(
                sid, volume_size, "pending", encrypted, kms_key_id, tags, blocks
            )
            self.tokens[client_token] = sid
            self.calls.append(("StartSnapshot", sid, -1))
            return sid, "pending"

    def put_block(self, snapshot_id: str, index: int, data: bytes) -> None:
        if len(data) != EBS_BLOCK:
            raise ValueError(f"an EBS block is {EBS_BLOCK} bytes, not {len(data)}")
        with self._lock:
            snap = self._get(snapshot_id)
            if snap.status != "pending":
                raise PermanentError(f"snapshot {snapshot_id} is not pending")
            if not 0 <= index < snap.size * GiB // EBS_BLOCK:
                raise InvalidInputError(f"block {index} is beyond the volume")
            snap.blocks[index] = bytes(data)
            snap.written.add(index)
            self.calls.append(("PutSnapshotBlock", snapshot_id, index))

    def complete_snapshot(self, snapshot_id: str, changed_blocks: int) -> str:
        with self._lock:
            snap = self._get(snapshot_id)
            if snap.status == "pending":
                if changed_blocks != len(snap.written):
                    raise PermanentError("ChangedBlocksCount does not match the blocks written")
                snap.status = "completed"
            return "completed"

    def snapshot_state(self, snapshot_id: str) -> str | None:
        snap = self.snapshots.get(snapshot_id)
        return snap.status if snap else None

    def snapshots_tagged(self, key: str, value: str) -> list[str]:
        return sorted(s.id for s in self.snapshots.values() if s.tags.get(key) == value)

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self._lock:
            for image_id, image in self.images.items():
                if snapshot_id in (sid for _, sid in image["mappings"]):
                    raise PermanentError(f"snapshot {snapshot_id} is in use by {image_id}")
            self.snapshots.pop(snapshot_id, None)

    def list_blocks(self, snapshot_id: str) -> list[int]:
        return sorted(self._get(snapshot_id).blocks)

    def read_block(self, snapshot_id: str, index: int) -> bytes:
        return self._get(snapshot_id).blocks.get(index, bytes(EBS_BLOCK))

    def register_image(
        self,
        *,
        name: str,
        description: str,
        mappings: list[tuple[str, str]],
        architecture: str,
        boot_mode: str,
        ena_support: bool,
        tags: dict[str, str],
    ) -> str:
        with self._lock:
            for _, sid in mappings:
                if self._get(sid).status != "completed":
                    raise PermanentError(f"snapshot {sid} is not completed")
            image_id = f"ami-{next(self._ids):017x}"
            self.images[image_id] = {
                "name": name,
                "mappings": list(mappings),
                "architecture": architecture,
                "boot_mode": boot_mode,
                "ena_support": ena_support,
                "tags": dict(tags),
            }
            return image_id

    def find_image(self, name: str) -> str | None:
        for image_id, image in self.images.items():
            if image["name"] == name:
                return image_id
        return None

    def describe_image(self, image_id: str) -> dict[str, Any] | None:
        image = self.images.get(image_id)
        if image is None:
            return None
        return {
            "ImageId": image_id,
            "Name": image["name"],
            "Architecture": image["architecture"],
            "BootMode": image["boot_mode"],
            "EnaSupport": image["ena_support"],
            "RootDeviceName": image["mappings"][0][0],
            "BlockDeviceMappings": [
                {"DeviceName": d, "Ebs": {"SnapshotId": s}} for d, s in image["mappings"]
            ],
        }

    def deregister_image(self, image_id: str) -> None:
        self.images.pop(image_id, None)

    def _get(self, snapshot_id: str) -> _Snap:
        snap = self.snapshots.get(snapshot_id)
        if snap is None:
            raise NotFoundError(f"snapshot {snapshot_id} does not exist")
        return snap
