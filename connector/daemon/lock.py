"""One process at a time replicates from a state database: a lock file beside it.

`connector run` holds it for its life; `connector replicate` holds it for one
run. The second process is refused with a message naming the holder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from connector.errors import PermanentError


class StateLock:
    def __init__(self, state_path: Path, purpose: str) -> None:
        self.path = state_path.parent / "connector.lock"
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PermanentError(
                f"another connector process ({holder}) is using the state in "
                f"{self.path.parent}; with `connector run` active, ask it for a run with "
                "`connector jobs start JOB` instead"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: connector {self.purpose}\n".encode(), 0)
        self._fd = fd

    def holder(self) -> str | None:
        """Who holds the lock now (`pid 12: connector run`), or None; takes nothing.

        The holder writes that line after it locks and empties it before it lets go,
        so an empty or absent file means nobody holds it. A line left by a killed
        process is told from a live holder by trying a shared lock, at once released.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            text = os.pread(fd, 200, 0).decode(errors="replace").strip()
            if not text:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return text
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
