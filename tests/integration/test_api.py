"""The connector's HTTPS API: TLS 1.2+ with strong ciphers only (testssl.sh), a
required bearer token, read-only endpoints, and `connector api` as a process."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.audit import read_records
from connector.daemon.api import ApiServer
from connector.domain.model import DiskInfo, VmInfo
from connector.errors import ConfigError
from connector.tls import client_context, server_context
from tests.harness.ca import TestCA as CA
from tests.harness.moto import free_port
from tests.harness.testssl import run_testssl, weak_findings
from tests.harness.tls_servers import TLSServer

pytestmark = pytest.mark.integration

TOKEN = "api-token-" + "0123456789abcdef" * 2


UNREACHABLE_CONFIG = """
[vcenter]
url = "https://127.0.0.1:9/sdk"
user = "svc"
password_file = "pw"

[s3]
bucket = "staging-bucket"
region = "us-east-1"
endpoint_url = "https://127.0.0.1:9"

[state]
path = "state/state.db"

[api]
listen = "127.0.0.1:{port}"
cert_file = "{cert}"
key_file = "{key}"
token_file = "token"
ready_timeout_seconds = 1
ready_cache_seconds = 0.2
"""


@pytest.fixture(scope="module")
def api(test_ca: CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The API of an app whose vCenter and S3 do not answer, with one VM in its catalog."""
    from connector.app import App
    from connector.config import load_config

    workdir = tmp_path_factory.mktemp("api")
    cert = test_ca.issue("api-server")
    (workdir / "token").write_text(TOKEN + "\n")
    (workdir / "pw").write_text("unused-password")
    cfg = workdir / "connector.toml"
    cfg.write_text(
        UNREACHABLE_CONFIG.format(cert=cert.cert_file, key=cert.key_file, port=free_port())
    )
    app = App(load_config(cfg))
    app.state.upsert_server(
        VmInfo(
            uuid="42000000-0000-0000-0000-000000000001",
            name="web-01",
            ref="vm-1",
            datacenter="DC0",
            power_state="poweredOn",
            cbt_enabled=True,
            disks=(
                DiskInfo(
                    key=2000,
                    label="Hard disk 1",
                    capacity=1 << 20,
                    file_name="[ds] a.vmdk",
                    backing="flat",
                ),
            ),
        )
    )
    server = app.api_server().start()
    try:
        yield server
    finally:
        server.stop()
        app.close()


def request(
    server: ApiServer,
    path: str,
    token: str | None = TOKEN,
    method: str = "GET",
    ctx: ssl.SSLContext | None = None,
    ca_file: Path | None = None,
) -> tuple[int, dict[str, str], bytes]:
    context = ctx or client_context(ca_file)
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- TLS


def test_testssl_finds_no_old_protocol_and_no_weak_cipher(api: ApiServer, tmp_path: Path) -> None:
    findings = run_testssl(api.port, tmp_path)
    assert weak_findings(findings) == []
    by_id = {f["id"]: f["finding"] for f in findings}
    assert by_id["TLS1_2"].startswith("offered") and by_id["TLS1_3"].startswith("offered")
    assert by_id["cipherlist_STRONG"].startswith("offered")


def test_testssl_judgement_flags_a_weak_server(tls11_server: TLSServer, tmp_path: Path) -> None:
    # Control: the same judgement on a TLS-1.1-only server with CBC ciphers fails.
    problems = weak_findings(run_testssl(tls11_server.port, tmp_path))
    assert any(p.startswith("TLS1_1: offered") for p in problems), problems
    assert any(p.startswith("cipherlist_AVERAGE: offered") for p in problems), problems


def test_old_protocols_and_cbc_ciphers_are_refused(api: ApiServer, test_ca: CA) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.load_verify_locations(cafile=str(test_ca.cert_file))
    with pytest.raises(ssl.SSLError):
        request(api, "/healthz", ctx=old)
    cbc = client_context(test_ca.cert_file)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES128-SHA")
    with pytest.raises(ssl.SSLError):
        request(api, "/healthz", ctx=cbc)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client_context(test_ca.cert_file)
        ctx.minimum_version = ctx.maximum_version = version
        assert request(api, "/healthz", ctx=ctx)[0] == 200


# ------------------------------------------------------------------------ tokens


