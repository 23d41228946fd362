"""A vCenter URL that points at another HTTPS service is named as such."""

from __future__ import annotations

from typing import Any

import pytest

from connector.adapters.vsphere import VSphereClient
from connector.errors import PermanentError
from connector.secrets import Secret

pytestmark = pytest.mark.integration


def test_a_url_that_is_not_a_vcenter_soap_endpoint_is_named(moto: Any) -> None:
    url = f"{moto.endpoint_url}/sdk"  # an HTTPS server, trusted, but S3 rather than vCenter
    client = VSphereClient(url, "user", Secret("password"), ca_file=moto.ca_file, timeout=30)
    try:
        with pytest.raises(PermanentError) as info:
            client.list_vms()
    finally:
        client.close()
    message = str(info.value)
    assert message.startswith(f"{url} does not look like a vCenter or ESXi SOAP endpoint (HTTP ")
    assert message.endswith("for vimServiceVersions.xml, or no common API version)")
