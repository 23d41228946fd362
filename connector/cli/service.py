"""`connector api`, `health` and `run`: the long-running connector and its probe.

`api` serves only the HTTPS API; `run` runs the daemon (schedules, the job
queue, discovery, and the API when [api] is configured); `health` asks a
running API for /healthz, for container health checks.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING

import typer

from connector.audit import SUCCESS
from connector.cli.common import ConfigOpt, err, out, run_with_app
from connector.errors import ConfigError, PermanentError, UnreachableError

if TYPE_CHECKING:
    from connector.app import App


def api_cmd(config: ConfigOpt = None) -> None:
    """Serve the HTTPS API (the config's api section) until SIGTERM or Ctrl-C."""

    def go(a: App) -> None:
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        server = a.api_server().start()
        a.audit.record("api.start", server.url, SUCCESS)
        err.print(f"serving the API on {server.url}", highlight=False)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
            signal.signal(signal.SIGTERM, previous)
            a.audit.record("api.stop", server.url, SUCCESS)

    run_with_app(config, go)


def health_cmd(config: ConfigOpt = None) -> None:
    """Exit 0 when the local HTTPS API answers /healthz (the container health check)."""

    def go(a: App) -> None:
        if a.config.api is None:
            raise ConfigError("the API is not configured (no api section): nothing to check")
        from connector.daemon.api import probe_health

        try:
            status = probe_health(a.config.api, a.config.api_token())
        except (OSError, ValueError) as exc:
            raise UnreachableError(
                f"the API at {a.config.api.listen} does not answer: {exc}"
            ) from None
        if status != "ok":
            raise PermanentError(f"the API at {a.config.api.listen} reports {status!r}")
        out.print("ok")

    run_with_app(config, go, audit_load=False)


def run_command(config: ConfigOpt = None) -> None:
    """Run the connector: schedules, the job queue, discovery, until SIGTERM."""

    def go(a: App) -> int:
        return a.daemon().run()

    code = run_with_app(config, go, state_from_store=True)
    raise typer.Exit(code)
