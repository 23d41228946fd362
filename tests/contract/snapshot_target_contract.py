"""The SnapshotTarget contract: every implementation (the in-memory fake, the boto3
adapter against the extended moto_server) must pass this one suite.

Subclass `SnapshotTargetContract` and override the `target` fixture.
"""

from __future__ import annotations

import uuid

import pytest

from connector.domain.landing import EBS_BLOCK
from connector.errors import ConnectorError
from connector.ports import SnapshotTarget


def _wait(target: SnapshotTarget, snapshot_id: str) -> str | None:
    for _ in range(20):
        state = target.snapshot_state(snapshot_id)
        if state != "pending":
            return state
    return target.snapshot_state(snapshot_id)


def _start(target: SnapshotTarget, token: str, parent: str | None = None) -> str:
    sid, status = target.start_snapshot(
        volume_size=1,
        client_token=token,
        parent_snapshot_id=parent,
        encrypted=False,
        kms_key_id=None,
        tags={"connector:run": token},
        description="contract",
        timeout_minutes=60,
    )
    assert status == "pending"
    return sid


class SnapshotTargetContract:
    @pytest.fixture
    def target(self) -> SnapshotTarget:
        raise NotImplementedError

    def test_blocks_parents_tokens_and_read_back(self, target: SnapshotTarget) -> None:
        token = uuid.uuid4().hex
        a, b = b"a" * EBS_BLOCK, b"b" * EBS_BLOCK
        parent = _start(target, token)
        assert _start(target, token) == parent  # the same token, the same snapshot
        target.put_block(parent, 0, a)
        target.put_block(parent, 3, a)
        target.complete_snapshot(parent, 2)
        assert _wait(target, parent) == "completed"
        child = _start(target, uuid.uuid4().hex, parent)
        target.put_block(child, 3, b)
        target.complete_snapshot(child, 1)
        assert _wait(target, child) == "completed"
        assert target.list_blocks(child) == [0, 3]
        assert target.read_block(child, 3) == b and target.read_block(child, 0) == a
        assert target.read_block(child, 1) == bytes(EBS_BLOCK)
        assert target.snapshots_tagged("connector:run", token) == [parent]

    def test_a_block_must_be_whole(self, target: SnapshotTarget) -> None:
        sid = _start(target, uuid.uuid4().hex)
        with pytest.raises(ValueError):
            target.put_block(sid, 0, b"short")

    def test_images_keep_their_mappings_and_hold_their_snapshots(
        self, target: SnapshotTarget
    ) -> None:
        sid = _start(target, uuid.uuid4().hex)
        with pytest.raises(ConnectorError):  # not completed yet
            target.register_image(
                name="x",
                description="",
                mappings=[("/dev/xvda", sid)],
                architecture="x86_64",
                boot_mode="uefi",
                ena_support=True,
                tags={},
            )
        target.complete_snapshot(sid, 0)
        assert _wait(target, sid) == "completed"
        name = f"connector-{uuid.uuid4().hex}"
        image = target.register_image(
            name=name,
            description="",
            mappings=[("/dev/xvda", sid)],
            architecture="arm64",
            boot_mode="uefi",
            ena_support=True,
            tags={"connector:run": "r"},
        )
        assert target.find_image(name) == image
        got = target.describe_image(image)
        assert got is not None and got["Architecture"] == "arm64" and got["BootMode"] == "uefi"
        assert got["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] == sid
        with pytest.raises(ConnectorError):
            target.delete_snapshot(sid)  # in use
        target.deregister_image(image)
        target.deregister_image(image)  # absent: not an error
        assert target.find_image(name) is None
        target.delete_snapshot(sid)
        target.delete_snapshot(sid)  # absent: not an error
        assert target.snapshot_state(sid) is None
