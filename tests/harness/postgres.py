"""PostgreSQL for the tests: a database of their own on the machine's server, or a
private server (initdb and pg_ctl on a free port under a temporary folder) for a
test that must stop and restart it.

The machine's server listens on 127.0.0.1:5432 with trust authentication
(`.ci/test` starts it where it is not running); each test database is created
for the test and dropped after it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

HOST = os.environ.get("CONNECTOR_TEST_PGHOST", "127.0.0.1")
PORT = int(os.environ.get("CONNECTOR_TEST_PGPORT", "5432"))
USER = os.environ.get("CONNECTOR_TEST_PGUSER", "postgres")
BINDIR = Path(os.environ.get("CONNECTOR_TEST_PGBIN", "/usr/lib/postgresql/15/bin"))


def _admin(host: str, port: int, user: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(host=host, port=port, user=user, dbname="postgres", autocommit=True)


@contextmanager
def temp_database(
    host: str = HOST, port: int = PORT, user: str = USER, prefix: str = "connector_test"
) -> Iterator[str]:
    """A new, empty database; yields its URL (no password: trust auth). Dropped after."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _admin(host, port, user) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://{user}@{host}:{port}/{name}"
    finally:
        with _admin(host, port, user) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a database of this test's own on the machine's PostgreSQL."""
    with temp_database() as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PrivatePostgres:
    """A PostgreSQL server of one test's own, which it may stop and start."""

    root: Path
    port: int
    user: str = "postgres"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(
            _as_server_user(
                [
                    str(BINDIR / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    self.user,
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            ),
            check=True,
            capture_output=True,
            env=_pg_env(),
        )
        sock = self.root / "sock"
        sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(sock, "postgres", "postgres")

    def start(self) -> None:
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} "
            f"-c unix_socket_directories={self.root / 'sock'} -c fsync=off "
            "-c max_connections=200"
        )
        subprocess.run(
            _as_server_user(
                [
                    str(BINDIR / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log_file),
                    "-o",
                    opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            env=_pg_env(),
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            _as_server_user(
                [str(BINDIR / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]
            ),
            check=True,
            capture_output=True,
            env=_pg_env(),
        )

    def configure(self, settings: list[str], hba: list[str] | None = None) -> None:
        """Add settings to postgresql.conf (and replace pg_hba.conf); restart to apply."""
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n".join(settings) + "\n")
        if hba is not None:
            (self.data / "pg_hba.conf").write_text("\n".join(hba) + "\n")

    def own(self, path: Path) -> Path:
        """Copy a file into the server's folder, owned by the server's user, mode 0600."""
        target = self.root / path.name
        shutil.copyfile(path, target)
        target.chmod(0o600)
        if os.geteuid() == 0:
            shutil.chown(target, "postgres", "postgres")
        return target

    def execute(self, sql: str) -> None:
        with _admin("127.0.0.1", self.port, self.user) as conn:
            conn.execute(sql)

    def url(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        with _admin("127.0.0.1", self.port, self.user) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """initdb, start; stopped (immediately) and removed after. Its folder is a new one
    under the system's temporary folder, which the server's user can reach (pytest's
    tmp_path is private to root)."""
    if not (BINDIR / "initdb").exists():
        raise AssertionError(f"PostgreSQL's server programs are not in {BINDIR}; run .ci/install")
    root = Path(tempfile.mkdtemp(prefix="connector-pg-"))
    root.chmod(0o755)
    pg = PrivatePostgres(root / "pg", free_port())
    pg.init()
    pg.start()
    try:
        yield pg
    finally:
        with suppress(subprocess.CalledProcessError):
            pg.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL's server programs refuse to run as root: run them as `postgres`."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _pg_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PGDATA", None)
    return env