@pytest.mark.parametrize(
    "path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/runs", "/v1/servers", "/x"]
)
@pytest.mark.parametrize(
    "token", [None, "", "wrong-token-0123456789abcdef", TOKEN[:-1], TOKEN + "x", "Basic " + TOKEN]
)
def test_every_endpoint_needs_the_token(
    api: ApiServer, test_ca: CA, path: str, token: str | None
) -> None:
    status, headers, body = request(api, path, token=token, ca_file=test_ca.cert_file)
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    assert "Authorization: Bearer" in json.loads(body)["error"]
    assert b"web-01" not in body


def test_health_with_the_token_says_ok_and_the_version(api: ApiServer, test_ca: CA) -> None:
    from connector import __version__

    status, headers, body = request(api, "/healthz", ca_file=test_ca.cert_file)
    assert status == 200 and json.loads(body) == {"status": "ok", "version": __version__}
    assert headers["server"].strip() == "connector"
    assert headers["cache-control"] == "no-store"
    assert headers["strict-transport-security"].startswith("max-age=")


def test_read_only_endpoints_with_the_token(api: ApiServer, test_ca: CA) -> None:
    status, _, body = request(api, "/v1/servers", ca_file=test_ca.cert_file)
    assert status == 200
    servers = json.loads(body)
    assert [s["name"] for s in servers] == ["web-01"]
    server_id = servers[0]["id"]
    status, _, body = request(api, f"/v1/servers/{server_id}", ca_file=test_ca.cert_file)
    assert status == 200 and json.loads(body)["disks"][0]["key"] == 2000
    status, _, body = request(api, f"/v1/runs?server={server_id}", ca_file=test_ca.cert_file)
    assert status == 200 and json.loads(body) == []
    status, headers, body = request(api, "/metrics", ca_file=test_ca.cert_file)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert "connector_servers 1.0" in text
    assert 'connector_api_requests_total{path="/v1/servers",status="200"}' in text
    assert "connector_retries_total" in text and "connector_bandwidth_wait_seconds_total" in text
    assert "connector_queue_depth 0.0" in text


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("POST", "/v1/servers", 405, "does not take that method"),
        ("GET", "/nope", 404, "/openapi.json"),
        ("GET", "/v1/servers/s-none", 404, "no server"),
        ("GET", "/v1/runs/r-none", 404, "no run"),
        ("GET", "/v1/jobs/j-none", 404, "no job"),
        ("GET", "/v1/runs?last=0", 422, "last"),
        ("GET", "/v1/runs?state=SLEEPING", 422, "state: Input should be 'PENDING'"),
        ("POST", "/v1/jobs/j-none/start", 404, "no job"),
    ],
)
def test_bad_requests_get_a_json_error_that_says_what_to_do(
    api: ApiServer, test_ca: CA, method: str, path: str, status: int, message: str
) -> None:
    got, headers, body = request(api, path, method=method, ca_file=test_ca.cert_file)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert message in json.loads(body)["error"]


def test_bad_job_bodies_are_refused_with_the_field_named(api: ApiServer, test_ca: CA) -> None:
    cases = [
        ({"vm": "web-01", "frequency_hours": 25}, 422, "frequency_hours"),
        ({"vm": "web-01", "frequency_hours": 6, "colour": "red"}, 422, "colour"),
        ({"vm": "web-01"}, 400, "give frequency_hours"),
        ({"vm": "web-01", "frequency_hours": 6, "run_once": True}, 400, "not both"),
        ({"vm": "web-01", "frequency_hours": 6, "seed_time": "yesterday"}, 400, "seed"),
    ]
    for doc, status, message in cases:
        got, _, body = post(api, "/v1/jobs", doc, test_ca.cert_file)
        assert got == status, (doc, body)
        assert message in json.loads(body)["error"], body
    got, _, body = post(api, "/v1/jobs", b"{not json", test_ca.cert_file)
    assert got == 422 and "not valid" in json.loads(body)["error"]
    huge = json.dumps({"vm": "web-01", "description": "x" * 100_000}).encode()
    got, _, body = post(api, "/v1/jobs", huge, test_ca.cert_file)
    assert got == 413 and "at most 64 KiB" in json.loads(body)["error"]


def test_readiness_reports_each_unreachable_service(api: ApiServer, test_ca: CA) -> None:
    status, _, body = request(api, "/readyz", ca_file=test_ca.cert_file)
    doc = json.loads(body)
    assert status == 503 and doc["ready"] is False
    checks = {c["name"]: c for c in doc["checks"]}
    assert set(checks) == {"vcenter", "s3", "queue", "daemon"}
    assert not checks["vcenter"]["ok"] and not checks["s3"]["ok"]
    assert checks["queue"]["ok"]
    assert "connector run" in checks["daemon"]["detail"]


