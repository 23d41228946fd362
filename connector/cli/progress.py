"""Progress of the long commands (replicate, restore, verify, purge): bars and a summary.

On a terminal, `OperationProgress` draws one live bar per disk (or per task: the
blocks verify reads, the packs purge deletes) with the bytes done of the total,
the rate and the time left, and routes every log line through the same console
(`connector.logging.routed_through`), so that rich prints it above the bars
instead of through the line of one. When the command ends, the bars stay as they
were last drawn and one summary line follows: what was moved, how long it took
and at what throughput.

Elsewhere (stderr a pipe, a file or journald, a dumb terminal, or `--json`)
there are no bars and no control sequences: stages, a progress line per task
at most every `PLAIN_INTERVAL` seconds and when the task ends, are ordinary log
lines, and the summary is plain text.

This module is shared by the command modules, as `common` is; it imports only
`common`, never a command module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from connector.cli.common import human_size
from connector.logging import get_logger, routed_through

log = get_logger("connector.progress")

# Seconds between two plain progress lines of one task (not on a terminal).
PLAIN_INTERVAL = 10.0


def duration(seconds: float) -> str:
    """A duration for people: `0.4 s`, `12.3 s`, `4 min 05 s`, `2 h 07 min`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def counted(n: int, noun: str) -> str:
    """`1 run`, `2 runs`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def rate(n: int, seconds: float) -> str:
    """A throughput: `12.5 MiB/s` (bytes per second in binary units)."""
    return f"{human_size(int(n / seconds)) if seconds > 0 else human_size(0)}/s"


def clock_time(seconds: float) -> str:
    """`h:mm:ss`, as an ETA."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


@dataclass
class _Item:
    label: str
    started: float
    done: int = 0
    total: int = 0
    finished: float | None = None
    last_line: float = field(default=0.0)

    def speed(self, now: float) -> float:
        elapsed = (self.finished or now) - self.started
        return self.done / elapsed if elapsed > 0 else 0.0


class _BytesColumn(ProgressColumn):
    """`12.0 MiB/64.0 MiB`."""

    def render(self, task: Task) -> Text:
        total = human_size(int(task.total)) if task.total is not None else "?"
        return Text(f"{human_size(int(task.completed))}/{total}")


class _RateColumn(ProgressColumn):
    """The recent rate (rich's window), else the average since the task began."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed and task.elapsed:
            speed = task.completed / task.elapsed
        return Text(f"{human_size(int(speed or 0))}/s")


class _EtaColumn(ProgressColumn):
    """`ETA 0:01:23` while under way, `done in 4.2 s` once finished."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text(f"done in {duration(task.finished_time or task.elapsed or 0.0)}")
        speed = task.speed
        if not speed and task.elapsed:
            speed = task.completed / task.elapsed
        if not speed or task.total is None:
            return Text("ETA -:--:--")
        return Text(f"ETA {clock_time((task.total - task.completed) / speed)}")


class OperationProgress:
    """The progress of one long command: bars on a terminal, log lines elsewhere.

    `update(key, label, done, total)` moves a task's bar (made at its first
    update); `note(text)` prints a stage line; after the `with` block,
    `summary(text, nbytes)` prints the closing line with the duration and
    the throughput.
    """

    def __init__(
        self,
        console: Console,
        plain: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.live = not plain and console.is_terminal and not console.is_dumb_terminal
        self.clock = clock
        self.started = clock()
        self.ended: float | None = None
        self._items: dict[object, _Item] = {}
        self._tasks: dict[object, TaskID] = {}
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._route: Any = None

    # -- the display ----------------------------------------------------------------------

    def __enter__(self) -> OperationProgress:
        self.started = self.clock()
        if self.live:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                _BytesColumn(),
                _RateColumn(),
                _EtaColumn(),
                console=self.console,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._progress.start()
            self._route = routed_through(self.console)
            self._route.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.ended = self.clock()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._route is not None:
            self._route.__exit__(exc_type, exc, tb)
            self._route = None

    @property
    def seconds(self) -> float:
        """How long the operation took (so far, inside the block)."""
        return (self.ended if self.ended is not None else self.clock()) - self.started

    @property
    def bytes_done(self) -> int:
        """The bytes of every task, added up."""
        with self._lock:
            return sum(i.done for i in self._items.values())

    # -- events -----------------------------------------------------------------------

    def note(self, text: str, **fields: Any) -> None:
        """A stage line: above the bars on a terminal, a log line elsewhere."""
        if self._progress is not None:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        elif fields:
            log.info("stage", **fields)
        else:
            log.info(text)

    def update(self, key: object, label: str, done: int, total: int) -> None:
        """Task `key` (labelled `label`) has `done` of `total` bytes behind it."""
        now = self.clock()
        with self._lock:
            item = self._items.get(key)
            first = item is None
            if item is None:
                item = self._items[key] = _Item(label, now, last_line=now)
            item.done, item.total = done, total
            finished = total > 0 and done >= total and item.finished is None
            if finished:
                item.finished = now
            line = not self.live and (
                finished or (item.finished is None and now - item.last_line >= PLAIN_INTERVAL)
            )
            if line:
                item.last_line = now
            speed = item.speed(now)
        if self._progress is not None:
            if key not in self._tasks:
                self._tasks[key] = self._progress.add_task(label, total=total)
            # Drawn at once on the first and the last update (a short task is seen
            # with its ETA and its end), else at the display's own refresh rate.
            self._progress.update(
                self._tasks[key], completed=done, total=total, refresh=first or finished
            )
            return
        if line:
            self._plain_line(item, speed, finished)

    def _plain_line(self, item: _Item, speed: float, finished: bool) -> None:
        fields: dict[str, Any] = {
            "task": item.label,
            "done": human_size(item.done),
            "total": human_size(item.total),
            "rate": f"{human_size(int(speed))}/s",
        }
        if finished:
            fields["took"] = duration((item.finished or item.started) - item.started)
        elif speed > 0:
            fields["eta"] = clock_time((item.total - item.done) / speed)
        log.info("progress", **fields)

    def summary(self, text: str, nbytes: int, after: str = "") -> None:
        """`TEXT HUMAN-BYTES in DURATION (RATE)AFTER` on the display's console, plain text."""
        seconds = self.seconds
        self.console.print(
            f"{text} {human_size(nbytes)} in {duration(seconds)} ({rate(nbytes, seconds)})" + after,
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    # -- adapters ---------------------------------------------------------------------

    def task(self, key: object, label: str) -> Callable[[int, int], None]:
        """A `progress(done, total)` callback that moves one task (restore, verify, purge)."""
        return lambda done, total: self.update(key, label, done, total)

    def reporter(self) -> RunReporter:
        """The pipeline's Reporter for a replication run drawn on this display."""
        return RunReporter(self)


class RunReporter:
    """A run's stages as notes and its disks as tasks of an `OperationProgress`."""

    def __init__(self, display: OperationProgress) -> None:
        self.display = display

    def stage(self, run_id: str, stage: str, detail: str = "") -> None:
        self.display.note(f"{stage} {detail}".strip(), run=run_id, stage=stage, detail=detail)

    def disk_progress(self, run_id: str, disk_key: int, done: int, total: int) -> None:
        self.display.update((run_id, disk_key), f"disk {disk_key}", done, total)
