"""The AWS policies the connector documents and prints: the staging bucket's
policy (what the bucket refuses) and the least-privilege IAM policy of the
connector's credentials (what they may do).

Pure functions: no I/O, no SDK.
"""

from __future__ import annotations

import re
from typing import Any

POLICY_VERSION = "2012-10-17"
_KMS_KEY_ARN = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[A-Za-z0-9-]+$")


def partition(region: str) -> str:
    """The ARN partition of a region (aws, aws-us-gov, aws-cn)."""
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    if region.startswith("cn-"):
        return "aws-cn"
    return "aws"


def is_kms_key_arn(value: str | None) -> bool:
    return bool(value) and bool(_KMS_KEY_ARN.match(value or ""))


def bucket_policy(
    bucket: str, region: str, sse: str, kms_key_id: str | None = None
) -> dict[str, Any]:
    """A bucket policy that denies requests without TLS, with TLS below 1.2, and
    object writes without server-side encryption (or with another kind of it).

    With `sse = "aws:kms"` and a key ARN, writes that name another KMS key are
    denied too (the condition compares ARNs, so an alias or a bare key id
    cannot be enforced this way).
    """
    arn = f"arn:{partition(region)}:s3:::{bucket}"
    everything = [arn, f"{arn}/*"]
    statements: list[dict[str, Any]] = [
        {
            "Sid": "DenyInsecureTransport",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": everything,
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        },
        {
            "Sid": "DenyTlsBelow12",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": everything,
            "Condition": {"NumericLessThan": {"s3:TlsVersion": "1.2"}},
        },
        {
            "Sid": "DenyPutWithoutServerSideEncryption",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:PutObject",
            "Resource": f"{arn}/*",
            "Condition": {"Null": {"s3:x-amz-server-side-encryption": "true"}},
        },
        {
            "Sid": "DenyPutWithOtherServerSideEncryption",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:PutObject",
            "Resource": f"{arn}/*",
            "Condition": {"StringNotEqualsIfExists": {"s3:x-amz-server-side-encryption": sse}},
        },
    ]
    if sse == "aws:kms" and kms_key_id and is_kms_key_arn(kms_key_id):
        statements.append(
            {
                "Sid": "DenyPutWithOtherKmsKey",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:PutObject",
                "Resource": f"{arn}/*",
                "Condition": {
                    "StringNotEqualsIfExists": {
                        "s3:x-amz-server-side-encryption-aws-kms-key-id": kms_key_id
                    }
                },
            }
        )
    return {"Version": POLICY_VERSION, "Id": "ConnectorStagingBucket", "Statement": statements}


# The calls of the landing stage (`connector.adapters.ebs`), as IAM actions.
LANDING_EBS_ACTIONS = (
    "ebs:StartSnapshot",
    "ebs:PutSnapshotBlock",
    "ebs:CompleteSnapshot",
    "ebs:ListSnapshotBlocks",  # reading a landed snapshot back
    "ebs:GetSnapshotBlock",
)
LANDING_EC2_ACTIONS = (
    "ec2:DescribeSnapshots",
    "ec2:DeleteSnapshot",
    "ec2:RegisterImage",
    "ec2:DescribeImages",
    "ec2:DeregisterImage",
    "ec2:CreateTags",  # the tags StartSnapshot and RegisterImage set
)
# What EBS asks of a customer managed key for encrypted snapshots.
LANDING_KMS_ACTIONS = (
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:CreateGrant",
    "kms:DescribeKey",
    "kms:Decrypt",
)


