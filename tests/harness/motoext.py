"""moto_server with the landing behaviour of the EBS direct APIs and EC2 that moto 5.2 lacks.

Run as `python -m tests.harness.motoext <moto_server arguments>`: it patches moto's EBS
and EC2 backends in this process, then serves exactly as `moto_server` does (the
harness starts it with TLS from the test CA, `tests/harness/moto.py`).

What the extension adds, each the way the EBS direct API reference describes it:
- StartSnapshot keeps ParentSnapshotId (the new snapshot starts with the parent's
  blocks; the parent must be completed, the volume no smaller, and a child of an
  encrypted parent must be encrypted), ClientToken (a repeated token returns the
  same snapshot), Encrypted and KmsKeyArn (an unknown KMS key is refused), and the
  snapshot is `pending` in DescribeSnapshots until completed;
- the block size is 524288 bytes; PutSnapshotBlock checks the size, DataLength, the
  SHA-256 checksum (base64) and the block index, and only on a pending snapshot;
- CompleteSnapshot checks ChangedBlocksCount; the snapshot then stays `pending` for
  `MOTOEXT_PENDING_DESCRIBES` DescribeSnapshots answers (default 1) before it is
  `completed`, as AWS completes it asynchronously;
- RegisterImage keeps the block device mappings, root device name, architecture,
  boot mode, ENA support and IMDS support it is given, and refuses a snapshot that is
  not completed; DescribeImages shows them (no made-up 15 GiB root mapping);
- DeleteSnapshot refuses a snapshot that a registered AMI uses.

For tests, two files named by the environment:
- `MOTOEXT_CALL_LOG`: every landing call is appended as one JSON line (operation,
  snapshot id, block index, ...), so that a test can assert which blocks were sent;
- `MOTOEXT_FAULTS`: a JSON object {operation: [{"code": ..., "status": ...,
  "count": n}]}, read on every call: the next n calls of that operation fail with
  that error (ThrottlingException, AccessDeniedException, ...); under `SnapshotFailure`,
  the next n snapshots completed end in the state its code names (`error`), as a
  snapshot AWS could not complete.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from moto.core.exceptions import JsonRESTError
from moto.core.responses import ActionResult
from moto.ebs import models as ebs_models
from moto.ebs import responses as ebs_responses
from moto.ec2.exceptions import EC2ClientError, InvalidParameterValue, InvalidSnapshotInUse
from moto.ec2.models import amis as ec2_amis
from moto.ec2.models import elastic_block_store as ec2_ebs
from moto.ec2.responses import amis as amis_responses
from moto.ec2.utils import random_ami_id

BLOCK_SIZE = 512 * 1024
CALL_LOG_VAR = "MOTOEXT_CALL_LOG"
FAULTS_VAR = "MOTOEXT_FAULTS"
PENDING_VAR = "MOTOEXT_PENDING_DESCRIBES"
# A pseudo-operation of the faults file: the next `count` snapshots completed end in the
# state named by `code` (AWS's `error`) instead of `completed`.
SNAPSHOT_FAILURE = "SnapshotFailure"

_lock = threading.RLock()


# -- call log and injected faults ---------------------------------------------------------


def _record(op: str, **fields: Any) -> None:
    path = os.environ.get(CALL_LOG_VAR)
    if not path:
        return
    line = json.dumps({"op": op, **fields}, sort_keys=True, default=str)
    with _lock, open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


class _Injected(JsonRESTError):
    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(code, message)
        self.code = status


class _InjectedEC2(EC2ClientError):
    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(code, message)
        self.code = status  # type: ignore[assignment]


def _next_fault(op: str) -> dict[str, Any] | None:
    """The next fault the faults file holds for `op` (taken from it), if any."""
    path = os.environ.get(FAULTS_VAR)
    if not path:
        return None
    with _lock:
        try:
            doc = json.loads(Path(path).read_text() or "{}")
        except (OSError, ValueError):
            return None
        queue = doc.get(op) or []
        if not queue:
            return None
        fault: dict[str, Any] = queue[0]
        fault["count"] = int(fault.get("count", 1)) - 1
        if fault["count"] <= 0:
            queue.pop(0)
        Path(path).write_text(json.dumps(doc))
    return fault


def _fault(op: str, ec2: bool = False) -> None:
    """Raise the next fault the faults file holds for `op`, if any."""
    fault = _next_fault(op)
    if fault is None:
        return
    code = str(fault.get("code", "ThrottlingException"))
    status = int(fault.get("status", 400))
    message = str(fault.get("message", f"injected {code} for {op}"))
    _record(op, fault=code)
    if ec2:
        raise _InjectedEC2(code, status, message)
    raise _Injected(code, status, message)


def _validation(message: str) -> JsonRESTError:
    err = JsonRESTError("ValidationException", message)
    err.code = 400
    return err


def _not_found(message: str) -> JsonRESTError:
    err = JsonRESTError("ResourceNotFoundException", message)
    err.code = 404
    return err


# -- the EBS direct APIs ------------------------------------------------------------------


def _ec2_snapshot(backend: Any, snapshot_id: str) -> Any:
    snap = backend.ec2_backend.snapshots.get(snapshot_id)
    if snap is None:
        raise _not_found(f"The snapshot '{snapshot_id}' does not exist.")
    return snap


def _ebs_snapshot(backend: Any, snapshot_id: str) -> Any:
    snap = backend.snapshots.get(snapshot_id)
    if snap is None or snapshot_id not in backend.ec2_backend.snapshots:
        raise _not_found(f"The snapshot '{snapshot_id}' does not exist.")
    return snap


def _kms_key_exists(account_id: str, region: str, key: str) -> bool:
    from moto.kms.models import kms_backends

    kms = kms_backends[account_id][region]
    try:
        kms.describe_key(key)
    except Exception:
        return False
    return True


def start_snapshot(
    self: Any,
    volume_size: int,
    tags: list[dict[str, str]] | None,
    description: str,
    parent_snapshot_id: str | None = None,
    client_token: str | None = None,
    encrypted: bool | None = None,
    kms_key_arn: str | None = None,
    timeout: int | None = None,
) -> Any:
    with _lock:
        tokens: dict[str, str] = self.__dict__.setdefault("_motoext_tokens", {})
        if client_token and client_token in tokens:
            known = self.snapshots[tokens[client_token]]
            _record("StartSnapshot", snapshot=known.snapshot_id, token=client_token, repeated=True)
            return known
        parent = None
        if parent_snapshot_id:
            parent = _ebs_snapshot(self, parent_snapshot_id)
            parent_ec2 = _ec2_snapshot(self, parent_snapshot_id)
            if parent_ec2.status != "completed":
                raise _validation(f"The parent snapshot {parent_snapshot_id} is not completed.")
            if volume_size < parent.volume_size:
                raise _validation("The volume size cannot be smaller than the parent's.")
            if parent_ec2.encrypted and not encrypted:
                raise _validation("A child of an encrypted snapshot must be encrypted.")
        if kms_key_arn and not encrypted:
            raise _validation("KmsKeyArn is given but Encrypted is not true.")
        if kms_key_arn and not _kms_key_exists(self.account_id, self.region_name, kms_key_arn):
            raise _validation(f"The KMS key {kms_key_arn} does not exist or is not accessible.")
        snapshot: Any = _original_start(
            self, volume_size=volume_size, tags=tags, description=description
        )
        ec2_snap = self.ec2_backend.snapshots[snapshot.snapshot_id]
        ec2_snap.status = "pending"
        ec2_snap.encrypted = bool(encrypted)
        if encrypted:
            ec2_snap.kms_key_id = kms_key_arn or (
                f"arn:aws:kms:{self.region_name}:{self.account_id}:alias/aws/ebs"
            )
        snapshot.block_size = BLOCK_SIZE
        snapshot.status = "pending"
        snapshot.kms_key_arn = ec2_snap.kms_key_id if encrypted else None
        snapshot.parent_snapshot_id = parent_snapshot_id
        snapshot.timeout = timeout
        snapshot.written = set()
        if parent is not None:
            snapshot.blocks = dict(parent.blocks)
        if client_token:
            tokens[client_token] = snapshot.snapshot_id
        _record(
            "StartSnapshot",
            snapshot=snapshot.snapshot_id,
            parent=parent_snapshot_id,
            token=client_token,
            size=volume_size,
            encrypted=bool(encrypted),
            kms=kms_key_arn,
            tags=tags or [],
        )
        return snapshot


def put_snapshot_block(
    self: Any,
    snapshot_id: str,
    block_index: int,
    block_data: bytes,
    checksum: str | None,
    checksum_algorithm: str | None,
    data_length: int | None,
) -> tuple[str | None, str | None]:
    snapshot = _ebs_snapshot(self, snapshot_id)
    if snapshot.status != "pending":
        raise _validation(f"The snapshot {snapshot_id} is not pending; blocks cannot be added.")
    if isinstance(block_data, str):
        block_data = block_data.encode("latin-1")
    if len(block_data) != BLOCK_SIZE or int(data_length or 0) != BLOCK_SIZE:
        raise _validation(
            f"The block data must be {BLOCK_SIZE} bytes (got {len(block_data)}, "
            f"DataLength {data_length})."
        )
    if checksum_algorithm != "SHA256":
        raise _validation("ChecksumAlgorithm must be SHA256.")
    expected = base64.b64encode(hashlib.sha256(block_data).digest()).decode()
    if checksum != expected:
        raise _validation("The checksum does not match the block data.")
    blocks = snapshot.volume_size * 1024**3 // BLOCK_SIZE
    if not 0 <= int(block_index) < blocks:
        raise _validation(f"Block index {block_index} is beyond the volume's {blocks} blocks.")
    with _lock:
        snapshot.put_block(int(block_index), block_data, checksum, checksum_algorithm, data_length)
        snapshot.written.add(int(block_index))
    zero = block_data.count(0) == len(block_data)
    _record("PutSnapshotBlock", snapshot=snapshot_id, index=int(block_index), zero=zero)
    return checksum, checksum_algorithm


def complete_snapshot(self: Any, snapshot_id: str, changed_blocks_count: int | None = None) -> str:
    snapshot = _ebs_snapshot(self, snapshot_id)
    with _lock:
        if snapshot.status == "completed":
            return "completed"
        if changed_blocks_count is not None and int(changed_blocks_count) != len(snapshot.written):
            raise _validation(
                f"ChangedBlocksCount {changed_blocks_count} does not match the "
                f"{len(snapshot.written)} blocks written."
            )
        snapshot.status = "completed"
        ec2_snap = self.ec2_backend.snapshots[snapshot_id]
        ec2_snap.motoext_describes_left = int(os.environ.get(PENDING_VAR, "1"))
        failed = _next_fault(SNAPSHOT_FAILURE)
        if failed is not None:  # AWS could not complete it: DescribeSnapshots says error
            ec2_snap.status = str(failed.get("code", "error"))
            ec2_snap.motoext_describes_left = None
    _record("CompleteSnapshot", snapshot=snapshot_id, changed=changed_blocks_count)
    return "pending"


def list_snapshot_blocks(self: Any, snapshot_id: str) -> Any:
    return _ebs_snapshot(self, snapshot_id)


def get_snapshot_block(self: Any, snapshot_id: str, block_index: int) -> Any:
    snapshot = _ebs_snapshot(self, snapshot_id)
    block = snapshot.blocks.get(int(block_index))
    if block is None:
        raise _validation(f"Block {block_index} of {snapshot_id} holds no data.")
    return block


class EBSResponse(ebs_responses.EBSResponse):
    """Passes the parameters moto ignores to the patched backend; injects faults."""

    def start_snapshot(self) -> ActionResult:
        _fault("StartSnapshot")
        backend: Any = self.ebs_backend
        snapshot = backend.start_snapshot(
            volume_size=self._get_param("VolumeSize"),
            tags=self._get_param("Tags"),
            description=self._get_param("Description"),
            parent_snapshot_id=self._get_param("ParentSnapshotId"),
            client_token=self._get_param("ClientToken"),
            encrypted=self._get_param("Encrypted"),
            kms_key_arn=self._get_param("KmsKeyArn"),
            timeout=self._get_param("Timeout"),
        )
        result = {
            "SnapshotId": snapshot.snapshot_id,
            "OwnerId": snapshot.account_id,
            "Status": snapshot.status,
            "StartTime": snapshot.start_time,
            "VolumeSize": snapshot.volume_size,
            "BlockSize": snapshot.block_size,
            "Tags": snapshot.tags,
            "Description": snapshot.description,
            "ParentSnapshotId": snapshot.parent_snapshot_id,
            "KmsKeyArn": snapshot.kms_key_arn,
        }
        return ActionResult({k: v for k, v in result.items() if v is not None})

    def put_snapshot_block(self) -> ActionResult:
        _fault("PutSnapshotBlock")
        return _original_put_response(self)

    def complete_snapshot(self) -> ActionResult:
        _fault("CompleteSnapshot")
        backend: Any = self.ebs_backend
        status = backend.complete_snapshot(
            snapshot_id=self._get_param("SnapshotId"),
            changed_blocks_count=self._get_param("ChangedBlocksCount"),
        )
        return ActionResult({"Status": status})

    def list_snapshot_blocks(self) -> ActionResult:
        _fault("ListSnapshotBlocks")
        snapshot = self.ebs_backend.list_snapshot_blocks(snapshot_id=self._get_param("SnapshotId"))
        blocks = [
            {"BlockIndex": idx, "BlockToken": b.block_token}
            for idx, b in sorted(snapshot.blocks.items())
        ]
        return ActionResult(
            {"Blocks": blocks, "VolumeSize": snapshot.volume_size, "BlockSize": snapshot.block_size}
        )

    def get_snapshot_block(self) -> ActionResult:
        _fault("GetSnapshotBlock")
        return _original_get_response(self)


# -- EC2: DescribeSnapshots, DeleteSnapshot, RegisterImage --------------------------------


def describe_snapshots(
    self: Any, snapshot_ids: list[str] | None = None, filters: Any = None
) -> Any:
    found = _original_describe_snapshots(self, snapshot_ids=snapshot_ids, filters=filters)
    with _lock:
        snap: Any
        for snap in found:
            left = getattr(snap, "motoext_describes_left", None)
            if left is None:
                continue
            if left <= 0:
                snap.status = "completed"
                snap.motoext_describes_left = None
            else:
                snap.motoext_describes_left = left - 1
    return found


def delete_snapshot(self: Any, snapshot_id: str) -> Any:
    for ami in list(self.amis.values()):
        for mapping in getattr(ami, "motoext_mappings", None) or []:
            if (mapping.get("Ebs") or {}).get("SnapshotId") == snapshot_id:
                raise InvalidSnapshotInUse(snapshot_id, ami.id)
    deleted = _original_delete_snapshot(self, snapshot_id)
    _record("DeleteSnapshot", snapshot=snapshot_id)
    return deleted


class LandedAmi(ec2_amis.Ami):
    """An AMI registered from snapshots: it shows what it was registered with."""

    # moto's model registry names a model's service from its module.
    __module__ = "moto.ec2.models.amis"
    motoext_mappings: list[dict[str, Any]]

    @property
    def block_device_mappings(self) -> list[dict[str, Any]]:
        return self.motoext_mappings


def _register(backend: Any, params: dict[str, Any]) -> LandedAmi:
    mappings = params.get("BlockDeviceMappings") or []
    root = params.get("RootDeviceName")
    if not root or not any(m.get("DeviceName") == root for m in mappings):
        raise InvalidParameterValue("The root device name must be one of the mappings.")
    kept: list[dict[str, Any]] = []
    for m in mappings:
        ebs = dict(m.get("Ebs") or {})
        snapshot_id = ebs.get("SnapshotId")
        snap = backend.snapshots.get(snapshot_id)
        if snap is None:
            raise EC2ClientError(
                "InvalidSnapshot.NotFound", f"The snapshot {snapshot_id} does not exist."
            )
        if snap.status != "completed":
            raise EC2ClientError(
                "IncorrectState", f"Snapshot {snapshot_id} is not completed ({snap.status})."
            )
        ebs.setdefault("VolumeSize", snap.volume_size)
        ebs.setdefault("DeleteOnTermination", True)
        ebs.setdefault("VolumeType", "gp3")
        ebs["Encrypted"] = bool(snap.encrypted)
        kept.append({"DeviceName": m["DeviceName"], "Ebs": ebs})
    ami_id = random_ami_id()
    ami: Any = LandedAmi.__new__(LandedAmi)
    ami.motoext_mappings = kept
    # Ami.__init__ makes a placeholder snapshot; it is removed again below.
    ec2_amis.Ami.__init__(
        ami,
        backend,
        ami_id,
        name=params.get("Name"),
        description=params.get("Description", ""),
        virtualization_type=params.get("VirtualizationType", "hvm"),
        architecture=params.get("Architecture", "x86_64"),
        root_device_type="ebs",
        root_device_name=root,
        boot_mode=params.get("BootMode") or "legacy-bios",
        region_name=backend.region_name,
    )
    backend.snapshots.pop(ami.ebs_snapshot.id, None)
    ami.ena_support = bool(params.get("EnaSupport"))
    ami.imds_support = params.get("ImdsSupport")
    ami.sriov_net_support = params.get("SriovNetSupport")
    ami.hypervisor = "xen"
    for spec in params.get("TagSpecifications") or []:
        if spec.get("ResourceType") == "image":
            ami.add_tags({t["Key"]: t["Value"] for t in spec.get("Tags", [])})
    backend.amis[ami_id] = ami
    landed: LandedAmi = ami
    return landed


class AmisResponse(amis_responses.AmisResponse):
    def register_image(self) -> ActionResult:
        self.error_on_dryrun()
        _fault("RegisterImage", ec2=True)
        names = (
            "Name",
            "Description",
            "RootDeviceName",
            "BlockDeviceMappings",
            "Architecture",
            "BootMode",
            "EnaSupport",
            "ImdsSupport",
            "SriovNetSupport",
            "VirtualizationType",
            "TagSpecifications",
        )
        params = {n: self._get_param(n) for n in names if self._get_param(n) is not None}
        with _lock:
            image = _register(self.ec2_backend, params)
        _record(
            "RegisterImage",
            image=image.id,
            snapshots=[m["Ebs"]["SnapshotId"] for m in image.motoext_mappings],
        )
        return ActionResult({"ImageId": image.id})

    def deregister_image(self) -> ActionResult:
        _fault("DeregisterImage", ec2=True)
        result = _original_deregister_response(self)
        _record("DeregisterImage", image=self._get_param("ImageId"))
        return result


_original_start = ebs_models.EBSBackend.start_snapshot
_original_put_response = ebs_responses.EBSResponse.put_snapshot_block
_original_get_response = ebs_responses.EBSResponse.get_snapshot_block
_original_deregister_response = amis_responses.AmisResponse.deregister_image
_original_describe_snapshots = ec2_ebs.EBSBackend.describe_snapshots
_original_delete_snapshot = ec2_ebs.EBSBackend.delete_snapshot


def patch() -> None:
    """Install the extension into moto's classes (in this process)."""
    table: list[tuple[type, str, Any]] = [
        (ebs_models.EBSBackend, "start_snapshot", start_snapshot),
        (ebs_models.EBSBackend, "put_snapshot_block", put_snapshot_block),
        (ebs_models.EBSBackend, "complete_snapshot", complete_snapshot),
        (ebs_models.EBSBackend, "list_snapshot_blocks", list_snapshot_blocks),
        (ebs_models.EBSBackend, "get_snapshot_block", get_snapshot_block),
        (ec2_ebs.EBSBackend, "describe_snapshots", describe_snapshots),
        (ec2_ebs.EBSBackend, "delete_snapshot", delete_snapshot),
        (amis_responses.AmisResponse, "register_image", AmisResponse.register_image),
        (amis_responses.AmisResponse, "deregister_image", AmisResponse.deregister_image),
    ]
    for name in (
        "start_snapshot",
        "put_snapshot_block",
        "complete_snapshot",
        "list_snapshot_blocks",
        "get_snapshot_block",
    ):
        table.append((ebs_responses.EBSResponse, name, getattr(EBSResponse, name)))
    for cls, name, fn in table:
        setattr(cls, name, fn)


def main(argv: list[str]) -> None:
    patch()
    from moto.server import main as moto_main

    moto_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
