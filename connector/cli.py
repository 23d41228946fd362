"""The `connector` command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from connector import __version__
from connector.app import App, build
from connector.checks import run_checks
from connector.config import config_path, load_config
from connector.errors import ConfigError, ConnectorError, PermanentError
from connector.logging import configure, scrub
from connector.pipeline.restore import restore_disk

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Replicate vSphere VMs, disk by disk and incrementally, into S3.",
)
out = Console()
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


def _run(config: Path | None, fn: Callable[[App], T]) -> T:
    """Load the config, build the app, run `fn`; turn our errors into clear messages."""
    try:
        cfg = load_config(config_path(config))
        configure(cfg.log.level, cfg.log.json_format)
        with build(cfg) as a:
            return fn(a)
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {escape(scrub(str(exc)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except ConnectorError as exc:
        err.print(f"[red]error:[/red] {escape(scrub(str(exc)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        out.print(__version__)
        raise typer.Exit(0)


@app.command()
def vms(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Refresh and show the server catalog: the VMs vCenter has."""

    def go(a: App) -> None:
        rows = a.refresh_catalog()
        if as_json:
            print(json.dumps([asdict(r) for r in rows], indent=2))
            return
        t = Table("name", "instance uuid", "power", "CBT", "disks", "snapshots")
        for r in rows:
            disks = ", ".join(f"{d['key']}:{_size(d['capacity'])}" for d in r.disks)
            t.add_row(
                r.name,
                r.vm_uuid,
                r.power_state,
                "on" if r.cbt_enabled else "off",
                disks,
                str(len(r.snapshots)),
            )
        out.print(t)

    _run(config, go)


class _RichReporter:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[int, TaskID] = {}

    def stage(self, run_id: str, stage: str, detail: str = "") -> None:
        self.progress.console.print(f"[bold]{stage}[/bold] {detail}", highlight=False)

    def disk_progress(self, run_id: str, disk_key: int, done: int, total: int) -> None:
        if disk_key not in self.tasks:
            self.tasks[disk_key] = self.progress.add_task(f"disk {disk_key}", total=total)
        self.progress.update(self.tasks[disk_key], completed=done, total=total)


@app.command()
def replicate(
    vm: Annotated[str, typer.Argument(help="VM name or instance UUID.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run one replication of VM now, in the foreground."""

    def go(a: App) -> None:
        server = a.resolve_server(vm)
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} blocks"),
            TimeElapsedColumn(),
            console=err,
            disable=as_json,
        ) as progress:
            run = a.replicator(_RichReporter(progress)).replicate(server.vm_uuid)
        if as_json:
            print(json.dumps(asdict(run), indent=2))
            return
        out.print(f"run {run.id} {run.state}")
        for d in run.disks:
            out.print(
                f"  disk {d.disk_key}: {d.mode} ({d.reason}); changed {_size(d.bytes_changed)}, "
                f"read {_size(d.bytes_read)}, stored {_size(d.bytes_uploaded)}, "
                f"{d.blocks_new} new blocks, {d.blocks_dedup} deduplicated"
            )

    _run(config, go)


@app.command()
def runs(
    vm: Annotated[str | None, typer.Argument(help="Only this VM (name or UUID).")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the history of replication runs."""

    def go(a: App) -> None:
        server_id = a.resolve_server(vm, refresh=False).id if vm else None
        rows = a.state.runs(server_id)
        if as_json:
            print(json.dumps([asdict(r) for r in rows], indent=2))
            return
        names = {s.id: s.name for s in a.state.servers()}
        t = Table("run", "vm", "type", "state", "stage", "started", "finished", "read", "error")
        for r in rows:
            t.add_row(
                r.id,
                names.get(r.server_id, r.server_id),
                r.type,
                r.state,
                r.stage,
                r.started_at,
                r.finished_at or "",
                _size(sum(d.bytes_read for d in r.disks)),
                r.error or "",
            )
        out.print(t)

    _run(config, go)


@app.command()
def restore(
    vm: Annotated[str, typer.Argument(help="VM name or instance UUID.")],
    run: Annotated[str, typer.Option("--run", help="Run id (see `connector runs`).")],
    disk: Annotated[int, typer.Option("--disk", help="Disk device key, e.g. 2000.")],
    to: Annotated[Path, typer.Option("--to", help="Target file (or block device).")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a raw image of one disk as it was at one run, checking every block."""

    def go(a: App) -> dict[str, Any]:
        server = a.resolve_server(vm, refresh=False)
        if to.exists() and to.is_file():
            raise PermanentError(f"{to} already exists; remove it or choose another path")
        repo = a.repository()
        with Progress(console=err, disable=as_json) as progress:
            task = progress.add_task(f"restore disk {disk}", total=None)
            res = restore_disk(
                repo,
                server.id,
                run,
                disk,
                to,
                lambda done, total: progress.update(task, completed=done, total=total),
            )
        result = {"path": str(res.path), "size": res.size, "sha256": res.sha256}
        if as_json:
            print(json.dumps(result))
        else:
            out.print(f"restored {_size(res.size)} to {res.path}\nsha256 {res.sha256}")
        return result

    _run(config, go)


@app.command()
def check(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Check that this connector can do its job with this config (VDDK present, ...)."""

    def go(a: App) -> bool:
        results = run_checks(a.config)
        if as_json:
            print(json.dumps([asdict(r) for r in results], indent=2))
        else:
            t = Table("check", "status", "detail")
            colours = {"ok": "green", "fail": "red", "skip": "dim"}
            for r in results:
                t.add_row(escape(r.check), f"[{colours[r.status]}]{r.status}[/]", escape(r.detail))
            out.print(t)
        return all(r.status != "fail" for r in results)

    if not _run(config, go):
        raise typer.Exit(1)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
