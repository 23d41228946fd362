"""The TLS 1.2 floor the connector pins on botocore fails closed when botocore's HTTP
layer is not laid out as it was written for.

A supported botocore is always laid out as expected, so these tests take a real
botocore client (built offline, it sends nothing) and change the one object of its
HTTP layer that a different botocore release would have differently: the pool
manager, the SSLContext factory, or the pool manager's context. Each must refuse
with the guide's message rather than run without the floor.
"""

from __future__ import annotations

import ssl
from typing import Any

import boto3
import pytest

from connector.adapters.s3 import enforce_tls_minimum, tls_minimum_of
from connector.errors import ConfigError


def client() -> Any:
    return boto3.session.Session().client(
        "s3",
        region_name="eu-central-1",
        endpoint_url="https://127.0.0.1:9",
        aws_access_key_id="AKIAEXAMPLEEXAMPLE00",
        aws_secret_access_key="not-a-real-secret-0123456789abcdefghij",
    )


def test_a_real_client_gets_the_floor_on_its_pool_and_on_later_contexts() -> None:
    c = client()
    enforce_tls_minimum(c)
    assert tls_minimum_of(c) == ssl.TLSVersion.TLSv1_2
    later = c._endpoint.http_session._get_ssl_context()
    assert later.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_session_without_the_pool_manager_it_expects_is_refused() -> None:
    c = client()
    c._endpoint.http_session._manager = None  # a release that pools differently
    with pytest.raises(ConfigError) as info:
        enforce_tls_minimum(c)
    assert str(info.value) == (
        "cannot enforce TLS 1.2 as a minimum on this botocore version "
        "(unexpected URLLib3Session layout); install a supported botocore"
    )


def test_a_context_factory_that_builds_no_sslcontext_is_refused_when_called() -> None:
    c = client()
    session = c._endpoint.http_session
    session._get_ssl_context = lambda: None  # a release whose factory returns something else
    enforce_tls_minimum(c)  # the pool's existing context is pinned ...
    assert tls_minimum_of(c) == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ConfigError) as info:  # ... and a later one (a proxy's) is refused
        session._get_ssl_context()
    assert str(info.value) == "botocore built no SSLContext; cannot enforce TLS 1.2"


def test_a_pool_manager_without_an_sslcontext_is_refused() -> None:
    c = client()
    del c._endpoint.http_session._manager.connection_pool_kw["ssl_context"]
    with pytest.raises(ConfigError) as info:
        enforce_tls_minimum(c)
    assert str(info.value) == (
        "cannot enforce TLS 1.2 as a minimum: botocore's pool manager has no SSLContext"
    )
