"""Error paths of the config, secrets, proxy, TLS and vCenter URL checks, each with the
message the troubleshooting guide documents (docs/troubleshooting.md)."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.adapters.vsphere import VSphereClient
from connector.config import load_config
from connector.errors import ConfigError, TLSTrustError
from connector.network import make_proxy, parse_proxy_url
from connector.secrets import Secret, credential_path, load_secret, read_secret_file
from connector.tls import load_ca_file, pinned_context, server_context
from tests.unit.test_config_load import GOOD, write

API = """
[api]
listen = "127.0.0.1:8443"
cert_file = "api.crt"
key_file = "api.key"
token_file = "api.token"
"""

LOCAL = """
[transport]
kind = "local"

[[local.vms]]
name = "a"
uuid = "11111111-2222-3333-4444-555555555555"
quiescent = true
[[local.vms.disks]]
path = "a.img"

[[local.vms]]
name = "b"
uuid = "11111111-2222-3333-4444-555555555555"
quiescent = true
[[local.vms.disks]]
path = "b.img"
"""

NO_VCENTER = GOOD.split("[s3]")[1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            GOOD.replace("https://vc.example.com/sdk", "https:///sdk"),
            "vcenter.url: Value error, [vcenter] url has no host name",
        ),
        (
            GOOD.replace(
                'region = "eu-central-1"',
                'region = "eu-central-1"\nsecret_access_key_file = "s"\n'
                'secret_access_key_env = "S"',
            ),
            "[s3] takes secret_access_key_file or secret_access_key_env, not both",
        ),
        (
            GOOD.replace(
                'region = "eu-central-1"',
                'region = "eu-central-1"\nmultipart_threshold = 6291456\n'
                "multipart_part_size = 8388608",
            ),
            "[s3] multipart_threshold must not be below multipart_part_size",
        ),
        (
            GOOD + '\n[store]\nkey_file = "k"\nkey_env = "K"\n',
            "[store] takes key_file or key_env, not both",
        ),
        (
            GOOD + '\n[store]\nkey_env = "K"\nkms_key_id = "alias/x"\n',
            "[store] takes key_env or kms_key_id, not both",
        ),
        (
            GOOD + API.replace("127.0.0.1:8443", "localhost"),
            "[api] listen must be host:port, e.g. 127.0.0.1:8443",
        ),
        (
            GOOD + API + 'token_env = "T"\n',
            "[api] needs exactly one of token_file and token_env",
        ),
        ("[s3]" + NO_VCENTER + LOCAL, "[local] has two VMs with the same uuid"),
        (
            GOOD + '\n[daemon]\nbandwidth_windows = [{ start = "08:00", end = "08:00", '
            "limit = 1048576 }]\n",
            "a bandwidth window needs different start and end times",
        ),
        (
            GOOD.replace('ca_file = "ca.pem"', 'ca_file = "credential:vcenter-ca"'),
            "[vcenter] ca_file cannot be a systemd credential; give a file path",
        ),
    ],
)
def test_config_errors_name_the_key_and_what_to_do(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)


def test_a_config_path_that_is_not_a_regular_file_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Path("/dev/null"))
    assert str(info.value) == "config file /dev/null is not a regular file; pass a TOML file"


# A regular file whose read fails even for root: the process's own memory at offset 0.
UNREADABLE = Path("/proc/self/mem")


def test_a_config_that_cannot_be_read_says_why() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(UNREADABLE)
    assert str(info.value) == f"config file {UNREADABLE} cannot be read: Input/output error"


def test_the_api_section_is_required_where_it_is_used(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match=r"the \[api\] section is missing; see docs/security.md"):
        cfg.api_token()


def test_secret_sources_fail_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        credential_path("../escape", "vCenter password")
    assert str(info.value) == (
        "the vCenter password credential name '../escape' is not a plain file name"
    )
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match=f"the S3 secret key file {empty} is empty"):
        read_secret_file(empty, "S3 secret key")
    with pytest.raises(ConfigError, match=f"cannot read the S3 secret key file {UNREADABLE}: "):
        read_secret_file(UNREADABLE, "S3 secret key")
    with pytest.raises(ConfigError, match="no source is configured for the API token"):
        load_secret(None, None, "API token")


def test_proxy_settings_fail_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[network\] https_proxy is not a valid URL"):
        parse_proxy_url("http://[::1", "[network] https_proxy")
    with pytest.raises(ConfigError, match="proxy_ca_file is set but https_proxy is not"):
        make_proxy(None, ca_file=tmp_path / "ca.pem")
    missing = tmp_path / "ca.pem"
    with pytest.raises(ConfigError, match=f"proxy_ca_file {missing} does not exist or is not"):
        make_proxy("http://proxy.example.com:3128", ca_file=missing)


def test_tls_files_fail_with_what_to_do(tmp_path: Path) -> None:
    junk = tmp_path / "ca.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(ConfigError, match=f"CA file {junk} holds no usable PEM certificate: "):
        load_ca_file(ctx, junk)
    with pytest.raises(ConfigError, match=r"the API certificate file .* does not exist or is not"):
        server_context(tmp_path / "api.crt", tmp_path / "api.key")
    key = tmp_path / "api.key"
    key.write_text("not a key")
    with pytest.raises(ConfigError, match=f"cannot load the API certificate {junk} with its key"):
        server_context(junk, key)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 with a certificate of the test CA; its port."""
    from tests.harness.ca import make_ca

    (tmp_path / "ca").mkdir()
    issued = make_ca(tmp_path / "ca").issue("server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(issued.cert_file, issued.key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_a_pinned_thumbprint_that_does_not_match_is_refused(tls_server: int) -> None:
    with pytest.raises(TLSTrustError) as info:
        pinned_context("127.0.0.1", tls_server, "ab" * 32)
    assert f"the certificate of 127.0.0.1:{tls_server} does not match the pinned thumbprint" in (
        str(info.value)
    )
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(TLSTrustError, match=f"could not read the certificate of 127.0.0.1:{port}"):
        pinned_context("127.0.0.1", port, "ab" * 32)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://vc.example.com/sdk", "the vCenter URL must use https, not 'http'"),
        ("https://u:p@vc.example.com/sdk", "the vCenter URL must not carry credentials"),
        ("https:///sdk", "the vCenter URL has no host name: https:///sdk"),
        ("https://vc.example.com:99999/sdk", "the vCenter URL has an invalid port"),
    ],
)
def test_a_bad_vcenter_url_is_refused_before_any_connection(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        VSphereClient(url, "user", Secret("password"))
    assert message in str(info.value)
