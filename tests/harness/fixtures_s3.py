"""pytest fixtures: the test CA, one moto_server for the session, a fresh bucket per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.harness.ca import TestCA, make_ca
from tests.harness.moto import MotoServer, start_moto
from tests.harness.s3faults import FaultyS3Proxy

try:  # another engineer owns `test_ca` when the simulator fixtures define it
    from tests.harness.fixtures_vcsim import test_ca  # type: ignore[attr-defined,unused-ignore]
except ImportError:

    @pytest.fixture(scope="session")
    def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
        """A throwaway CA; every test server presents a certificate it issued."""
        return make_ca(tmp_path_factory.mktemp("test-ca"))


@pytest.fixture(scope="session")
def moto(test_ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto_server (S3, KMS, EC2, EBS) over HTTPS for the whole session."""
    workdir: Path = tmp_path_factory.mktemp("moto")
    handle = start_moto(test_ca, workdir)
    try:
        yield handle.server
    finally:
        handle.stop()


@pytest.fixture
def faulty_s3(moto: MotoServer, test_ca: TestCA) -> Iterator[FaultyS3Proxy]:
    """A fault-injecting HTTPS reverse proxy in front of the session's moto_server."""
    proxy = FaultyS3Proxy(test_ca.issue("faulty-s3"), moto.port, moto.ca_file)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def s3_bucket(moto: MotoServer) -> Iterator[str]:
    """A new, empty bucket in the session's moto_server; emptied and removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    client = moto.boto3_client()
    client.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": moto.region})
    try:
        yield name
    finally:
        _remove_bucket(client, name)


def _remove_bucket(s3: Any, name: str) -> None:
    try:
        uploads = s3.list_multipart_uploads(Bucket=name).get("Uploads", [])
        for upload in uploads:
            s3.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        paginator = s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            for obj in page.get("Contents", []):
                s3.delete_object(Bucket=name, Key=obj["Key"])
        s3.delete_bucket(Bucket=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise
