"""What every `connector` command shares: its options, consoles and app wrapper.

`run_with_app` loads the config, builds the App, audits the config load, runs
the command's body and turns the connector's errors into one line on stderr
and an exit code: 2 for a bad config or input, 1 for any other error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Collection
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from connector.audit import SUCCESS
from connector.domain.ids import check_run_id
from connector.domain.jobs import RUN_COMPLETED
from connector.errors import (
    ConfigError,
    ConnectorError,
    InvalidInputError,
    PermanentError,
    TransientError,
)
from connector.logging import configure, scrub

if TYPE_CHECKING:
    from connector.app import App
    from connector.check import CheckResult


def _fallback_width() -> int | None:
    """The width of output that goes to no terminal and no $COLUMNS: wide, not rich's 80."""
    if os.environ.get("COLUMNS") or sys.stdout.isatty():
        return None
    return PIPED_WIDTH


PIPED_WIDTH = 200
out = Console(width=_fallback_width())
err = Console(stderr=True)

T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (default: $CONNECTOR_CONFIG or /etc/connector/connector.toml)",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def run_with_app(
    config: Path | None,
    fn: Callable[[App], T],
    audit_load: bool = True,
    state_from_store: bool = False,
) -> T:
    """Load the config, build the app, run `fn`; turn our errors into clear messages.

    Every config load is recorded in the audit log (with the file's SHA-256, so a
    changed config shows), unless `audit_load` is False. With `state_from_store`
    (the commands that read or write the catalog and the runs), an empty state
    database is first rebuilt from the replica store, when the bucket holds one.
    """
    try:
        # Imported here, not above: `connector --help` and `--version` need neither the
        # config's validation (pydantic) nor the adapters (boto3, pyVmomi, SQLAlchemy).
        from connector.app import build
        from connector.config import config_path, load_config

        cfg = load_config(config_path(config))
        configure(cfg.log.level, cfg.log.json_format, cfg.log.library_level)
        with build(cfg) as a:
            if audit_load:
                _audit_config_load(a)
            if state_from_store:
                _rebuild_empty_state(a)
            return fn(a)
    except (ConfigError, InvalidInputError) as exc:
        print_error(exc)
        raise typer.Exit(2) from None
    except ConnectorError as exc:
        print_error(exc)
        raise typer.Exit(1) from None


def print_error(exc: Exception) -> None:
    """Print `error: MESSAGE` on stderr, with secrets redacted and markup escaped."""
    err.print(f"[red]error:[/red] {escape(scrub(str(exc)))}", highlight=False, soft_wrap=True)


def _audit_config_load(a: App) -> None:
    """Record the config load, the file's SHA-256 and the command in the audit log."""
    source = a.config.source
    digest = hashlib.sha256(source.read_bytes()).hexdigest() if source else None
    a.audit.record(
        "config.load", str(source), SUCCESS, sha256=digest, command=command_name(sys.argv[1:])
    )


def command_name(args: list[str]) -> str:
    """The command of a `connector` command line: its first word after the global options."""
    words = iter(args)
    for word in words:
        if word in ("--config", "-c"):
            next(words, None)
        elif not word.startswith("-"):
            return word
    return ""


def _rebuild_empty_state(a: App) -> None:
    """Rebuild an empty state database from the store (a new or rebuilt machine)."""
    try:
        if not a.state_rebuild.needed():
            return
    except TransientError as exc:
        # The store cannot be reached now (S3 down): a command that does not need it
        # goes on; one that does fails on its own, with its own message.
        err.print(
            f"[yellow]warning:[/yellow] the state database is empty and the replica store "
            f"cannot be reached to rebuild it from ({escape(scrub(str(exc)))}); run "
            "`connector state rebuild` once it can, before the next replication",
            highlight=False,
            soft_wrap=True,
        )
        return
    with a.audited("state.rebuild", str(a.config.state.path), automatic=True) as rec:
        report = a.state_rebuild.rebuild()
        rec.update(servers=report.servers_added, runs=report.runs_added, faults=len(report.faults))
    err.print(
        f"the state database was empty: rebuilt {report.servers_added} servers and "
        f"{report.runs_added} runs from the replica store",
        highlight=False,
        soft_wrap=True,
    )
    for fault in report.faults:
        err.print(
            f"[yellow]warning:[/yellow] {escape(scrub(fault))}", highlight=False, soft_wrap=True
        )


def id_table(*headers: str, ids: Collection[str]) -> Table:
    """A table whose id columns (the headers in `ids`) are never wrapped, folded or cut.

    When the table is wider than the console, only the other columns narrow, and
    they fold their text rather than cut it.
    """
    t = Table()
    for header in headers:
        if header in ids:
            t.add_column(header, no_wrap=True, min_width=len(header))
        else:
            t.add_column(header, overflow="fold")
    return t


LATEST = "latest"


def run_of(a: App, server_id: str, vm: str, run: str) -> str:
    """The run id `run` names: itself, or for `latest` the VM's most recent COMPLETED run."""
    if run != LATEST:
        return check_run_id(run)
    done = [r for r in a.state.runs(server_id) if r.state == RUN_COMPLETED]
    if not done:
        raise PermanentError(
            f"--run latest: {vm} has no COMPLETED run; list its runs with "
            f"`connector runs {vm}`, or replicate it with `connector replicate {vm}`"
        )
    return max(done, key=lambda r: (r.started_at, r.id)).id


def human_size(n: int) -> str:
    """A byte count in B, KiB, MiB, GiB or TiB: `512 B`, `1.5 MiB`."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


_MARKS = {"ok": "[green]ok[/green]", "failed": "[red]FAILED[/red]", "skipped": "skipped"}


def print_checks(results: list[CheckResult], as_json: bool) -> int:
    """Print check results as one table (check, result, fix) or JSON; return the failures."""
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        t = Table(show_lines=True)
        t.add_column("check", no_wrap=True)
        t.add_column("result", overflow="fold", ratio=3)
        t.add_column("fix", overflow="fold", ratio=2)
        for r in results:
            result = f"{_MARKS[r.status]}: {escape(r.summary)}"
            for line in r.details:
                result += f"\n  {escape(line)}"
            t.add_row(escape(r.name), result, escape(r.fix) if r.status == "failed" else "")
        out.print(t, highlight=False)
        failed = [r.name for r in results if r.status == "failed"]
        if failed:
            out.print(f"{len(failed)} check(s) failed: {', '.join(failed)}", highlight=False)
        else:
            out.print("every check passed", highlight=False)
    return sum(r.status == "failed" for r in results)
