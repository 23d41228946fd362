"""`connector run` as a real process, with a systemd-style notify socket bound by the test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from tests.harness.connector_env import ConnectorEnv

T = TypeVar("T")


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 60.0, every: float = 0.1
) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    notify: socket.socket
    log_file: Path
    _log: IO[bytes]
    messages: list[str] = field(default_factory=list)

    def read_notifications(self) -> list[str]:
        """Every notification received so far (kept after the socket is closed)."""
        if self.notify.fileno() < 0:
            return self.messages
        while True:
            try:
                data = self.notify.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.extend(data.decode().splitlines())

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"connector run exited with {self.proc.returncode}:\n{self.log()}"
                )
            return "READY=1" in self.read_notifications()

        wait_for("READY=1 from connector run", ready, timeout)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_file.read_text(errors="replace")[-6000:]

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            self.close()
        return code

    def wait_killed(self, timeout: float = 120.0) -> None:
        """Wait for the process to die by its own SIGKILL (a fault-injection point)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the crash point was never reached:\n{self.log()}") from None
        assert code == -signal.SIGKILL, f"exited with {code}, not SIGKILL:\n{self.log()}"
        self.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.close()

    def close(self) -> None:
        self.read_notifications()
        self.notify.close()
        self._log.close()


def start_daemon(
    env: ConnectorEnv,
    name: str = "daemon",
    extra_env: dict[str, str] | None = None,
    watchdog_usec: int | None = None,
) -> DaemonProcess:
    """Start `python -m connector run` with NOTIFY_SOCKET pointing at a socket we bound."""
    sock_path = env.workdir / f"{name}-notify.sock"
    sock_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.setblocking(False)
    run_env: dict[str, Any] = dict(
        os.environ, CONNECTOR_CONFIG=str(env.config_file), NOTIFY_SOCKET=str(sock_path)
    )
    run_env.pop("CONNECTOR_TEST_CRASH_AT", None)
    if watchdog_usec is not None:
        run_env["WATCHDOG_USEC"] = str(watchdog_usec)
    run_env.update(extra_env or {})
    log_file = env.workdir / f"{name}.log"
    log = open(log_file, "ab")  # noqa: SIM115 - closed by DaemonProcess.close
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector", "run"],
        env=run_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return DaemonProcess(proc, notify, log_file, log)


def job_doc(env: ConnectorEnv, job: str) -> dict[str, Any]:
    """What `connector jobs show JOB --json` prints, read in-process (a CLI start costs ~2 s)."""
    from connector.app import App
    from connector.cli.jobs import job_document
    from connector.config import load_config

    app = App(load_config(env.config_file))
    try:
        return job_document(app, app.jobs.find(job), with_runs=True)
    finally:
        app.close()
