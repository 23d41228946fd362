"""Prometheus metrics read from the state store and the queue at scrape time.

- connector_info{version}, connector_servers
- connector_runs{state}: runs by state
- connector_run_bytes_read, connector_run_bytes_uploaded: of completed runs
- connector_vm_last_run_throughput_bytes_per_second{server,vm}: bytes read over the
  duration of each VM's last completed run
- connector_vm_replication_lag_seconds{server,vm}: since the end of each VM's last
  completed run (a VM with no completed run has no series)
- connector_queue_depth: tasks waiting in the run queue
- connector_run_failures{stage}: failed runs by the stage that failed
- connector_active_run_progress_ratio{run,vm}: blocks done over blocks to do of
  each ACTIVE run

The object store's own metrics (`decorators/metrics.py` StoreMetrics), the
retries and the bandwidth wait (ProcessMetrics) and the API's requests are
registered beside these by the composition root and the server.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

from connector import __version__
from connector.domain.jobs import RUN_ACTIVE, RUN_COMPLETED, RUN_FAILED
from connector.domain.records import Control, RunRow, ServerRow
from connector.domain.times import parse, utcnow


class MetricsState(Protocol):
    def servers(self) -> list[ServerRow]: ...
    def runs(self, server_id: str | None = None) -> list[RunRow]: ...
    def controls(self, run_ids: list[str]) -> dict[str, Control]: ...


def _uploaded(r: RunRow) -> int:
    value = r.stats.get("bytes_uploaded")
    return int(value) if value is not None else sum(d.pack_bytes for d in r.disks)


def _read(r: RunRow) -> int:
    value = r.stats.get("bytes_read")
    return int(value) if value is not None else sum(d.bytes_read for d in r.disks)


class StateCollector:
    def __init__(
        self,
        state: MetricsState,
        queue_depth: Callable[[], int] | None = None,
        now: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._state = state
        self._queue_depth = queue_depth
        self._now = now

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("connector", "The connector's version")
        info.add_metric([], {"version": __version__})
        yield info
        servers = self._state.servers()
        names = {s.id: s.name for s in servers}
        yield GaugeMetricFamily(
            "connector_servers", "VMs in the server catalog", value=len(servers)
        )
        runs = self._state.runs()
        by_state = GaugeMetricFamily(
            "connector_runs", "Replication runs by state", labels=["state"]
        )
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.state] = counts.get(run.state, 0) + 1
        for state, count in sorted(counts.items()):
            by_state.add_metric([state], count)
        yield by_state
        completed = [r for r in runs if r.state == RUN_COMPLETED]
        yield GaugeMetricFamily(
            "connector_run_bytes_read",
            "Bytes read from the source by completed runs",
            value=sum(_read(r) for r in completed),
        )
        yield GaugeMetricFamily(
            "connector_run_bytes_uploaded",
            "Bytes uploaded to the object store by completed runs",
            value=sum(_uploaded(r) for r in completed),
        )
        yield from self._per_vm(completed, names)
        if self._queue_depth is not None:
            yield GaugeMetricFamily(
                "connector_queue_depth",
                "Tasks waiting in the run queue",
                value=self._queue_depth(),
            )
        failed = [r for r in runs if r.state == RUN_FAILED]
        active = [r for r in runs if r.state == RUN_ACTIVE]
        controls = self._state.controls([r.id for r in failed + active])
        failures = GaugeMetricFamily(
            "connector_run_failures", "Failed runs by the stage that failed", labels=["stage"]
        )
        by_stage: dict[str, int] = {}
        for r in failed:
            ctl = controls.get(r.id)
            stage = (ctl.failed_stage if ctl else None) or r.stage or "unknown"
            by_stage[stage] = by_stage.get(stage, 0) + 1
        for stage, n in sorted(by_stage.items()):
            failures.add_metric([stage], n)
        yield failures
        progress = GaugeMetricFamily(
            "connector_active_run_progress_ratio",
            "Blocks done over blocks to do of each ACTIVE run",
            labels=["run", "vm"],
        )
        for r in active:
            ctl = controls.get(r.id)
            if ctl is not None and ctl.progress_total:
                progress.add_metric(
                    [r.id, names.get(r.server_id, "?")], ctl.progress_done / ctl.progress_total
                )
        yield progress

    def _per_vm(self, completed: list[RunRow], names: dict[str, str]) -> Iterator[Metric]:
        last: dict[str, RunRow] = {}
        for r in completed:
            if r.finished_at and (
                r.server_id not in last or (last[r.server_id].finished_at or "") < r.finished_at
            ):
                last[r.server_id] = r
        lag = GaugeMetricFamily(
            "connector_vm_replication_lag_seconds",
            "Seconds since the end of the VM's last completed run",
            labels=["server", "vm"],
        )
        rate = GaugeMetricFamily(
            "connector_vm_last_run_throughput_bytes_per_second",
            "Bytes read over the duration of the VM's last completed run",
            labels=["server", "vm"],
        )
        now = self._now()
        for server_id, r in sorted(last.items()):
            labels = [server_id, names.get(server_id, "?")]
            ended = parse(r.finished_at or r.started_at)
            lag.add_metric(labels, max((now - ended).total_seconds(), 0.0))
            seconds = (ended - parse(r.started_at)).total_seconds()
            rate.add_metric(labels, _read(r) / seconds if seconds > 0 else 0.0)
        yield lag
        yield rate