def iam_policy(
    bucket: str,
    prefix: str,
    region: str,
    kms_key_arn: str | None = None,
    landing: bool = False,
    landing_kms_key_arn: str | None = None,
    landing_role_arn: str | None = None,
) -> dict[str, Any]:
    """The least-privilege IAM policy of the connector's AWS credentials.

    S3: the bucket (HeadBucket and listing need s3:ListBucket on the bucket
    itself) and the objects under the prefix. KMS (with SSE-KMS): the data keys
    S3 asks for on the connector's behalf, only through S3. `landing` adds the
    EBS direct API and EC2 actions of the landing stage: exactly the calls of
    `connector.adapters.ebs` (tests/unit/test_landing_policy.py checks it), with the
    landing KMS key's actions and the AssumeRole of a job's role when given.
    """
    part = partition(region)
    arn = f"arn:{part}:s3:::{bucket}"
    objects = f"{arn}/{prefix.strip('/')}/*" if prefix.strip("/") else f"{arn}/*"
    statements: list[dict[str, Any]] = [
        {
            "Sid": "StagingBucket",
            "Effect": "Allow",
            "Action": [
                "s3:ListBucket",
                "s3:ListBucketMultipartUploads",
                "s3:GetEncryptionConfiguration",
            ],
            "Resource": arn,
        },
        {
            "Sid": "StagingObjects",
            "Effect": "Allow",
            "Action": [
                "s3:PutObject",
                "s3:GetObject",
                "s3:DeleteObject",
                "s3:AbortMultipartUpload",
                "s3:ListMultipartUploadParts",
            ],
            "Resource": objects,
        },
    ]
    if kms_key_arn:
        statements.append(
            {
                "Sid": "StagingKmsKeyThroughS3",
                "Effect": "Allow",
                "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
                "Resource": kms_key_arn,
                "Condition": {"StringEquals": {"kms:ViaService": f"s3.{region}.amazonaws.com"}},
            }
        )
    if landing:
        statements += [
            {
                "Sid": "LandingEbsDirectApi",
                "Effect": "Allow",
                "Action": list(LANDING_EBS_ACTIONS),
                "Resource": f"arn:{part}:ec2:{region}::snapshot/*",
            },
            {
                "Sid": "LandingImages",
                "Effect": "Allow",
                "Action": list(LANDING_EC2_ACTIONS),
                "Resource": "*",
            },
        ]
        if landing_role_arn:
            statements.append(
                {
                    "Sid": "LandingAssumeRole",
                    "Effect": "Allow",
                    "Action": ["sts:AssumeRole"],
                    "Resource": landing_role_arn,
                }
            )
        if landing_kms_key_arn:
            statements.append(
                {
                    "Sid": "LandingKmsKey",
                    "Effect": "Allow",
                    "Action": list(LANDING_KMS_ACTIONS),
                    "Resource": landing_kms_key_arn,
                }
            )
    return {"Version": POLICY_VERSION, "Statement": statements}


# vCenter privileges, by name, and what needs them. `connector check` verifies
# them on the objects they apply to; docs/permissions.md lists the same.
VCENTER_PRIVILEGES: dict[str, tuple[str, str]] = {
    # privilege: (applies to, why)
    "System.Anonymous": ("vcenter", "log in"),
    "System.View": ("vcenter", "see the inventory"),
    "System.Read": ("vcenter", "read VM, disk and snapshot properties"),
    "VirtualMachine.Config.ChangeTracking": ("vm", "turn on Changed Block Tracking"),
    "VirtualMachine.State.CreateSnapshot": ("vm", "take the run's snapshot"),
    "VirtualMachine.State.RemoveSnapshot": ("vm", "remove the run's snapshot"),
    "VirtualMachine.Provisioning.DiskRandomRead": (
        "vm",
        "QueryChangedDiskAreas and read-only disk access",
    ),
    "Datastore.Browse": ("datastore", "read disk files over the datastore HTTPS endpoint"),
}
# Extra privileges of the nbd transport (VDDK).
VCENTER_NBD_PRIVILEGES: dict[str, tuple[str, str]] = {
    "VirtualMachine.Provisioning.DiskRandomAccess": ("vm", "open disks through VDDK"),
    "VirtualMachine.Config.DiskLease": ("vm", "lease disks for NBD/NBDSSL transfers"),
}


def vcenter_privileges(enable_cbt: bool, transport: str) -> dict[str, tuple[str, str]]:
    """The privileges the connector needs for this configuration."""
    needed = dict(VCENTER_PRIVILEGES)
    if not enable_cbt:
        needed.pop("VirtualMachine.Config.ChangeTracking")
    if transport == "nbd":
        needed.update(VCENTER_NBD_PRIVILEGES)
    if transport != "datastore-https":
        needed.pop("Datastore.Browse")
    return needed
