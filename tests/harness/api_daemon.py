"""`connector run` with its HTTPS API, against the simulator and moto_server."""

from __future__ import annotations

import http.client
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connector.tls import client_context
from tests.harness.ca import TestCA as CA
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.daemon import DaemonProcess, start_daemon, wait_for
from tests.harness.moto import free_port

MiB = 1024 * 1024
TOKEN = "daemon-api-token-" + "fedcba9876543210" * 2

FAST = """
[daemon]
sync_interval = 0.3
admission_interval = 0.3
discovery_interval = 3600
retry_backoff = 0.1
shutdown_deadline = 10
"""


@dataclass
class Api:
    env: ConnectorEnv
    daemon: DaemonProcess
    port: int
    ca_file: Path
    vm: str
    cert_file: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def call(
        self, method: str, path: str, doc: Any = None, token: str | None = TOKEN
    ) -> tuple[int, Any]:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=client_context(self.ca_file), timeout=30
        )
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            body = None if doc is None else json.dumps(doc)
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("Content-Type", "")
            return resp.status, json.loads(raw) if "json" in ctype else raw.decode()
        finally:
            conn.close()


def api_section(port: int, cert: Any, token_file: Path) -> str:
    return f"""
[api]
listen = "127.0.0.1:{port}"
cert_file = "{cert.cert_file}"
key_file = "{cert.key_file}"
token_file = "{token_file}"
ready_cache_seconds = 0.5
ready_timeout_seconds = 2
"""


def start_api_daemon(
    workdir: Path,
    vcsim: Any,
    moto: Any,
    bucket: str,
    test_ca: CA,
    vcenter: dict[str, Any] | None = None,
    s3: dict[str, Any] | None = None,
    extra: str = "",
) -> Api:
    workdir.mkdir(parents=True, exist_ok=True)
    token_file = workdir / "api-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_port()
    cert = test_ca.issue(f"api-{port}")
    env = write_config(
        workdir,
        vcsim,
        moto,
        bucket,
        vcenter=vcenter,
        s3=s3,
        extra=FAST + api_section(port, cert, token_file) + extra,
    )
    vm = f"api-vm-{os.urandom(3).hex()}"
    vcsim.add_vm(vm, [8 * MiB])
    daemon = start_daemon(env)
    daemon.wait_ready()
    api = Api(env, daemon, port, test_ca.cert_file, vm, cert.cert_file)
    wait_for("the API to be ready", lambda: api.call("GET", "/readyz")[0] == 200, timeout=60)
    return api
