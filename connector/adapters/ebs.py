"""SnapshotTarget on AWS: EBS snapshots through the EBS direct APIs, AMIs through EC2.

Clients come from `make_aws_client`: verified TLS 1.2 or later, explicit trust
(`verify=`), no endpoint from the environment, one attempt per call (the retry
decorator, `connector.decorators.landing`, tries transient failures again). With a
role name, the clients use temporary credentials from STS AssumeRole of that role
in the caller's account.

Each botocore error becomes a class of `connector.errors` (`_map_error`):
throttling (ThrottlingException, RequestThrottledException), 5xx and dropped
connections are TransientError; a refused permission AuthenticationError naming
the action and the landing IAM policy; an unusable KMS key a PermanentError that
names it.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ProxyConnectionError,
)

from connector.adapters.s3 import _find_cause, make_aws_client
from connector.domain.landing import EBS_BLOCK
from connector.errors import (
    AuthenticationError,
    ConnectorError,
    NotFoundError,
    PermanentError,
    TLSTrustError,
    TransientError,
    UnreachableError,
)
from connector.logging import register_secret, scrub
from connector.network import Proxy
from connector.secrets import Secret
from connector.tls import describe_ssl_error

_TRANSIENT = frozenset(
    {
        "ThrottlingException",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "Throttling",
        "InternalServerException",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
    }
)
_DENIED = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnauthorizedOperation",
        "UnrecognizedClientException",
        "AuthFailure",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
    }
)
_NOT_FOUND = frozenset(
    {
        "ResourceNotFoundException",
        "InvalidSnapshot.NotFound",
        "InvalidAMIID.NotFound",
        "InvalidAMIID.Unavailable",  # deregistered
    }
)

# The IAM actions each call needs (docs/permissions.md, `connector iam-policy --landing`).
ACTIONS = {
    "StartSnapshot": "ebs:StartSnapshot",
    "PutSnapshotBlock": "ebs:PutSnapshotBlock",
    "CompleteSnapshot": "ebs:CompleteSnapshot",
    "ListSnapshotBlocks": "ebs:ListSnapshotBlocks",
    "GetSnapshotBlock": "ebs:GetSnapshotBlock",
    "DescribeSnapshots": "ec2:DescribeSnapshots",
    "DeleteSnapshot": "ec2:DeleteSnapshot",
    "RegisterImage": "ec2:RegisterImage",
    "DescribeImages": "ec2:DescribeImages",
    "DeregisterImage": "ec2:DeregisterImage",
    "CreateTags": "ec2:CreateTags",
    "AssumeRole": "sts:AssumeRole",
    "GetCallerIdentity": "sts:GetCallerIdentity",
}


def checksum(data: bytes) -> str:
    """PutSnapshotBlock's Checksum: base64 of the block's SHA-256."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