def test_the_console_is_served_without_the_token_and_holds_no_data(
    api: ApiServer, test_ca: CA
) -> None:
    status, headers, _ = request(api, "/", token=None, ca_file=test_ca.cert_file)
    assert status == 302 and headers["location"] == "/console/"
    for path in ("/console/", "/console/console.js", "/console/console.css"):
        status, headers, body = request(api, path, token=None, ca_file=test_ca.cert_file)
        assert status == 200, path
        assert b"web-01" not in body and TOKEN.encode() not in body
        assert "default-src 'self'" in headers["content-security-policy"]
    js = request(api, "/console/console.js", token=None, ca_file=test_ca.cert_file)[2].decode()
    assert "sessionStorage" in js and "Authorization" in js
    assert "localStorage" not in js and "innerHTML" not in js


def post(
    server: ApiServer, path: str, doc: Any, ca_file: Path, method: str = "POST"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", server.port, context=client_context(ca_file), timeout=10
    )
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    try:
        conn.request(
            method,
            path,
            body=data,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_short_tokens_are_refused(test_ca: CA, tmp_path: Path) -> None:
    from connector.app import App
    from connector.config import load_config

    cert = test_ca.issue("api-short")
    (tmp_path / "token").write_text("short\n")
    (tmp_path / "pw").write_text("unused-password")
    cfg = tmp_path / "connector.toml"
    cfg.write_text(
        UNREACHABLE_CONFIG.format(cert=cert.cert_file, key=cert.key_file, port=free_port())
    )
    app = App(load_config(cfg))
    try:
        with pytest.raises(ConfigError, match="too short"):
            app.api_server()
    finally:
        app.close()


def test_missing_certificate_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="certificate file"):
        server_context(tmp_path / "nope.crt", tmp_path / "nope.key")


# ----------------------------------------------------------- `connector api` process


