"""Least privilege: the printed bucket and IAM policies, docs/permissions.md, and
`connector check` naming every missing vCenter privilege and IAM permission
(against the simulator, and a moto_server that enforces IAM)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.policies import VCENTER_NBD_PRIVILEGES, VCENTER_PRIVILEGES, iam_policy
from tests.harness.ca import TestCA as CA
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.moto import MotoServer, start_moto
from tests.harness.vcsim import Simulator

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
KMS_ARN = "arn:aws:kms:eu-central-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def statements_by_sid(policy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["Sid"]: s for s in policy["Statement"]}


def check(env: ConnectorEnv, *only: str) -> tuple[int, dict[str, dict[str, Any]]]:
    args = ["check", "--json"] + [a for name in only for a in ("--only", name)]
    proc = env.cli(*args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, {r["name"]: r for r in json.loads(proc.stdout)}


# -------------------------------------------------------------------- bucket policy


def test_bucket_policy_is_valid_json_with_the_three_denials(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket)
    proc = env.cli("bucket-policy", check=True)
    policy = json.loads(proc.stdout)
    assert policy["Version"] == "2012-10-17"
    sids = statements_by_sid(policy)
    bucket_arn = f"arn:aws:s3:::{s3_bucket}"
    for sid in sids.values():
        assert sid["Effect"] == "Deny" and sid["Principal"] == "*"
    tls = sids["DenyInsecureTransport"]
    assert tls["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert tls["Resource"] == [bucket_arn, f"{bucket_arn}/*"] and tls["Action"] == "s3:*"
    old = sids["DenyTlsBelow12"]
    assert old["Condition"] == {"NumericLessThan": {"s3:TlsVersion": "1.2"}}
    unencrypted = sids["DenyPutWithoutServerSideEncryption"]
    assert unencrypted["Action"] == "s3:PutObject"
    assert unencrypted["Condition"] == {"Null": {"s3:x-amz-server-side-encryption": "true"}}
    other = sids["DenyPutWithOtherServerSideEncryption"]
    assert other["Condition"] == {
        "StringNotEqualsIfExists": {"s3:x-amz-server-side-encryption": "AES256"}
    }
    # S3 accepts it as a bucket policy and keeps it as written.
    s3 = moto.boto3_client()
    s3.put_bucket_policy(Bucket=s3_bucket, Policy=proc.stdout)
    assert json.loads(s3.get_bucket_policy(Bucket=s3_bucket)["Policy"]) == policy
    # printing a policy is not an action on the connector: no audit record
    assert not (env.workdir / "state" / "audit.jsonl").exists()


def test_bucket_policy_pins_a_kms_key_given_by_arn(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer
) -> None:
    env = write_config(
        tmp_path / "c", vcsim, moto, "kms-bucket", s3={"sse": "aws:kms", "kms_key_id": KMS_ARN}
    )
    sids = statements_by_sid(json.loads(env.cli("bucket-policy", check=True).stdout))
    assert sids["DenyPutWithOtherServerSideEncryption"]["Condition"] == {
        "StringNotEqualsIfExists": {"s3:x-amz-server-side-encryption": "aws:kms"}
    }
    assert sids["DenyPutWithOtherKmsKey"]["Condition"] == {
        "StringNotEqualsIfExists": {"s3:x-amz-server-side-encryption-aws-kms-key-id": KMS_ARN}
    }
    alias = write_config(
        tmp_path / "a", vcsim, moto, "kms-bucket", s3={"sse": "aws:kms", "kms_key_id": "alias/x"}
    )
    proc = alias.cli("bucket-policy", check=True)
    assert "DenyPutWithOtherKmsKey" not in proc.stdout
    assert "not a key ARN" in proc.stderr


# ----------------------------------------------------------- docs/permissions.md


def test_documented_iam_policy_is_the_one_the_connector_prints() -> None:
    text = (REPO / "docs" / "permissions.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    documented = json.loads(blocks[0])
    assert documented == iam_policy("my-replica-staging", "connector", "eu-central-1", KMS_ARN)
    landing = json.loads(blocks[1])
    full = iam_policy("my-replica-staging", "connector", "eu-central-1", landing=True)
    assert landing == full["Statement"][2:]


def test_documented_vcenter_privileges_are_the_ones_checked() -> None:
    text = (REPO / "docs" / "permissions.md").read_text()
    documented = set(re.findall(r"^\| `([A-Za-z]+(?:\.[A-Za-z]+)+)` \|", text, re.M))
    assert documented == set(VCENTER_PRIVILEGES) | set(VCENTER_NBD_PRIVILEGES)


# ---------------------------------------------------------- vCenter privileges


def test_check_names_each_missing_vcenter_privilege(
    tmp_path: Path, vcsim: Simulator, moto: MotoServer, s3_bucket: str
) -> None:
    vm_name = "perm-check-vm"
    vcsim.add_vm(vm_name, [1024 * 1024])
    env = write_config(tmp_path / "c", vcsim, moto, s3_bucket)
    withheld = {"VirtualMachine.State.RemoveSnapshot", "Datastore.Browse"}
    try:
        vcsim.grant_only(sorted(set(VCENTER_PRIVILEGES) - withheld))
        status, results = check(env, "vcenter.connect", "vcenter.privileges")
        assert status == 1
        assert results["vcenter.connect"]["status"] == "ok"
        privileges = results["vcenter.privileges"]
        assert privileges["status"] == "failed"
        assert set(privileges["missing"]) == withheld
        details = "\n".join(privileges["details"])
        assert "VirtualMachine.State.RemoveSnapshot" in details
        # The simulator is shared by the session: other tests' VMs may fill the first
        # names of the list, which then ends with how many more it left out.
        remove = next(d for d in privileges["details"] if "RemoveSnapshot" in d)
        assert f"VM {vm_name}" in remove or re.search(r"and \d+ more$", remove)
        assert "Datastore.Browse" in details and "datastore LocalDS_0" in details
        human = env.cli("check", "--only", "vcenter.privileges")
        assert human.returncode == 1 and "FAILED" in human.stdout
        assert "2 of 8 privileges missing" in human.stdout
    finally:
        vcsim.grant_all()
    status, results = check(env, "vcenter.privileges")
    assert status == 0 and results["vcenter.privileges"]["summary"] == "all 8 privileges granted"


# ------------------------------------------------------------ IAM (moto enforces)


@dataclasses.dataclass(frozen=True)
class IamMoto:
    server: MotoServer
    bucket: str
    keys: dict[str, tuple[str, str]]  # user -> (access key id, secret)


@pytest.fixture(scope="module")
def iam_moto(test_ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IamMoto]:
    handle = start_moto(test_ca, tmp_path_factory.mktemp("moto-iam"), name="moto-iam")
    try:
        server = handle.server
        bucket = "perm-bucket"
        server.boto3_client().create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": server.region}
        )
        iam = server.boto3_client("iam")
        # Two moto quirks: it authorizes HeadBucket as "s3:HeadBucket" (AWS: s3:ListBucket),
        # and its signature check fails on a "/" in a query value, so the store here has
        # no prefix (list requests would carry prefix=replicas%2F).
        documented = iam_policy(bucket, "", server.region)
        documented["Statement"][0]["Action"].append("s3:HeadBucket")
        limited = json.loads(json.dumps(documented))
        objects = limited["Statement"][1]["Action"]
        objects.remove("s3:DeleteObject")
        objects.remove("s3:AbortMultipartUpload")
        keys = {}
        for user, policy in (("documented", documented), ("limited", limited)):
            iam.create_user(UserName=user)
            iam.put_user_policy(
                UserName=user, PolicyName="connector", PolicyDocument=json.dumps(policy)
            )
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        server.require_authentication(0)
        yield IamMoto(server, bucket, keys)
    finally:
        handle.stop()


def _env_for(iam: IamMoto, user: str, tmp_path: Path, vcsim: Simulator) -> ConnectorEnv:
    key_id, secret = iam.keys[user]
    as_user = dataclasses.replace(iam.server, access_key=key_id, secret_key=secret)
    return write_config(tmp_path / user, vcsim, as_user, iam.bucket, prefix="")


def test_documented_iam_policy_is_enough(
    iam_moto: IamMoto, tmp_path: Path, vcsim: Simulator
) -> None:
    status, results = check(_env_for(iam_moto, "documented", tmp_path, vcsim), "s3.permissions")
    result = results["s3.permissions"]
    assert status == 0 and result["status"] == "ok", result
    assert result["missing"] == []
    assert any(d.startswith("PutObject: ok") for d in result["details"])
    # the probes leave nothing behind
    key_id, secret = iam_moto.keys["documented"]
    raw = iam_moto.server.boto3_client(aws_access_key_id=key_id, aws_secret_access_key=secret)
    assert raw.list_objects_v2(Bucket=iam_moto.bucket).get("Contents", []) == []
    assert raw.list_multipart_uploads(Bucket=iam_moto.bucket).get("Uploads", []) == []


def test_check_names_each_missing_iam_permission(
    iam_moto: IamMoto, tmp_path: Path, vcsim: Simulator
) -> None:
    status, results = check(_env_for(iam_moto, "limited", tmp_path, vcsim), "s3.permissions")
    result = results["s3.permissions"]
    assert status == 1 and result["status"] == "failed"
    assert result["missing"] == ["s3:DeleteObject", "s3:AbortMultipartUpload"]
    assert "s3:DeleteObject" in result["summary"] and "s3:AbortMultipartUpload" in result["summary"]
    assert iam_moto.keys["limited"][1] not in json.dumps(results)
