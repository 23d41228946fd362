"""The landing extension of moto_server (tests/harness/motoext.py), on its own, over TLS.

Every behaviour the landing tests rely on is asserted here against the running
server: parent blocks, client tokens, block checks, completion, AMIs as registered,
snapshots in use, encryption, the call log and injected faults.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.harness import fixtures_landing, motoext
from tests.harness.fixtures_landing import LandingMoto

pytestmark = pytest.mark.integration

BLOCK = 512 * 1024


def _put(ebs: Any, snapshot_id: str, index: int, data: bytes, checksum: str | None = None) -> None:
    ebs.put_snapshot_block(
        SnapshotId=snapshot_id,
        BlockIndex=index,
        BlockData=data,
        DataLength=len(data),
        Checksum=checksum or base64.b64encode(hashlib.sha256(data).digest()).decode(),
        ChecksumAlgorithm="SHA256",
    )


def _completed(ec2: Any, snapshot_id: str) -> str:
    for _ in range(10):
        state: str = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["State"]
        if state == "completed":
            return state
    return state


def _read(ebs: Any, snapshot_id: str) -> dict[int, bytes]:
    listed = ebs.list_snapshot_blocks(SnapshotId=snapshot_id)
    out = {}
    for b in listed["Blocks"]:
        got = ebs.get_snapshot_block(
            SnapshotId=snapshot_id, BlockIndex=b["BlockIndex"], BlockToken=b["BlockToken"]
        )
        out[b["BlockIndex"]] = got["BlockData"].read()
    return out


def _snapshot(ebs: Any, **kw: Any) -> str:
    sid: str = ebs.start_snapshot(VolumeSize=1, Timeout=60, **kw)["SnapshotId"]
    return sid


def test_the_fixture_names_the_variables_the_extension_reads() -> None:
    assert fixtures_landing.CALL_LOG_VAR == motoext.CALL_LOG_VAR
    assert fixtures_landing.FAULTS_VAR == motoext.FAULTS_VAR


def test_a_child_starts_with_its_parents_blocks_and_a_token_repeats(
    landing_moto: LandingMoto,
) -> None:
    ebs = landing_moto.server.boto3_client("ebs")
    ec2 = landing_moto.server.boto3_client("ec2")
    a, b = b"a" * BLOCK, b"b" * BLOCK
    parent = _snapshot(ebs, ClientToken="tok-parent")
    assert ebs.start_snapshot(VolumeSize=1, ClientToken="tok-parent")["SnapshotId"] == parent
    assert ec2.describe_snapshots(SnapshotIds=[parent])["Snapshots"][0]["State"] == "pending"
    _put(ebs, parent, 0, a)
    _put(ebs, parent, 1, a)
    ebs.complete_snapshot(SnapshotId=parent, ChangedBlocksCount=2)
    assert _completed(ec2, parent) == "completed"

    child = _snapshot(ebs, ParentSnapshotId=parent, ClientToken="tok-child")
    _put(ebs, child, 1, b)
    ebs.complete_snapshot(SnapshotId=child, ChangedBlocksCount=1)
    assert _read(ebs, child) == {0: a, 1: b}
    assert _read(ebs, parent) == {0: a, 1: a}
    assert landing_moto.blocks_sent(child) == {1}
    assert [c["snapshot"] for c in landing_moto.calls("StartSnapshot")].count(parent) == 2


def test_a_parent_must_be_completed(landing_moto: LandingMoto) -> None:
    ebs = landing_moto.server.boto3_client("ebs")
    parent = _snapshot(ebs)
    with pytest.raises(ClientError) as err:
        _snapshot(ebs, ParentSnapshotId=parent)
    assert err.value.response["Error"]["Code"] == "ValidationException"


def test_blocks_are_checked_for_size_checksum_and_index(landing_moto: LandingMoto) -> None:
    ebs = landing_moto.server.boto3_client("ebs")
    sid = _snapshot(ebs)
    for data, checksum, index in (
        (b"x" * 4096, None, 0),  # too short
        (b"x" * BLOCK, base64.b64encode(b"0" * 32).decode(), 0),  # wrong checksum
        (b"x" * BLOCK, None, 2048),  # a 1 GiB volume has 2048 blocks
    ):
        with pytest.raises(ClientError) as err:
            _put(ebs, sid, index, data, checksum)
        assert err.value.response["Error"]["Code"] == "ValidationException"
    assert landing_moto.blocks_sent(sid) == set()
    with pytest.raises(ClientError) as err:
        ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=1)
    assert "ChangedBlocksCount" in err.value.response["Error"]["Message"]


def test_no_blocks_after_completion(landing_moto: LandingMoto) -> None:
    ebs = landing_moto.server.boto3_client("ebs")
    sid = _snapshot(ebs)
    ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=0)
    with pytest.raises(ClientError) as err:
        _put(ebs, sid, 0, b"x" * BLOCK)
    assert "not pending" in err.value.response["Error"]["Message"]


def test_encryption_is_kept_and_an_unknown_key_refused(landing_moto: LandingMoto) -> None:
    ebs = landing_moto.server.boto3_client("ebs")
    ec2 = landing_moto.server.boto3_client("ec2")
    kms = landing_moto.server.boto3_client("kms")
    key = kms.create_key()["KeyMetadata"]["Arn"]
    sid = _snapshot(ebs, Encrypted=True, KmsKeyArn=key)
    described = ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]
    assert described["Encrypted"] is True
    assert described["KmsKeyId"] == key
    ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=0)
    _completed(ec2, sid)
    with pytest.raises(ClientError) as err:  # a child of an encrypted parent
        _snapshot(ebs, ParentSnapshotId=sid)
    assert "encrypted" in err.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as err:
        _snapshot(ebs, Encrypted=True, KmsKeyArn=key.rsplit("/", 1)[0] + "/no-such-key")
    assert "KMS key" in err.value.response["Error"]["Message"]


def _register(ec2: Any, snapshots: list[str], **kw: Any) -> str:
    mappings = [
        {"DeviceName": name, "Ebs": {"SnapshotId": sid}}
        for name, sid in zip(("/dev/xvda", "/dev/xvdb"), snapshots, strict=False)
    ]
    image: str = ec2.register_image(
        Name="img-test",
        RootDeviceName="/dev/xvda",
        BlockDeviceMappings=mappings,
        VirtualizationType="hvm",
        **kw,
    )["ImageId"]
    return image


def test_an_ami_keeps_what_it_was_registered_with(landing_moto: LandingMoto) -> None:
    ebs = landing_moto.server.boto3_client("ebs")
    ec2 = landing_moto.server.boto3_client("ec2")
    disks = []
    for _ in range(2):
        sid = _snapshot(ebs)
        ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=0)
        assert _completed(ec2, sid) == "completed"
        disks.append(sid)
    image = _register(ec2, disks, Architecture="arm64", BootMode="uefi", EnaSupport=True)
    got = ec2.describe_images(ImageIds=[image])["Images"][0]
    assert got["Architecture"] == "arm64"
    assert got["BootMode"] == "uefi"
    assert got["EnaSupport"] is True
    assert got["RootDeviceName"] == "/dev/xvda"
    assert [(m["DeviceName"], m["Ebs"]["SnapshotId"]) for m in got["BlockDeviceMappings"]] == [
        ("/dev/xvda", disks[0]),
        ("/dev/xvdb", disks[1]),
    ]
    assert got["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 1

    with pytest.raises(ClientError) as err:  # in use by a registered AMI
        ec2.delete_snapshot(SnapshotId=disks[1])
    assert err.value.response["Error"]["Code"] == "InvalidSnapshot.InUse"
    ec2.deregister_image(ImageId=image)
    ec2.delete_snapshot(SnapshotId=disks[1])
    with pytest.raises(ClientError):
        ebs.list_snapshot_blocks(SnapshotId=disks[1])


def test_an_ami_refuses_a_snapshot_that_is_not_completed(landing_moto: LandingMoto) -> None:
    ebs = landing_moto.server.boto3_client("ebs")
    ec2 = landing_moto.server.boto3_client("ec2")
    sid = _snapshot(ebs)
    with pytest.raises(ClientError) as err:
        _register(ec2, [sid])
    assert err.value.response["Error"]["Code"] == "IncorrectState"
    ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=0)
    # Completion is asynchronous: the first answer after it is still pending.
    assert ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]["State"] == "pending"
    with pytest.raises(ClientError):
        _register(ec2, [sid])
    assert _completed(ec2, sid) == "completed"
    assert _register(ec2, [sid]).startswith("ami-")


def test_injected_faults_fail_the_next_calls(landing_moto: LandingMoto) -> None:
    ebs = landing_moto.server.boto3_client("ebs")
    landing_moto.inject("StartSnapshot", "ThrottlingException", count=2, status=429)
    for _ in range(2):
        with pytest.raises(ClientError) as err:
            _snapshot(ebs)
        assert err.value.response["Error"]["Code"] == "ThrottlingException"
    assert _snapshot(ebs).startswith("snap-")
    assert landing_moto.pending_faults() == {}
