"""`connector status`: HEALTHY or UNHEALTHY with the reasons, the services and the jobs.

The report is assembled by `connector.application.status`; this module prints
it: a short table, or the whole report as JSON with --json. Exit 0 when
HEALTHY, 1 when UNHEALTHY, 2 on a config error.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from connector.application.status import JobHealth, Service, StatusReport
from connector.cli.common import ConfigOpt, JsonOpt, human_size, out, run_with_app

if TYPE_CHECKING:
    from connector.app import App

ActiveLimitOpt = Annotated[
    float,
    typer.Option(
        "--active-limit",
        min=0.0,
        help="Hours a run may stay ACTIVE before the connector counts as UNHEALTHY.",
    ),
]


def status_cmd(
    config: ConfigOpt = None, as_json: JsonOpt = False, active_limit: ActiveLimitOpt = 12.0
) -> None:
    """Say whether the connector is HEALTHY (exit 0) or UNHEALTHY (exit 1), and why."""

    def go(a: App) -> StatusReport:
        report = a.status.report(dt.timedelta(hours=active_limit))
        if as_json:
            print(json.dumps(status_document(report), indent=2))
        else:
            _print_report(report)
        return report

    report = run_with_app(config, go, audit_load=False)
    raise typer.Exit(0 if report.healthy else 1)


def status_document(report: StatusReport) -> dict[str, Any]:
    """The report as `connector status --json` prints it."""
    doc = asdict(report)
    doc["healthy"] = report.healthy
    return doc


def _print_report(report: StatusReport) -> None:
    colour = "green" if report.healthy else "red"
    out.print(
        f"[{colour}]{report.status}[/{colour}] (connector {report.version}, {report.checked_at})",
        highlight=False,
    )
    for reason in report.reasons:
        out.print(f"  - {escape(reason)}", highlight=False, soft_wrap=True)
    d = report.daemon
    daemon = f"running ({escape(d.holder or '')})" if d.running else "not running"
    if not d.running and d.holder:
        daemon += f"; the state is in use by {escape(d.holder)}"
    out.print(f"daemon   {daemon}", highlight=False)
    out.print(f"vCenter  {_service(report.vcenter)}", highlight=False, soft_wrap=True)
    label = "S3" if report.s3.name == "S3" else "store"  # a local-directory replica store
    out.print(f"{label:<8} {_service(report.s3)}", highlight=False, soft_wrap=True)
    if not report.jobs:
        out.print("no jobs")
        return
    t = Table("job", "vm", "state", "last run", "ended", "next run", "lag", "moved", "on-demand")
    for j in report.jobs:
        t.add_row(*_job_row(j))
    out.print(t)


def _service(s: Service) -> str:
    if not s.configured:
        return "not configured"
    if s.reachable:
        return f"reachable ({escape(s.target)})"
    return f"[red]unreachable[/red] ({escape(s.target)}): {escape(s.error or '')}"


def _job_row(j: JobHealth) -> tuple[str, ...]:
    last = j.last_run
    done = j.last_completed_run
    state = j.state + (" (paused)" if j.paused else "")
    return (
        j.id,
        j.vm_name,
        state,
        f"{last.id} {last.state}" if last else "",
        (last.finished_at or "") if last else "",
        j.next_run or "",
        _lag(j.lag_seconds),
        human_size(done.bytes_uploaded) if done else "",
        f"{j.on_demand_left} of {j.on_demand_quota} left",
    )


def _lag(seconds: int | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 3600:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"
