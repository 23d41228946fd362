"""A real `moto_server` process on 127.0.0.1, serving HTTPS with a certificate from the test CA.

The server is started as a child process on a free port, polled until it answers
over TLS (with a deadline, never a bare sleep) and stopped by its pid.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from tests.harness.ca import TestCA

DEFAULT_REGION = "eu-central-1"
DEFAULT_ACCESS_KEY = "AKIAMOTOTESTKEY00001"
DEFAULT_SECRET_KEY = "moto-test-secret-key-do-not-use-anywhere"
_STARTUP_DEADLINE_S = 30.0
_STOP_DEADLINE_S = 10.0


class MotoStartError(RuntimeError):
    """moto_server did not start or did not answer in time."""


@dataclass(frozen=True)
class MotoServer:
    """A running moto_server (HTTPS) and the values a client needs to talk to it."""

    endpoint_url: str
    ca_file: Path
    region: str
    access_key: str
    secret_key: str
    pid: int
    log_file: Path = field(compare=False)

    @property
    def port(self) -> int:
        return int(self.endpoint_url.rsplit(":", 1)[1])

    def boto3_client(self, service: str = "s3", **kwargs: Any) -> Any:
        """A raw boto3 client for inspection in tests (trust: the test CA, passed explicitly)."""
        session = boto3.session.Session(
            aws_access_key_id=kwargs.pop("aws_access_key_id", self.access_key),
            aws_secret_access_key=kwargs.pop("aws_secret_access_key", self.secret_key),
            region_name=self.region,
        )
        config = Config(
            retries={"mode": "standard", "total_max_attempts": 1},
            s3={"addressing_style": "path"},
            ignore_configured_endpoint_urls=True,
        )
        return session.client(
            service,
            endpoint_url=self.endpoint_url,
            verify=str(self.ca_file),
            config=config,
            **kwargs,
        )

    def api_post(self, path: str, body: bytes) -> dict[str, Any]:
        """POST to moto's own control API (/moto-api/...), over the verified TLS connection."""
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.port, timeout=10, context=_verifying_context(self.ca_file)
        )
        try:
            conn.request("POST", path, body=body)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise RuntimeError(f"moto-api {path} answered {resp.status}: {data[:200]!r}")
        result: dict[str, Any] = json.loads(data or b"{}")
        return result

    def require_authentication(self, after_requests: int = 0) -> None:
        """Make the server check signatures and IAM permissions after `after_requests` requests.

        This is global to the server: use it only on a server of your own.
        """
        self.api_post("/moto-api/reset-auth", str(after_requests).encode())


class MotoProcess:
    """Owns the child process; `stop()` ends it by pid."""

    def __init__(self, server: MotoServer, proc: subprocess.Popen[bytes]) -> None:
        self.server = server
        self._proc = proc

    def stop(self) -> None:
        if self._proc.poll() is not None:
            return
        os.kill(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=_STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=_STOP_DEADLINE_S)


def _verifying_context(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_ready(proc: subprocess.Popen[bytes], port: int, ca_file: Path, log_file: Path) -> None:
    deadline = time.monotonic() + _STARTUP_DEADLINE_S
    ctx = _verifying_context(ca_file)
    last_error: BaseException | None = None
    delay = 0.05
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MotoStartError(
                f"moto_server exited with status {proc.returncode}: {_tail(log_file)}"
            )
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=ctx)
        try:
            conn.request("GET", "/moto-api/data.json")
            resp = conn.getresponse()
            resp.read()
            if resp.status < 500:
                return
            last_error = RuntimeError(f"HTTP {resp.status}")
        except (OSError, http.client.HTTPException) as exc:
            last_error = exc
        finally:
            conn.close()
        # Back off a little between polls; bounded by the deadline above.
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.5)
    raise MotoStartError(
        f"moto_server on port {port} did not answer over TLS within {_STARTUP_DEADLINE_S}s "
        f"(last error: {last_error}); log: {_tail(log_file)}"
    )


def _tail(log_file: Path, limit: int = 2000) -> str:
    try:
        return log_file.read_text(errors="replace")[-limit:]
    except OSError as exc:
        return f"(no log: {exc})"


def start_moto(
    ca: TestCA,
    workdir: Path,
    *,
    name: str = "moto",
    region: str = DEFAULT_REGION,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    attempts: int = 3,
    extended: bool = False,
    extra_env: dict[str, str] | None = None,
) -> MotoProcess:
    """Start moto_server with TLS from `ca` on a free 127.0.0.1 port and wait until it answers.

    `extended`: moto_server with the landing extension (`tests/harness/motoext.py`);
    `extra_env` reaches the server process (the extension's call log and faults files).
    """
    if extended:
        command = [sys.executable, "-m", "tests.harness.motoext"]
    else:
        beside = Path(sys.executable).parent / "moto_server"  # the virtualenv's own
        exe = str(beside) if beside.exists() else shutil.which("moto_server")
        if exe is None:
            raise MotoStartError("moto_server is not on PATH (pip install 'moto[server]')")
        command = [exe]
    workdir.mkdir(parents=True, exist_ok=True)
    cert = ca.issue(name, hosts=("127.0.0.1", "localhost"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_ACCESS_KEY_ID"] = access_key
    env["AWS_SECRET_ACCESS_KEY"] = secret_key
    env["AWS_DEFAULT_REGION"] = region
    if extended:
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(extra_env or {})
    last: MotoStartError | None = None
    for attempt in range(attempts):
        port = free_port()
        log_file = workdir / f"{name}-{port}.log"
        with log_file.open("wb") as log:
            proc = subprocess.Popen(
                [
                    *command,
                    "-H",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-c",
                    str(cert.cert_file),
                    "-k",
                    str(cert.key_file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=workdir,
            )
        server = MotoServer(
            endpoint_url=f"https://127.0.0.1:{port}",
            ca_file=ca.cert_file,
            region=region,
            access_key=access_key,
            secret_key=secret_key,
            pid=proc.pid,
            log_file=log_file,
        )
        handle = MotoProcess(server, proc)
        try:
            _wait_ready(proc, port, ca.cert_file, log_file)
        except MotoStartError as exc:
            handle.stop()
            last = exc
            if attempt + 1 < attempts:
                continue
            raise
        return handle
    raise MotoStartError(f"moto_server did not start: {last}")
