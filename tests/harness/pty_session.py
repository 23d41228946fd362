"""A program run in a pseudo-terminal, driven like a user at a keyboard.

`PtySession.expect` reads the terminal's output until a text appears (or a
deadline passes); `send` types a line. The program sees a terminal on stdin,
stdout and stderr, so it behaves as it does for a person.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from collections.abc import Sequence

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class PtySession:
    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: str | None = None) -> None:
        master, slave = pty.openpty()
        self._master = master
        self.proc = subprocess.Popen(
            list(argv), stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
        os.close(slave)
        self.output = ""  # everything read so far, without terminal escapes
        self._seen = 0

    def _read(self, timeout: float) -> bool:
        """Read what is there within `timeout`; False once the program closed the terminal."""
        ready, _, _ = select.select([self._master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self._master, 65536)
        except OSError:  # EIO: every end of the terminal is closed
            return False
        if not data:
            return False
        self.output += ANSI.sub("", data.decode("utf-8", errors="replace")).replace("\r", "")
        return True

    def expect(self, text: str, timeout: float = 60.0) -> None:
        """Wait until `text` appears after what an earlier expect matched."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.output.find(text, self._seen)
            if at >= 0:
                self._seen = at + len(text)
                return
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 1.0)):
                if self.output.find(text, self._seen) >= 0:
                    continue
                raise AssertionError(f"{text!r} did not appear; the terminal shows:\n{self.output}")

    def send(self, line: str) -> None:
        os.write(self._master, line.encode() + b"\r")

    def wait(self, timeout: float = 300.0) -> int:
        """Read the rest of the output until the program ends; its exit status."""
        deadline = time.monotonic() + timeout
        while self._read(1.0):
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"still running after {timeout}s:\n{self.output}")
            if self.proc.poll() is not None and not select.select([self._master], [], [], 0)[0]:
                break
        os.close(self._master)
        return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
