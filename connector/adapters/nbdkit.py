"""Runs nbdkit for one disk: a private Unix socket, read-only, gone when the disk is done.

The process is started in the foreground (so its process id is nbdkit's own)
with `--exit-with-parent` (it dies with the connector even after a SIGKILL),
`--readonly`, and `--unix` on a socket in a fresh directory of mode 0700 under
the state directory; the socket itself is mode 0600. nbdkit writes its pid file
when it accepts connections: that is the readiness signal. `stop` terminates
it, waits, and removes the socket and the directory, after failures too.

Note: `--exit-with-parent` follows the thread that started the process, so
start nbdkit from a thread that lives as long as the reads.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from connector.adapters.nbd import NbdAddress
from connector.errors import PermanentError, TransientError
from connector.logging import get_logger, scrub

log = get_logger(__name__)

SOCKET_NAME = "nbd.sock"
PIDFILE_NAME = "nbdkit.pid"
LOG_NAME = "nbdkit.log"


def nbdkit_command(
    nbdkit: str,
    socket_path: Path,
    plugin: str,
    params: Sequence[str],
    *,
    pidfile: Path | None = None,
    filters: Sequence[str] = (),
) -> list[str]:
    """The nbdkit command line: common options, filters, the plugin, its parameters."""
    pid = pidfile if pidfile is not None else socket_path.with_name(PIDFILE_NAME)
    return [
        nbdkit,
        "--exit-with-parent",
        "--readonly",
        "--foreground",
        "--unix",
        str(socket_path),
        "--pidfile",
        str(pid),
        *(f"--filter={f}" for f in filters),
        plugin,
        *params,
    ]


def sweep_stale(run_dir: Path) -> list[Path]:
    """Remove the directories of nbdkit processes that are gone (a connector killed mid-run).

    nbdkit itself exits with its parent; only its socket and pid file remain.
    """
    removed: list[Path] = []
    for workdir in sorted(run_dir.glob("nbdkit-*")):
        try:
            pid = int((workdir / PIDFILE_NAME).read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None:
            try:
                os.kill(pid, 0)
                continue  # still running: another connector's, or not stale yet
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        elif time.time() - workdir.stat().st_mtime < 3600:
            continue  # no pid file yet: maybe starting right now
        shutil.rmtree(workdir, ignore_errors=True)
        removed.append(workdir)
    if removed:
        log.info("nbdkit.stale_removed", count=len(removed), run_dir=str(run_dir))
    return removed


class NbdkitServer:
    """One nbdkit process serving one export on a private Unix socket."""

    def __init__(
        self,
        command: Callable[[Path], list[str]],
        run_dir: Path,
        *,
        what: str,
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        """`command(socket_path)` gives the command line (see `nbdkit_command`)."""
        self._command = command
        self._run_dir = run_dir
        self.what = what
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir: Path | None = None
        self.socket_path: Path | None = None

    def start(self) -> NbdAddress:
        """Start nbdkit and wait until it accepts connections; clean up if it does not."""
        self._run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self._run_dir, 0o700)
        sweep_stale(self._run_dir)
        self.workdir = Path(tempfile.mkdtemp(prefix="nbdkit-", dir=self._run_dir))
        self.socket_path = self.workdir / SOCKET_NAME
        pidfile = self.workdir / PIDFILE_NAME
        argv = self._command(self.socket_path)
        try:
            log_fd = os.open(self.workdir / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                self.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                    close_fds=True,
                    umask=0o177,  # the socket and pid file: owner read/write only
                    start_new_session=True,  # a Ctrl-C reaches the connector, which stops it
                )
            finally:
                os.close(log_fd)
        except FileNotFoundError:
            self.stop()
            raise PermanentError(
                f"{self.what}: {argv[0]} is not installed (apt-get install nbdkit)"
            ) from None
        except BaseException:
            self.stop()
            raise
        try:
            self._wait_ready(pidfile)
        except BaseException:
            self.stop()
            raise
        os.chmod(self.socket_path, 0o600)
        log.info(
            "nbdkit.listening", what=self.what, socket=str(self.socket_path), pid=self.proc.pid
        )
        return NbdAddress(socket_path=str(self.socket_path))

    def _wait_ready(self, pidfile: Path) -> None:
        assert self.proc is not None and self.socket_path is not None
        deadline = time.monotonic() + self._start_timeout
        pause = 0.01
        while True:
            code = self.proc.poll()
            if code is not None:
                raise PermanentError(
                    f"{self.what} exited with code {code} before serving the disk: "
                    f"{self.output_tail() or 'no output'}"
                )
            if pidfile.exists() and self.socket_path.exists():
                return
            if time.monotonic() > deadline:
                raise TransientError(
                    f"{self.what} did not accept connections within "
                    f"{self._start_timeout:.0f} s: {self.output_tail() or 'no output'}"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.2)

    def output_tail(self, lines: int = 8) -> str:
        """The last lines nbdkit wrote, with known secrets masked."""
        if self.workdir is None:
            return ""
        try:
            text = (self.workdir / LOG_NAME).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return scrub(" | ".join(text.strip().splitlines()[-lines:]))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop nbdkit (TERM, then KILL) and remove its socket and directory. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=self._stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning("nbdkit.kill", what=self.what, reason="did not stop on SIGTERM")
                    proc.kill()
                    proc.wait()
            tail = self.output_tail()
            if proc.returncode not in (0, -15):
                log.warning("nbdkit.failed", what=self.what, code=proc.returncode, output=tail)
            elif tail:
                log.info("nbdkit.stopped", what=self.what, output=tail)
        workdir, self.workdir = self.workdir, None
        if workdir is not None:
            if self.socket_path is not None:
                with contextlib.suppress(OSError):
                    self.socket_path.unlink(missing_ok=True)
            shutil.rmtree(workdir, ignore_errors=True)

    def __enter__(self) -> NbdkitServer:
        """Start (if not started yet); `__exit__` stops."""
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
