"""`connector state rebuild`: the state database rebuilt from the replica store.

After the state database is lost (a rebuilt machine, a deleted file), the
catalog, the runs, each disk's CBT state and the dedup index come back from the
bucket, opened with the store key. The first command that reads the catalog or
the runs does the same on an empty state database; this command also fills in
a database that holds part of the state (an older copy from a backup).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from connector.application.rebuild import RebuildReport
from connector.cli.common import ConfigOpt, JsonOpt, err, out, run_with_app
from connector.errors import NotFoundError

if TYPE_CHECKING:
    from connector.app import App

state_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="The state database: a cache of the replica store.",
)


@state_app.command("rebuild")
def rebuild(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Rebuild the catalog, the runs and the disks' CBT state from the replica store.

    Adds what the store holds and the state database lacks; changes nothing when the
    store key does not open the store. Exit 1 when some run could not be read.
    """

    def go(a: App) -> RebuildReport:
        path = str(a.config.state.path)
        with a.audited("state.rebuild", path) as rec:
            try:
                repo = a.repository()  # before the state database is opened
            except NotFoundError:
                raise NotFoundError(
                    "the bucket holds no replica store at this prefix (no config object): "
                    "there is nothing to rebuild the state from; check [s3] bucket and prefix"
                ) from None
            report = a.state_rebuild.rebuild(repo)
            rec.update(
                servers=report.servers_added, runs=report.runs_added, faults=len(report.faults)
            )
        if as_json:
            print(json.dumps(asdict(report), indent=2))
        else:
            _print_report(report)
        return report

    if run_with_app(config, go).faults:
        raise typer.Exit(1)


def _print_report(r: RebuildReport) -> None:
    """What the store held and what was added, then the unnamed servers and the faults."""
    out.print(
        f"rebuilt the state database from the replica store: {r.servers} servers "
        f"({r.servers_added} added), {r.runs} committed runs ({r.runs_added} added), "
        f"{r.disks} disk states, {r.blocks} blocks indexed",
        highlight=False,
        soft_wrap=True,
    )
    for server_id in r.unnamed:
        out.print(
            f"server {server_id} has no server record in the store (written by an older "
            "connector): its runs are listed under its server id",
            highlight=False,
            soft_wrap=True,
        )
    for fault in r.faults:
        err.print(f"fault: {escape(fault)}", highlight=False, soft_wrap=True)
    if r.faults:
        err.print(
            "everything but what the faults name was rebuilt; a damaged object also shows "
            "in `connector verify`",
            highlight=False,
            soft_wrap=True,
        )
