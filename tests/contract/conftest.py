"""Fixtures shared by the contract suites."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from connector.adapters.vsphere import VSphereClient
from connector.secrets import Secret
from tests.harness.vcsim import Simulator


@pytest.fixture(scope="module")
def vsphere(vcsim: Simulator) -> Iterator[VSphereClient]:
    """The vSphere adapter logged in to the session's simulator."""
    client = VSphereClient(
        url=vcsim.url,
        user=vcsim.user,
        password=Secret(vcsim.password),
        ca_file=vcsim.ca_file,
        timeout=10.0,
    )
    try:
        yield client
    finally:
        client.close()
