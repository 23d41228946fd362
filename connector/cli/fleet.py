"""`connector fleet status`: the connectors sharing this fleet's database.

Members, their heartbeats, which one schedules (the leader) and which stage of
which run each executes now; `--json` prints the document of
`connector.application.fleet`. Exit 2 when the config has no [fleet] section.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from connector.application.fleet import FleetStatus, fleet_status
from connector.cli.common import ConfigOpt, JsonOpt, out, run_with_app
from connector.errors import ConfigError

if TYPE_CHECKING:
    from connector.app import App

fleet_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="A fleet of connectors sharing one PostgreSQL.",
)


@fleet_app.command("status")
def status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The fleet's members, their heartbeats, the leader and what each one runs."""

    def go(a: App) -> FleetStatus:
        if a.config.fleet is None:
            raise ConfigError(
                "this connector is not in a fleet: add a [fleet] section with database_url "
                "(see docs/fleet.md)"
            )
        return fleet_status(a.fleet)

    report = run_with_app(config, go, audit_load=False)
    if as_json:
        print(json.dumps(report.document(), indent=2))
        return
    leader = report.leader or "none (no member holds the scheduler's lease)"
    out.print(
        f"{report.alive} of {len(report.members)} member(s) alive; leader: {escape(leader)}",
        highlight=False,
    )
    if not report.members:
        return
    t = Table("member", "host", "version", "state", "heartbeat", "leader", "running")
    for m in report.members:
        running = ", ".join(f"{w.run_id} ({w.stage})" for w in m.running) or "-"
        t.add_row(
            escape(m.id),
            escape(m.host),
            m.version,
            m.state,
            f"{m.heartbeat_age:.1f} s ago",
            "yes" if m.leader else "",
            escape(running),
        )
    out.print(t)
