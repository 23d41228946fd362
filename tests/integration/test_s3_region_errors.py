"""A bucket that S3 refuses with HTTP 400 for this region: the access check says to fix
the region (a 301 is followed by botocore itself, to the bucket's region)."""

from __future__ import annotations

from typing import Any

import pytest

from connector.errors import PermanentError
from tests.harness.s3faults import FaultyS3Proxy
from tests.integration.test_s3_fault_proxy import store_via

pytestmark = pytest.mark.integration


def test_a_bucket_in_another_region_is_named_by_the_access_check(
    faulty_s3: FaultyS3Proxy, moto: Any, s3_bucket: str
) -> None:
    faulty_s3.inject("HEAD", f"/{s3_bucket}", status=400, code="InvalidRequest", times=None)
    store = store_via(faulty_s3, moto, s3_bucket)
    with pytest.raises(PermanentError) as info:
        store.check_access()
    assert str(info.value) == (
        f"bucket {s3_bucket} is not reachable in this region at {faulty_s3.url} (HTTP 400): "
        "check the region setting and the bucket name"
    )
