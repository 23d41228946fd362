"""Every client connection: TLS 1.2 as a floor set by the connector, verified
certificates, and corporate proxies, against real servers.

Clients: boto3 (S3, KMS, EC2, EBS, STS through make_aws_client), the vSphere
client (pyVmomi) and the datastore HTTPS reader. Servers: the simulator and
moto_server, directly and behind local proxies that pin the TLS version
(TLSVersionProxy), a TLS-1.1-only server, a server whose certificate names
another host, and CONNECT proxies (plain and TLS-inspecting).
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import SSLError as BotoSSLError

from connector.adapters.datastore_reader import DatastoreHttpsReader, DatastoreHttpsSource
from connector.adapters.s3 import S3ObjectStore, make_aws_client, tls_minimum_of
from connector.adapters.vsphere import VSphereClient
from connector.errors import ConfigError, TLSTrustError
from connector.network import make_proxy
from connector.retry import RetryPolicy
from connector.secrets import Secret
from tests.harness.ca import TestCA as CA
from tests.harness.ca import make_ca
from tests.harness.moto import MotoServer
from tests.harness.tls_servers import ConnectProxy, TLSServer, TLSVersionProxy, negotiated_version
from tests.harness.vcsim import Simulator

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
AWS_SERVICES = ("s3", "kms", "ec2", "ebs", "sts")
TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
VERSIONS = {"TLSv1.2": (TLS12, TLS12), "TLSv1.3": (TLS13, TLS13)}


def vsphere(sim: Simulator, url: str | None = None, **kwargs: Any) -> VSphereClient:
    args: dict[str, Any] = {
        "url": url or sim.url,
        "user": sim.user,
        "password": Secret(sim.password),
        "ca_file": sim.ca_file,
        "timeout": 10.0,
    }
    args.update(kwargs)
    return VSphereClient(**args)


def s3_store(
    moto: MotoServer, bucket: str, endpoint: str | None = None, **kw: Any
) -> S3ObjectStore:
    args: dict[str, Any] = {
        "region": moto.region,
        "prefix": "tls",
        "endpoint_url": endpoint or moto.endpoint_url,
        "ca_file": moto.ca_file,
        "sse": "AES256",
        "access_key_id": Secret(moto.access_key),
        "secret_access_key": Secret(moto.secret_key),
        "connect_timeout": 5.0,
        "read_timeout": 10.0,
    }
    args.update(kw)
    return S3ObjectStore(bucket, **args)


def read_through(client: VSphereClient, sim: Simulator, **source_kw: Any) -> bytes:
    """Replicate-path reads: snapshot a VM, read its disk through the datastore reader."""
    uuid_ = sim.add_vm(f"tls-{uuid.uuid4().hex[:8]}", [1 * MiB])
    (key,) = sim.disk_keys(uuid_)
    sim.write(uuid_, key, 4096, b"transport-check" * 10)
    vm = client.get_vm(uuid_)
    snap = client.create_snapshot(uuid_, "connector-tls", "tls test")
    try:
        reader = DatastoreHttpsSource(client, retry=RetryPolicy(), **source_kw).open(
            vm, snap, vm.disks[0]
        )
        try:
            return reader.read(4096, 150)
        finally:
            reader.close()
    finally:
        client.remove_snapshot(uuid_, snap.ref)


@pytest.fixture(scope="module", params=list(VERSIONS))
def vcenter_proxy(request: Any, vcsim: Simulator, test_ca: CA) -> Iterator[TLSVersionProxy]:
    low, high = VERSIONS[request.param]
    proxy = TLSVersionProxy(
        test_ca.issue(f"vc-{request.param}"), vcsim.port, vcsim.ca_file, low, high
    )
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="module", params=list(VERSIONS))
def moto_proxy(request: Any, moto: MotoServer, test_ca: CA) -> Iterator[TLSVersionProxy]:
    low, high = VERSIONS[request.param]
    proxy = TLSVersionProxy(
        test_ca.issue(f"s3-{request.param}"), moto.port, moto.ca_file, low, high
    )
    try:
        yield proxy
    finally:
        proxy.stop()


def _pinned_to(proxy: TLSVersionProxy, ca_file: Path) -> str:
    """The one version the proxy speaks, proven with a permissive client."""
    version = negotiated_version(proxy.port, ca_file)
    assert version in VERSIONS
    return version


# ------------------------------------------------------------- TLS 1.1 is refused


def test_the_old_server_speaks_tls_1_1_only(tls11_server: TLSServer, test_ca: CA) -> None:
    assert negotiated_version(tls11_server.port, test_ca.cert_file) == "TLSv1.1"


@pytest.mark.parametrize("service", AWS_SERVICES)
def test_every_aws_client_refuses_tls_1_1(
    service: str, tls11_server: TLSServer, test_ca: CA
) -> None:
    client = make_aws_client(
        service,
        region="eu-central-1",
        endpoint_url=tls11_server.url,
        ca_file=test_ca.cert_file,
        access_key_id=Secret("AKIAEXAMPLEEXAMPLE00"),
        secret_access_key=Secret("not-a-real-secret-0123456789"),
        connect_timeout=5,
        read_timeout=5,
    )
    assert tls_minimum_of(client) == TLS12
    before = len(tls11_server.handshakes)
    operation: Callable[[], Any] = {
        "s3": lambda: client.list_buckets(),
        "kms": lambda: client.list_keys(),
        "ec2": lambda: client.describe_regions(),
        "ebs": lambda: client.list_snapshot_blocks(SnapshotId="snap-0123456789abcdef0"),
        "sts": lambda: client.get_caller_identity(),
    }[service]
    with pytest.raises(BotoSSLError) as info:
        operation()
    assert "UNSUPPORTED_PROTOCOL" in str(info.value) or "version" in str(info.value).lower()
    assert tls11_server.handshakes[before:] == []  # no handshake completed


def test_vsphere_client_refuses_tls_1_1(vcsim: Simulator, tls11_server: TLSServer) -> None:
    before = len(tls11_server.handshakes)
    client = vsphere(vcsim, f"{tls11_server.url}/sdk")  # the server's CA is trusted
    with pytest.raises(TLSTrustError) as info:
        client.list_vms()
    assert "older than 1.2" in str(info.value)
    assert "127.0.0.1" in str(info.value)
    assert tls11_server.handshakes[before:] == []  # no handshake completed


def test_datastore_reader_refuses_tls_1_1(vcsim: Simulator, tls11_server: TLSServer) -> None:
    with vsphere(vcsim) as client:
        client.list_vms()  # logged in to the real simulator
        url = f"{tls11_server.url}/folder/vm/disk-flat.vmdk?dcPath=DC0&dsName=LocalDS_0"
        reader = DatastoreHttpsReader(client, url, 1 * MiB, retry=RetryPolicy())
        with pytest.raises(TLSTrustError, match=r"older than 1\.2"):
            reader.read(0, 512)
        reader.close()


# ---------------------------------------------------- TLS 1.2-only and 1.3-only work


def test_vsphere_client_and_datastore_reader_work_on_tls_1_2_and_1_3(
    vcsim: Simulator, vcenter_proxy: TLSVersionProxy, test_ca: CA
) -> None:
    version = _pinned_to(vcenter_proxy, test_ca.cert_file)
    before = len(vcenter_proxy.handshakes)
    with vsphere(vcsim, f"{vcenter_proxy.url}/sdk") as client:
        data = read_through(client, vcsim)
    assert data == b"transport-check" * 10
    seen = set(vcenter_proxy.handshakes[before:])
    assert seen == {version}, seen  # SOAP and datastore reads both went through the proxy


def test_s3_store_works_on_tls_1_2_and_1_3(
    moto: MotoServer, s3_bucket: str, moto_proxy: TLSVersionProxy, test_ca: CA
) -> None:
    version = _pinned_to(moto_proxy, test_ca.cert_file)
    before = len(moto_proxy.handshakes)
    store = s3_store(moto, s3_bucket, moto_proxy.url)
    store.put("k", b"over " + version.encode())
    assert store.get("k") == b"over " + version.encode()
    assert set(moto_proxy.handshakes[before:]) == {version}


@pytest.mark.parametrize("service", ["kms", "sts", "ec2"])
def test_other_aws_clients_work_on_tls_1_2_and_1_3(
    service: str, moto: MotoServer, moto_proxy: TLSVersionProxy, test_ca: CA
) -> None:
    version = _pinned_to(moto_proxy, test_ca.cert_file)
    before = len(moto_proxy.handshakes)
    client = make_aws_client(
        service,
        region=moto.region,
        endpoint_url=moto_proxy.url,
        ca_file=moto.ca_file,
        access_key_id=Secret(moto.access_key),
        secret_access_key=Secret(moto.secret_key),
    )
    if service == "kms":
        assert "Keys" in client.list_keys()
    elif service == "sts":
        assert client.get_caller_identity()["Account"]
    else:
        assert client.describe_regions()["Regions"]
    assert set(moto_proxy.handshakes[before:]) == {version}


# ---------------------------------------------------------------------- trust


def test_vcenter_hostname_mismatch_is_refused_naming_the_host(
    vcsim: Simulator, test_ca: CA
) -> None:
    # A proxy in front of the simulator with a valid certificate for another name.
    proxy = TLSVersionProxy(
        test_ca.issue("vc-elsewhere", hosts=("elsewhere.example",)),
        vcsim.port,
        vcsim.ca_file,
        TLS12,
        TLS13,
    )
    try:
        with pytest.raises(TLSTrustError) as info:
            vsphere(vcsim, f"{proxy.url}/sdk").list_vms()
        message = str(info.value)
        assert "127.0.0.1" in message and "not valid for that host name" in message
    finally:
        proxy.stop()


def test_datastore_reader_refuses_a_certificate_for_another_host(
    vcsim: Simulator, wrong_name_server: TLSServer
) -> None:
    with vsphere(vcsim) as client:
        client.list_vms()
        reader = DatastoreHttpsReader(
            client, f"{wrong_name_server.url}/folder/x-flat.vmdk", MiB, retry=RetryPolicy()
        )
        with pytest.raises(TLSTrustError) as info:
            reader.read(0, 512)
        assert "127.0.0.1" in str(info.value) and "host name" in str(info.value)
        reader.close()


def test_datastore_reader_refuses_an_untrusted_certificate(
    vcsim: Simulator, tmp_path: Path
) -> None:
    other = make_ca(tmp_path / "other")
    stranger = TLSServer(other.issue("stranger"), TLS12, TLS13)
    try:
        with vsphere(vcsim) as client:
            client.list_vms()
            reader = DatastoreHttpsReader(
                client, f"{stranger.url}/folder/x-flat.vmdk", MiB, retry=RetryPolicy()
            )
            with pytest.raises(TLSTrustError) as info:
                reader.read(0, 512)
            assert "127.0.0.1" in str(info.value) and "not trusted" in str(info.value)
            reader.close()
    finally:
        stranger.stop()


# ---------------------------------------------------------------------- proxies


@pytest.fixture
def connect_proxy() -> Iterator[ConnectProxy]:
    proxy = ConnectProxy()
    try:
        yield proxy
    finally:
        proxy.stop()


def test_s3_goes_through_the_configured_proxy(
    moto: MotoServer, s3_bucket: str, connect_proxy: ConnectProxy
) -> None:
    proxy = make_proxy(connect_proxy.proxy_url)
    store = s3_store(moto, s3_bucket, proxy=proxy)
    store.put("via-proxy", b"tunnelled")
    assert store.get("via-proxy") == b"tunnelled"
    assert f"127.0.0.1:{moto.port}" in connect_proxy.tunnels


def test_vcenter_and_datastore_reads_go_through_the_configured_proxy(
    vcsim: Simulator, connect_proxy: ConnectProxy
) -> None:
    proxy = make_proxy(connect_proxy.proxy_url)
    with vsphere(vcsim, proxy=proxy) as client:
        assert client.proxy is not None
        data = read_through(client, vcsim, proxy=proxy)
    assert data == b"transport-check" * 10
    assert connect_proxy.tunnels and set(connect_proxy.tunnels) == {f"127.0.0.1:{vcsim.port}"}
    # SOAP (several connections) and the datastore reader each opened tunnels
    assert len(connect_proxy.tunnels) >= 2


def test_no_proxy_hosts_bypass_the_proxy(
    vcsim: Simulator, moto: MotoServer, s3_bucket: str, connect_proxy: ConnectProxy
) -> None:
    proxy = make_proxy(connect_proxy.proxy_url, ["localhost", "127.0.0.0/8"])
    s3_store(moto, s3_bucket, proxy=proxy).put("direct", b"x")
    with vsphere(vcsim, proxy=proxy) as client:
        assert client.proxy is None
        client.list_vms()
    assert connect_proxy.tunnels == []


def test_inspecting_proxy_is_refused_unless_its_ca_is_configured(
    vcsim: Simulator, moto: MotoServer, s3_bucket: str, tmp_path: Path
) -> None:
    corporate = make_ca(tmp_path / "corporate-ca", name="corporate-inspection-ca")
    inspecting = ConnectProxy(intercept_ca=corporate, upstream_ca=moto.ca_file)
    try:
        # Without the proxy's CA: the re-issued certificates are not trusted.
        untrusting = make_proxy(inspecting.proxy_url)
        with pytest.raises(TLSTrustError, match="not trusted"):
            s3_store(moto, s3_bucket, proxy=untrusting).put("k", b"x")
        with pytest.raises(TLSTrustError, match="not trusted"):
            vsphere(vcsim, proxy=untrusting).list_vms()
        assert inspecting.intercepted == []
        # With proxy_ca_file: trusted for connections through the proxy.
        trusting = make_proxy(inspecting.proxy_url, ca_file=corporate.cert_file)
        store = s3_store(moto, s3_bucket, proxy=trusting)
        store.put("inspected", b"seen by the proxy")
        assert store.get("inspected") == b"seen by the proxy"
        with vsphere(vcsim, proxy=trusting) as client:
            assert client.list_vms()
        assert f"127.0.0.1:{moto.port}" in inspecting.intercepted
        assert f"127.0.0.1:{vcsim.port}" in inspecting.intercepted
    finally:
        inspecting.stop()


def test_pinned_thumbprint_through_a_proxy_is_refused_clearly(vcsim: Simulator) -> None:
    proxy = make_proxy("http://127.0.0.1:3128")
    with pytest.raises(ConfigError) as info:
        vsphere(vcsim, ca_file=None, thumbprint=vcsim.thumbprint, proxy=proxy)
    assert "no_proxy" in str(info.value) and "ca_file" in str(info.value)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:Pr0xyS3cret@proxy.example:3128", "must not carry a user name or password"),
        ("https://proxy.example:3128", "TLS to the proxy itself is not supported"),
        ("socks5://proxy.example:1080", "http://proxy.example.com:3128"),
        ("http://proxy.example:3128/path", "no path"),
    ],
)
def test_bad_proxy_urls_are_refused(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_proxy(url)
    assert expected in str(info.value)
    assert "Pr0xyS3cret" not in str(info.value)


@pytest.mark.parametrize("service", AWS_SERVICES)
def test_fips_endpoints_for_every_aws_client(service: str) -> None:
    client = make_aws_client(service, region="us-east-1", use_fips_endpoint=True)
    assert client.meta.endpoint_url == f"https://{service}-fips.us-east-1.amazonaws.com"
    assert tls_minimum_of(client) == TLS12


def test_clients_ignore_proxy_variables_the_config_did_not_pass(
    vcsim: Simulator,
    moto: MotoServer,
    s3_bucket: str,
    connect_proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The config (connector.config.Config.proxy) reads the environment once; the
    # clients themselves only use the proxy they are given.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, connect_proxy.proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    s3_store(moto, s3_bucket).put("direct", b"x")
    with vsphere(vcsim) as client:
        client.list_vms()
    assert connect_proxy.tunnels == []


def test_configured_proxy_carries_a_whole_replication(
    vcsim: Simulator, moto: MotoServer, s3_bucket: str, connect_proxy: ConnectProxy, tmp_path: Path
) -> None:
    from tests.harness.connector_env import write_config

    env = write_config(
        tmp_path / "c",
        vcsim,
        moto,
        s3_bucket,
        extra=f'[network]\nhttps_proxy = "{connect_proxy.proxy_url}"\n',
    )
    uuid_ = vcsim.add_vm(f"proxied-{uuid.uuid4().hex[:6]}", [2 * MiB])
    (key,) = vcsim.disk_keys(uuid_)
    vcsim.write(uuid_, key, 0, b"through the proxy" * 100)
    env.cli("replicate", uuid_, check=True)
    assert {f"127.0.0.1:{vcsim.port}", f"127.0.0.1:{moto.port}"} <= set(connect_proxy.tunnels)