class EbsTarget:
    """EBS direct APIs and EC2 through boto3."""

    def __init__(
        self,
        *,
        region: str,
        endpoint_url: str | None = None,
        ca_file: Path | None = None,
        access_key_id: Secret | None = None,
        secret_access_key: Secret | None = None,
        role_name: str | None = None,
        use_fips_endpoint: bool = False,
        proxy: Proxy | None = None,
        max_pool_connections: int = 16,
    ) -> None:
        for secret in (access_key_id, secret_access_key):
            if secret is not None:
                register_secret(secret)
        common: dict[str, Any] = {
            "region": region,
            "endpoint_url": endpoint_url,
            "ca_file": ca_file,
            "use_fips_endpoint": use_fips_endpoint,
            "proxy": proxy,
        }
        self.endpoint = endpoint_url or f"https://ebs.{region}.amazonaws.com"
        keys: dict[str, Any] = {
            "access_key_id": access_key_id,
            "secret_access_key": secret_access_key,
        }
        token: Secret | None = None
        if role_name:
            sts = make_aws_client("sts", **common, **keys)
            try:
                keys, token = self._assume(sts, role_name)
            finally:
                sts.close()
        self.role_name = role_name
        self.ebs = make_aws_client(
            "ebs", **common, **keys, session_token=token, max_pool_connections=max_pool_connections
        )
        self.ec2 = make_aws_client("ec2", **common, **keys, session_token=token)

    def _assume(self, sts: Any, role_name: str) -> tuple[dict[str, Any], Secret]:
        account = self._call(lambda: sts.get_caller_identity()["Account"], "GetCallerIdentity")
        arn = f"arn:aws:iam::{account}:role/{role_name}"
        creds = self._call(
            lambda: sts.assume_role(RoleArn=arn, RoleSessionName="connector-landing")[
                "Credentials"
            ],
            "AssumeRole",
            what=f"role {role_name}",
        )
        keys: dict[str, Any] = {
            "access_key_id": Secret(creds["AccessKeyId"]),
            "secret_access_key": Secret(creds["SecretAccessKey"]),
        }
        token = Secret(creds["SessionToken"])
        for secret in (*keys.values(), token):
            if secret is not None:
                register_secret(secret)
        return keys, token

    def close(self) -> None:
        self.ebs.close()
        self.ec2.close()

    # -- snapshots -----------------------------------------------------------------------

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
        args: dict[str, Any] = {
            "VolumeSize": volume_size,
            "ClientToken": client_token,
            "Description": description,
            "Timeout": timeout_minutes,
            "Tags": [{"Key": k, "Value": v} for k, v in sorted(tags.items())],
        }
        if parent_snapshot_id:
            args["ParentSnapshotId"] = parent_snapshot_id
        if encrypted:
            args["Encrypted"] = True
            if kms_key_id:
                args["KmsKeyArn"] = kms_key_id
        resp = self._call(lambda: self.ebs.start_snapshot(**args), "StartSnapshot", kms=kms_key_id)
        return str(resp["SnapshotId"]), str(resp.get("Status", "pending"))

    def put_block(self, snapshot_id: str, index: int, data: bytes) -> None:
        if len(data) != EBS_BLOCK:
            raise ValueError(f"an EBS block is {EBS_BLOCK} bytes, not {len(data)}")
        self._call(
            lambda: self.ebs.put_snapshot_block(
                SnapshotId=snapshot_id,
                BlockIndex=index,
                BlockData=data,
                DataLength=len(data),
                Checksum=checksum(data),
                ChecksumAlgorithm="SHA256",
            ),
            "PutSnapshotBlock",
            what=f"block {index} of snapshot {snapshot_id}",
        )

    def complete_snapshot(self, snapshot_id: str, changed_blocks: int) -> str:
        resp = self._call(
            lambda: self.ebs.complete_snapshot(
                SnapshotId=snapshot_id, ChangedBlocksCount=changed_blocks
            ),
            "CompleteSnapshot",
            what=f"snapshot {snapshot_id}",
        )
        return str(resp.get("Status", "pending"))

    def snapshot_state(self, snapshot_id: str) -> str | None:
        try:
            resp = self._call(
                lambda: self.ec2.describe_snapshots(SnapshotIds=[snapshot_id], OwnerIds=["self"]),
                "DescribeSnapshots",
                what=f"snapshot {snapshot_id}",
            )
        except NotFoundError:
            return None
        found = resp.get("Snapshots") or []
        return str(found[0]["State"]) if found else None

    def snapshots_tagged(self, key: str, value: str) -> list[str]:
        resp = self._call(
            lambda: self.ec2.describe_snapshots(
                OwnerIds=["self"], Filters=[{"Name": f"tag:{key}", "Values": [value]}]
            ),
            "DescribeSnapshots",
        )
        return sorted(str(s["SnapshotId"]) for s in resp.get("Snapshots") or [])

    def delete_snapshot(self, snapshot_id: str) -> None:
        try:
            self._call(
                lambda: self.ec2.delete_snapshot(SnapshotId=snapshot_id),
                "DeleteSnapshot",
                what=f"snapshot {snapshot_id}",
            )
        except NotFoundError:
            return

    def list_blocks(self, snapshot_id: str) -> list[int]:
        out: list[int] = []
        token: str | None = None
        while True:
            args: dict[str, Any] = {"SnapshotId": snapshot_id}
            if token:
                args["NextToken"] = token
            resp = self._call(
                lambda a=args: self.ebs.list_snapshot_blocks(**a),
                "ListSnapshotBlocks",
                what=f"snapshot {snapshot_id}",
            )
            out.extend(int(b["BlockIndex"]) for b in resp.get("Blocks") or [])
            token = resp.get("NextToken")
            if not token:
                return sorted(out)

    def read_block(self, snapshot_id: str, index: int) -> bytes:
        listed = self._call(
            lambda: self.ebs.list_snapshot_blocks(
                SnapshotId=snapshot_id, StartingBlockIndex=index, MaxResults=100
            ),
            "ListSnapshotBlocks",
            what=f"snapshot {snapshot_id}",
        )
        tokens = {int(b["BlockIndex"]): b["BlockToken"] for b in listed.get("Blocks") or []}
        if index not in tokens:
            return bytes(EBS_BLOCK)
        resp = self._call(
            lambda: self.ebs.get_snapshot_block(
                SnapshotId=snapshot_id, BlockIndex=index, BlockToken=tokens[index]
            ),
            "GetSnapshotBlock",
            what=f"block {index} of snapshot {snapshot_id}",
        )
        data: bytes = resp["BlockData"].read()
        return data

    # -- AMIs ----------------------------------------------------------------------------

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
        resp = self._call(
            lambda: self.ec2.register_image(
                Name=name,
                Description=description,
                RootDeviceName=mappings[0][0],
                BlockDeviceMappings=[
                    {"DeviceName": dev, "Ebs": {"SnapshotId": sid, "DeleteOnTermination": True}}
                    for dev, sid in mappings
                ],
                VirtualizationType="hvm",
                Architecture=architecture,
                BootMode=boot_mode,
                EnaSupport=ena_support,
                TagSpecifications=[
                    {
                        "ResourceType": "image",
                        "Tags": [{"Key": k, "Value": v} for k, v in sorted(tags.items())],
                    }
                ],
            ),
            "RegisterImage",
            what=f"AMI {name}",
        )
        return str(resp["ImageId"])

    def find_image(self, name: str) -> str | None:
        resp = self._call(
            lambda: self.ec2.describe_images(
                Owners=["self"], Filters=[{"Name": "name", "Values": [name]}]
            ),
            "DescribeImages",
        )
        found = resp.get("Images") or []
        return str(found[0]["ImageId"]) if found else None

    def describe_image(self, image_id: str) -> dict[str, Any] | None:
        try:
            resp = self._call(
                lambda: self.ec2.describe_images(ImageIds=[image_id]),
                "DescribeImages",
                what=f"AMI {image_id}",
            )
        except NotFoundError:
            return None
        found = resp.get("Images") or []
        return dict(found[0]) if found else None

    def deregister_image(self, image_id: str) -> None:
        try:
            self._call(
                lambda: self.ec2.deregister_image(ImageId=image_id),
                "DeregisterImage",
                what=f"AMI {image_id}",
            )
        except NotFoundError:
            return

    # -- permissions -----------------------------------------------------------------------

    def probe_permissions(self) -> dict[str, str]:
        """Each landing action -> "ok" or why not, without changing anything: EC2 calls
        with DryRun, the EBS direct APIs on a snapshot that does not exist (an allowed
        call is then refused as not found, a denied one as AccessDenied)."""
        missing_snap = "snap-00000000000000000"
        probes: dict[str, Callable[[], Any]] = {
            "ebs:StartSnapshot": lambda: self.ebs.start_snapshot(
                VolumeSize=1, ParentSnapshotId=missing_snap, Timeout=10
            ),
            "ebs:PutSnapshotBlock": lambda: self.ebs.put_snapshot_block(
                SnapshotId=missing_snap,
                BlockIndex=0,
                BlockData=bytes(EBS_BLOCK),
                DataLength=EBS_BLOCK,
                Checksum=checksum(bytes(EBS_BLOCK)),
                ChecksumAlgorithm="SHA256",
            ),
            "ebs:CompleteSnapshot": lambda: self.ebs.complete_snapshot(
                SnapshotId=missing_snap, ChangedBlocksCount=0
            ),
            "ebs:ListSnapshotBlocks": lambda: self.ebs.list_snapshot_blocks(
                SnapshotId=missing_snap
            ),
            "ec2:DescribeSnapshots": lambda: self.ec2.describe_snapshots(
                OwnerIds=["self"], MaxResults=5
            ),
            "ec2:DescribeImages": lambda: self.ec2.describe_images(
                Owners=["self"], Filters=[{"Name": "name", "Values": ["connector-probe"]}]
            ),
            "ec2:DeleteSnapshot": lambda: self.ec2.delete_snapshot(
                SnapshotId=missing_snap, DryRun=True
            ),
            "ec2:RegisterImage": lambda: self.ec2.register_image(
                Name="connector-probe",
                RootDeviceName="/dev/xvda",
                BlockDeviceMappings=[
                    {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": missing_snap}}
                ],
                VirtualizationType="hvm",
                DryRun=True,
            ),
            "ec2:DeregisterImage": lambda: self.ec2.deregister_image(
                ImageId="ami-00000000000000000", DryRun=True
            ),
            "ec2:CreateTags": lambda: self.ec2.create_tags(
                Resources=[missing_snap],
                Tags=[{"Key": "connector:probe", "Value": "1"}],
                DryRun=True,
            ),
        }
        out: dict[str, str] = {}
        for action, probe in probes.items():
            try:
                probe()
                out[action] = "ok"
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                if code in _DENIED or status == 403:
                    out[action] = f"denied ({code or status})"
                elif code in ("DryRunOperation",) or code in _NOT_FOUND or status in (400, 404):
                    out[action] = "ok"
                else:
                    out[action] = f"unknown ({code or status})"
            except BotoCoreError as exc:
                raise _map_error(exc, action, "", self.endpoint, None) from None
        return out

    # -- errors --------------------------------------------------------------------------

    def _call(self, fn: Any, op: str, *, what: str = "", kms: str | None = None) -> Any:
        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            error = _map_error(exc, op, what, self.endpoint, kms)
            raise type(error)(scrub(str(error))) from None


def _map_error(
    exc: BaseException, op: str, what: str, endpoint: str, kms: str | None
) -> ConnectorError:
    where = f" of {what}" if what else ""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", "") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        message = str(err.get("Message", "") or "")
        detail = f"{code or status}" + (f": {message}" if message else "")
        if code in _TRANSIENT or "Throttl" in code or status >= 500 or status == 429:
            return TransientError(f"AWS {op}{where} was throttled or failed; try again ({detail})")
        if "KMS" in message or "kms" in code.lower():
            return PermanentError(
                f"AWS {op}{where} failed because of the KMS key {kms or '(the default EBS key)'} "
                f"({detail}); check that the key exists in this region, is enabled, and that "
                "its key policy lets these credentials use it for EBS"
            )
        if code in _DENIED or status == 403:
            action = ACTIONS.get(op, op)
            return AuthenticationError(
                f"AWS refused {op}{where} ({detail}); the credentials need {action}: "
                "apply the policy of `connector iam-policy --landing` (docs/permissions.md)"
            )
        if code in _NOT_FOUND or status == 404 or code.endswith(".NotFound"):
            return NotFoundError(f"AWS {op}{where}: not found ({detail})")
        return PermanentError(f"AWS {op}{where} failed ({detail})")
    ssl_error = _find_cause(exc, ssl.SSLError)
    if isinstance(ssl_error, ssl.SSLError):
        return TLSTrustError(f"TLS to {endpoint} failed: {describe_ssl_error(endpoint, ssl_error)}")
    if isinstance(exc, NoCredentialsError):
        return AuthenticationError(
            f"no AWS credentials for {op}; set [landing] access_key_id and its secret, "
            "or give the connector an instance or container role"
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ProxyConnectionError):
        return UnreachableError(f"AWS endpoint {endpoint} cannot be reached for {op}: {exc}")
    return TransientError(f"AWS {op}{where} failed: {exc}")