def _wait_healthy(port: int, ca_file: Path, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            conn = http.client.HTTPSConnection(
                "127.0.0.1", port, context=client_context(ca_file), timeout=2
            )
            conn.request("GET", "/healthz", headers={"Authorization": f"Bearer {TOKEN}"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the API did not come up"
        time.sleep(0.1)


def test_connector_api_command_serves_until_sigterm(test_ca: CA, tmp_path: Path) -> None:
    from tests.harness.moto import free_port

    cert = test_ca.issue("api-cli")
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "api-token").write_text(TOKEN + "\n")
    (tmp_path / "pw").write_text("unused-password")
    port = free_port()
    cfg = tmp_path / "connector.toml"
    cfg.write_text(
        f"""
[vcenter]
url = "https://vc.example/sdk"
user = "svc"
password_file = "pw"

[s3]
bucket = "staging-bucket"

[state]
path = "state/state.db"

[api]
listen = "127.0.0.1:{port}"
cert_file = "{cert.cert_file}"
key_file = "{cert.key_file}"
token_file = "credential:api-token"
"""
    )
    env = dict(os.environ, CREDENTIALS_DIRECTORY=str(creds))
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector", "api", "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_healthy(port, test_ca.cert_file, proc)
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, context=client_context(test_ca.cert_file), timeout=5
        )
        conn.request("GET", "/v1/servers", headers={"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().status == 200
        health = health_check(cfg, env)
        assert health.returncode == 0 and health.stdout.strip() == "ok", health.stderr
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert TOKEN not in stderr
    down = health_check(cfg, env)
    assert down.returncode == 1 and "does not answer" in down.stderr
    # health checks are not audited (they run every few seconds)
    actions = [r["action"] for r in read_records(tmp_path / "state" / "audit.jsonl")]
    assert actions == ["config.load", "api.start", "api.stop"]


def health_check(cfg: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", "health", "--config", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_daemon_serves_the_api_when_it_is_configured(test_ca: CA, tmp_path: Path) -> None:
    from connector.app import App
    from connector.config import load_config
    from connector.daemon.api import probe_health
    from tests.harness.moto import free_port

    cert = test_ca.issue("api-daemon")
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "pw").write_text("unused-password")
    base = """
[vcenter]
url = "https://vc.example/sdk"
user = "svc"
password_file = "pw"

[s3]
bucket = "staging-bucket"

[state]
path = "state/state.db"
"""
    plain = tmp_path / "plain.toml"
    plain.write_text(base)
    assert App(load_config(plain)).daemon().api is None
    port = free_port()
    cfg = tmp_path / "connector.toml"
    cfg.write_text(
        base
        + f"""
[api]
listen = "127.0.0.1:{port}"
cert_file = "{cert.cert_file}"
key_file = "{cert.key_file}"
token_file = "token"
"""
    )
    config = load_config(cfg)
    app = App(config)
    try:
        api = app.daemon().api
        assert isinstance(api, ApiServer) and api.port == port
        api.start()  # what Daemon.run does once it is ready
        try:
            assert config.api is not None
            assert probe_health(config.api, config.api_token()) == "ok"
        finally:
            api.stop()
    finally:
        app.close()


def test_metrics_show_the_object_store_operations_of_the_app(
    test_ca: CA, tmp_path: Path, moto: Any, s3_bucket: str, faulty_s3: Any
) -> None:
    from connector.app import App
    from connector.config import load_config
    from connector.errors import NotFoundError
    from tests.harness.moto import free_port

    cert = test_ca.issue("api-metrics")
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "pw").write_text("unused-password")
    (tmp_path / "s3-secret").write_text(moto.secret_key + "\n")
    cfg = tmp_path / "connector.toml"
    cfg.write_text(
        f"""
[vcenter]
url = "https://vc.example/sdk"
user = "svc"
password_file = "pw"

[s3]
bucket = "{s3_bucket}"
region = "{moto.region}"
endpoint_url = "{faulty_s3.url}"
ca_file = "{moto.ca_file}"
access_key_id = "{moto.access_key}"
secret_access_key_file = "s3-secret"

[state]
path = "state/state.db"

[retry]
attempts = 3
base_delay = 0.01
max_delay = 0.02

[daemon]
bandwidth_limit = 4096

[api]
listen = "127.0.0.1:{free_port()}"
cert_file = "{cert.cert_file}"
key_file = "{cert.key_file}"
token_file = "token"
"""
    )
    app = App(load_config(cfg))
    try:
        store = app.store_objects
        faulty_s3.inject("PUT", "/metrics-test/", status=503, code="SlowDown")
        store.put("metrics-test/a", b"12345678")  # one 503, then stored by the retry
        assert store.get("metrics-test/a", 2, 3) == b"345"
        with pytest.raises(NotFoundError):
            store.get("metrics-test/absent")
        assert list(store.list("metrics-test/")) == ["metrics-test/a"]
        store.put("metrics-test/b", bytes(8192))  # twice the limit a second: it waits
        with app.api_server() as api:
            status, _, body = request(api, "/metrics", ca_file=test_ca.cert_file)
    finally:
        app.close()
    assert status == 200
    text = body.decode()
    ops = "connector_object_store_operations_total"
    assert f'{ops}{{operation="put",outcome="ok"}} 2.0' in text
    assert f'{ops}{{operation="put",outcome="error"}} 1.0' in text
    assert f'{ops}{{operation="get",outcome="ok"}} 1.0' in text
    assert f'{ops}{{operation="list",outcome="ok"}} 1.0' in text
    assert 'connector_retries_total{error="TransientError"} 1.0' in text
    waited = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("connector_bandwidth_wait_seconds_total ")
    ]
    assert waited and waited[0] > 0.5, waited
    errors = "connector_object_store_errors_total"
    assert f'{errors}{{error="TransientError",operation="put"}} 1.0' in text
    assert f'{errors}{{error="NotFoundError",operation="get"}} 1.0' in text
    assert 'connector_object_store_bytes_total{direction="sent"} 8200.0' in text
    assert 'connector_object_store_bytes_total{direction="received"} 3.0' in text
    assert 'connector_object_store_latency_seconds_count{operation="put"} 3.0' in text
    # what /metrics showed before is still there
    assert "connector_servers 0.0" in text and "connector_api_requests_total" in text


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("ready_cache_seconds = 0", "api.ready_cache_seconds"),
        ("ready_timeout_seconds = -1", "api.ready_timeout_seconds"),
        ("ready_cache_seconds = 'soon'", "api.ready_cache_seconds"),
    ],
)
def test_bad_readiness_settings_are_refused(
    test_ca: CA, tmp_path: Path, setting: str, message: str
) -> None:
    from connector.config import load_config

    cert = test_ca.issue("api-settings")
    cfg = tmp_path / "connector.toml"
    text = UNREACHABLE_CONFIG.format(cert=cert.cert_file, key=cert.key_file, port=free_port())
    kept = [line for line in text.splitlines() if not line.startswith("ready_")]
    cfg.write_text("\n".join(kept) + "\n" + setting + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)
