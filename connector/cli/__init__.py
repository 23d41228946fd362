"""The `connector` command line: the typer app, its commands, and `main()`.

The commands live in modules by subject (catalog, replication, store, security,
init, service, status, jobs, state, support) and share the options, consoles and
config-loading wrapper of `connector.cli.common`. They are registered here, in
the order `connector --help` lists them; the modules import `common` and never
this package, so no import cycle forms.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

from connector import __version__
from connector.cli import (
    catalog,
    fleet,
    init,
    jobs,
    landing,
    replication,
    security,
    service,
    state,
    status,
    store,
    support,
)
from connector.cli.common import ConfigOpt, err, out, print_error
from connector.errors import InvalidInputError

app = typer.Typer(
    rich_markup_mode="markdown",
    add_completion=False,
    no_args_is_help=True,
    help="Replicate vSphere VMs, disk by disk and incrementally, into S3.",
)


def _print_version(value: bool) -> None:
    """Print the version and exit 0: eager, so it needs no command after it."""
    if value:
        out.print(__version__, highlight=False)
        raise typer.Exit(0)


@app.callback()
def main_options(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version.", is_eager=True, callback=_print_version
        ),
    ] = False,
    config: ConfigOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table (commands that can).")
    ] = False,
    credentials_dir: Annotated[
        Path | None,
        typer.Option(
            "--credentials-dir",
            help="Read `credential:NAME` secrets from DIR/NAME, as the service reads them "
            "from systemd's $CREDENTIALS_DIRECTORY (e.g. /etc/connector/credentials).",
        ),
    ] = None,
) -> None:
    """Handle the options of `connector` itself.

    --version prints the version and exits. --config and --json may come before
    the command as well as after it: they become the defaults of the command's own
    options, so one given after the command wins, and without either --config the
    command falls back to $CONNECTOR_CONFIG as before. --credentials-dir stands in
    for systemd's $CREDENTIALS_DIRECTORY, so a command run from a shell reads the
    same `credential:` secrets as the service.
    """
    if credentials_dir is not None:
        if not credentials_dir.is_dir():
            err.print(
                f"[red]error:[/red] --credentials-dir {escape(str(credentials_dir))} is not a "
                "folder; give the folder that holds the credential files "
                "(the unit's LoadCredential= sources, e.g. /etc/connector/credentials)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2)
        os.environ["CREDENTIALS_DIRECTORY"] = str(credentials_dir.resolve())
    given: dict[str, Any] = {}
    if config is not None:
        given["config"] = config
    if as_json:
        given["as_json"] = True
    if not given:
        return
    sub = ctx.invoked_subcommand
    group = ctx.command
    command = group.get_command(ctx, sub) if isinstance(group, TyperGroup) and sub else None
    if sub is None or command is None:
        return
    if as_json and not _takes_json(command):
        print_error(
            InvalidInputError(f"`connector {sub}` has no --json option; run it without --json")
        )
        raise typer.Exit(2)
    ctx.default_map = {sub: _defaults_for(command, given)}


def _takes_json(command: Any) -> bool:
    """Whether the command, or any command of the group, has the --json option."""
    if isinstance(command, TyperGroup):
        return any(_takes_json(c) for c in command.commands.values())
    return any(p.name == "as_json" for p in command.params)


def _defaults_for(command: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The default map of one command: the global options it has, for it and its subcommands."""
    if isinstance(command, TyperGroup):
        return {name: _defaults_for(c, given) for name, c in command.commands.items()}
    names = {p.name for p in command.params}
    return {k: v for k, v in given.items() if k in names}


app.command("init")(init.init_cmd)
app.command("vms")(catalog.vms)
app.command("replicate")(replication.replicate)
app.command("runs")(replication.runs)
app.command("restore")(replication.restore)
app.command("land")(landing.land)
app.command("verify")(store.verify)
app.command("retention")(store.retention)
app.add_typer(security.audit_app, name="audit")
app.command("bucket-policy")(security.bucket_policy_cmd)
app.command("iam-policy")(security.iam_policy_cmd)
app.command("check")(security.check_cmd)
app.command("api")(service.api_cmd)
app.command("purge")(store.purge)
app.command("health")(service.health_cmd)
app.command("status")(status.status_cmd)
app.command("run")(service.run_command)
app.command("support-bundle")(support.support_bundle_cmd)
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(state.state_app, name="state")
app.add_typer(fleet.fleet_app, name="fleet")


def main() -> None:
    """Run the command line; Ctrl-C exits 130 after printing `interrupted`."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
