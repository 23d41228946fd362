"""Config files and CLI runs of the connector against the test servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.moto import MotoServer
from tests.harness.vcsim import Simulator


@dataclass
class ConnectorEnv:
    workdir: Path
    config_file: Path
    bucket: str
    prefix: str

    def cli(
        self,
        *args: str,
        timeout: float = 300,
        check: bool = False,
        preexec_fn: Callable[[], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `connector ARGS` as a real process with this config.

        `preexec_fn` runs in the child before the connector starts (to set a
        resource limit, for example); `env` overrides variables of its
        environment (`COLUMNS`, `CONNECTOR_CONFIG`).
        """
        env = {
            **os.environ,
            "CONNECTOR_CONFIG": str(self.config_file),
            "COLUMNS": "200",
            **(env or {}),
        }
        proc = subprocess.run(
            [sys.executable, "-m", "connector", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
            preexec_fn=preexec_fn,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"connector {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json", check=True).stdout)


def write_config(
    workdir: Path,
    sim: Simulator,
    moto: MotoServer,
    bucket: str,
    prefix: str = "replicas",
    vcenter: dict[str, Any] | None = None,
    s3: dict[str, Any] | None = None,
    extra: str = "",
) -> ConnectorEnv:
    """A config file for the connector that uses the simulator and moto_server."""
    workdir.mkdir(parents=True, exist_ok=True)
    secret_file = workdir / "s3-secret"
    secret_file.write_text(moto.secret_key + "\n")
    secret_file.chmod(0o600)
    vc: dict[str, Any] = {
        "url": sim.url,
        "user": sim.user,
        "password_file": str(sim.password_file),
        "ca_file": str(sim.ca_file),
    }
    vc.update(vcenter or {})
    s3cfg: dict[str, Any] = {
        "bucket": bucket,
        "prefix": prefix,
        "region": moto.region,
        "endpoint_url": moto.endpoint_url,
        "ca_file": str(moto.ca_file),
        "access_key_id": moto.access_key,
        "secret_access_key_file": str(secret_file),
    }
    s3cfg.update(s3 or {})
    lines = ["[vcenter]"]
    lines += [f"{k} = {_toml(v)}" for k, v in vc.items() if v is not None]
    lines += ["", "[s3]"]
    lines += [f"{k} = {_toml(v)}" for k, v in s3cfg.items() if v is not None]
    lines += ["", "[state]", f"path = {_toml(str(workdir / 'state' / 'state.db'))}", "", extra]
    config_file = workdir / "connector.toml"
    config_file.write_text("\n".join(lines) + "\n")
    return ConnectorEnv(workdir, config_file, bucket, prefix)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))
