"""Run a command on a pseudo-terminal and see what a user's terminal would show.

`run_in_terminal` starts the process with stdin, stdout and stderr on the slave
side of a pty (of a given size), records every chunk of output it writes, and
returns them with the exit status. `Rendering` replays those chunks through
pyte, a VT100 terminal emulator, so a test can look at the screen (and the
lines scrolled off it) as it was after each write, not at raw escape codes.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pyte


@dataclass
class TerminalRun:
    chunks: list[bytes]
    returncode: int
    columns: int
    rows: int

    @property
    def raw(self) -> bytes:
        return b"".join(self.chunks)

    def frames(self) -> Iterator[list[str]]:
        """The screen's lines (those scrolled off it first) after each chunk of output."""
        screen = pyte.HistoryScreen(self.columns, self.rows, history=100_000)
        stream = pyte.ByteStream(screen)
        for chunk in self.chunks:
            stream.feed(chunk)
            yield _lines(screen, self.columns)

    def final(self) -> list[str]:
        """The lines as the terminal shows them at the end (scrolled-off lines first)."""
        last: list[str] = []
        for last in self.frames():
            pass
        return last

    def text(self) -> str:
        return "\n".join(self.final())


def _lines(screen: pyte.HistoryScreen, columns: int) -> list[str]:
    def row(line: dict[int, pyte.screens.Char]) -> str:
        return "".join(line[x].data for x in range(columns)).rstrip()

    return [row(line) for line in screen.history.top] + [r.rstrip() for r in screen.display]


def run_in_terminal(
    argv: Sequence[str],
    env: dict[str, str],
    columns: int = 140,
    rows: int = 40,
    timeout: float = 300,
) -> TerminalRun:
    """Run `argv` on a new pty of `columns` x `rows`; return its output chunks and exit code."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {**env, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(rows)}
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    proc = subprocess.Popen(
        list(argv), stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise AssertionError(
                    f"{' '.join(argv)} did not end within {timeout} s; it wrote:\n"
                    + b"".join(chunks).decode(errors="replace")
                )
            ready, _, _ = select.select([master], [], [], min(left, 1.0))
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the slave side closed it
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return TerminalRun(chunks, code, columns, rows)
