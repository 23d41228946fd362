"""The `connector` command line: the typer app, its commands, and `main()`.

The commands live in modules by subject (catalog, replication, store, security,
service, jobs, state) and share the options, consoles and config-loading wrapper of
`connector.cli.common`. They are registered here, in the order `connector --help`
lists them; the modules import `common` and never this package, so no import
cycle forms.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from connector import __version__
from connector.cli import catalog, jobs, replication, security, service, state, store
from connector.cli.common import err, out

app = typer.Typer(
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
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version.", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    """Handle the options of `connector` itself: --version prints the version and exits."""


app.command("vms")(catalog.vms)
app.command("replicate")(replication.replicate)
app.command("runs")(replication.runs)
app.command("restore")(replication.restore)
app.command("verify")(store.verify)
app.command("retention")(store.retention)
app.add_typer(security.audit_app, name="audit")
app.command("bucket-policy")(security.bucket_policy_cmd)
app.command("iam-policy")(security.iam_policy_cmd)
app.command("check")(security.check_cmd)
app.command("api")(service.api_cmd)
app.command("purge")(store.purge)
app.command("health")(service.health_cmd)
app.command("run")(service.run_command)
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(state.state_app, name="state")


def main() -> None:
    """Run the command line; Ctrl-C exits 130 after printing `interrupted`."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
