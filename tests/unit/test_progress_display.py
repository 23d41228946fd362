"""The progress display off a terminal: log lines at most every PLAIN_INTERVAL, a summary."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import structlog
from rich.console import Console
from structlog.testing import capture_logs

from connector import logging as connector_logging
from connector.cli.progress import (
    PLAIN_INTERVAL,
    OperationProgress,
    clock_time,
    counted,
    duration,
    rate,
)


@pytest.fixture(autouse=True)
def info_logs() -> Iterator[None]:
    """Info-level logging, as `connector` configures it, for this test only."""
    connector_logging.configure("info")
    try:
        yield
    finally:
        structlog.reset_defaults()
        connector_logging._default()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_off_a_terminal_a_task_logs_a_line_per_interval_and_at_its_end() -> None:
    out = io.StringIO()
    clock = Clock()
    display = OperationProgress(Console(file=out, width=200), clock=clock)
    assert not display.live
    with capture_logs() as logs, display:
        reporter = display.reporter()
        reporter.stage("r-1", "transfer", "disk 2000: full (first run)")
        reporter.disk_progress("r-1", 2000, 1 << 20, 8 << 20)  # at once: no line
        clock.now += PLAIN_INTERVAL
        reporter.disk_progress("r-1", 2000, 4 << 20, 8 << 20)  # an interval later: a line
        clock.now += 1
        reporter.disk_progress("r-1", 2000, 5 << 20, 8 << 20)  # within the interval: none
        clock.now += 1
        reporter.disk_progress("r-1", 2000, 8 << 20, 8 << 20)  # finished: a line
    assert [e["event"] for e in logs] == ["stage", "progress", "progress"]
    assert logs[0]["stage"] == "transfer" and logs[0]["detail"].startswith("disk 2000")
    assert logs[1]["task"] == "disk 2000" and logs[1]["done"] == "4.0 MiB"
    assert logs[1]["total"] == "8.0 MiB" and logs[1]["rate"] == "409.6 KiB/s"
    assert logs[1]["eta"] == "0:00:10"  # 4 MiB left at 0.4 MiB/s
    assert logs[2]["took"] == "12.0 s" and "eta" not in logs[2]
    display.summary("replicated web-01 (1 disk): read", 8 << 20, "; stored 2.0 MiB")
    assert out.getvalue() == (
        "replicated web-01 (1 disk): read 8.0 MiB in 12.0 s (682.7 KiB/s); stored 2.0 MiB\n"
    )
    assert display.bytes_done == 8 << 20


def test_json_output_never_draws_bars_even_on_a_terminal() -> None:
    console = Console(file=io.StringIO(), force_terminal=True)
    assert OperationProgress(console).live
    assert not OperationProgress(console, plain=True).live


def test_durations_rates_and_etas_read_as_people_read_them() -> None:
    assert duration(0.42) == "0.4 s"
    assert duration(245) == "4 min 05 s"
    assert duration(7620) == "2 h 07 min"
    assert rate(3 << 20, 2.0) == "1.5 MiB/s"
    assert rate(100, 0.0) == "0 B/s"
    assert clock_time(3725) == "1:02:05"
    assert (counted(1, "run"), counted(2, "run"), counted(0, "pack")) == (
        "1 run",
        "2 runs",
        "0 packs",
    )
