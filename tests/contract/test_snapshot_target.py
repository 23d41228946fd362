"""The SnapshotTarget contract over the in-memory fake and over the boto3 adapter
against the extended moto_server over TLS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from connector.adapters.ebs import EbsTarget
from connector.fakelanding import FakeSnapshotTarget
from connector.ports import SnapshotTarget
from connector.secrets import Secret
from tests.contract.snapshot_target_contract import SnapshotTargetContract
from tests.harness.fixtures_landing import LandingMoto


class TestFakeTarget(SnapshotTargetContract):
    @pytest.fixture
    def target(self) -> SnapshotTarget:
        fake: SnapshotTarget = FakeSnapshotTarget()
        return fake


@pytest.mark.integration
class TestEbsTarget(SnapshotTargetContract):
    @pytest.fixture
    def target(self, landing_moto: LandingMoto) -> Iterator[SnapshotTarget]:
        server = landing_moto.server
        adapter = EbsTarget(
            region=server.region,
            endpoint_url=server.endpoint_url,
            ca_file=server.ca_file,
            access_key_id=Secret(server.access_key),
            secret_access_key=Secret(server.secret_key),
        )
        try:
            yield adapter
        finally:
            adapter.close()
