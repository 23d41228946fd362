"""The `connector` command line."""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
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
from connector.audit import SUCCESS
from connector.audit import verify as verify_audit
from connector.check import run_checks
from connector.config import config_path, load_config
from connector.daemon.api import probe_health
from connector.daemon.lock import StateLock
from connector.errors import (
    ConfigError,
    ConnectorError,
    InvalidInputError,
    PermanentError,
    UnreachableError,
)
from connector.logging import configure, scrub
from connector.pipeline.purge import (
    GcResult,
    RetentionResult,
    collect_garbage,
    remove_server,
)
from connector.pipeline.purge import (
    purge as purge_store,
)
from connector.pipeline.restore import restore_disk
from connector.pipeline.verify import VerifyReport, verify_store
from connector.policies import bucket_policy, iam_policy, is_kms_key_arn

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


def _run(config: Path | None, fn: Callable[[App], T], audit_load: bool = True) -> T:
    """Load the config, build the app, run `fn`; turn our errors into clear messages.

    Every config load is recorded in the audit log (with the file's SHA-256, so a
    changed config shows), unless `audit_load` is False.
    """
    try:
        cfg = load_config(config_path(config))
        configure(cfg.log.level, cfg.log.json_format, cfg.log.library_level)
        with build(cfg) as a:
            if audit_load:
                _audit_config_load(a)
            return fn(a)
    except (ConfigError, InvalidInputError) as exc:
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
        rows = a.servers.refresh()
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
        server = a.servers.resolve(vm)
        with (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} blocks"),
                TimeElapsedColumn(),
                console=err,
                disable=as_json,
            ) as progress,
            StateLock(a.config.state.path, "replicate"),
        ):
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
        server_id = a.servers.resolve(vm, refresh=False).id if vm else None
        rows = a.state.runs(server_id)
        if as_json:
            print(json.dumps([asdict(r) for r in rows], indent=2))
            return
        names = {s.id: s.name for s in a.state.servers()}
        progress = a.ledger.controls([r.id for r in rows if r.state in ("PENDING", "ACTIVE")])
        t = Table("run", "vm", "type", "state", "stage", "started", "finished", "read", "error")
        for r in rows:
            ctl = progress.get(r.id)
            t.add_row(
                r.id,
                names.get(r.server_id, r.server_id),
                r.type,
                r.state,
                f"{r.stage} {ctl.detail}".strip() if ctl else r.stage,
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
        server = a.servers.resolve(vm, refresh=False)
        if to.exists() and to.is_file():
            raise PermanentError(f"{to} already exists; remove it or choose another path")
        with (
            a.audited("restore", f"vm {server.vm_uuid}", run=run, disk=disk, target=str(to)) as rec,
            Progress(console=err, disable=as_json) as progress,
        ):
            repo = a.repository()
            task = progress.add_task(f"restore disk {disk}", total=None)
            res = restore_disk(
                repo,
                server.id,
                run,
                disk,
                to,
                lambda done, total: progress.update(task, completed=done, total=total),
            )
            rec["sha256"] = res.sha256
        result = {"path": str(res.path), "size": res.size, "sha256": res.sha256}
        if as_json:
            print(json.dumps(result))
        else:
            out.print(f"restored {_size(res.size)} to {res.path}\nsha256 {res.sha256}")
        return result

    _run(config, go)


@app.command()
def verify(
    vm: Annotated[str | None, typer.Argument(help="Only this VM (name or UUID).")] = None,
    run: Annotated[str | None, typer.Option("--run", help="Only this run.")] = None,
    deep: Annotated[
        bool,
        typer.Option("--deep", help="Also decrypt, decompress and re-hash every block."),
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check that every block each run needs is present and authenticates; exit 1 on a fault."""

    def go(a: App) -> VerifyReport:
        repo = a.repository()
        targets: dict[str, list[str] | None]
        if vm is not None:
            targets = {a.servers.resolve(vm, refresh=False).id: [run] if run else None}
        elif run is not None:
            targets = {_server_of_run(a, repo.scan_runs(), run): [run]}
        else:
            targets = dict.fromkeys(repo.scan_runs(), None)
        with Progress(console=err, disable=as_json) as progress:
            task = progress.add_task("verify" + (" --deep" if deep else ""), total=None)
            report = verify_store(
                repo,
                targets,
                deep=deep,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        names = {s.id: s.name for s in a.state.servers()}
        if as_json:
            doc = asdict(report)
            for f in doc["faults"]:
                f["vm"] = names.get(f["server_id"])
            print(json.dumps(doc, indent=2))
        else:
            _print_verify(report, names)
        return report

    if not _run(config, go).ok:
        raise typer.Exit(1)


def _server_of_run(a: App, scan: dict[str, Any], run_id: str) -> str:
    for server_id, runs in scan.items():
        if run_id in runs:
            return str(server_id)
    try:
        return a.state.run(run_id).server_id
    except ConnectorError:
        raise PermanentError(
            f"run {run_id} is not in the store; list runs with `connector runs`"
        ) from None


def _print_verify(report: VerifyReport, names: dict[str, str]) -> None:
    if report.faults:
        t = Table("vm", "run", "disk", "block", "pack", "fault")
        for f in report.faults:
            t.add_row(
                names.get(f.server_id, f.server_id),
                f.run_id,
                "" if f.disk_key is None else str(f.disk_key),
                "" if f.block is None else str(f.block),
                (f.pack_id or "")[:16],
                f.reason,
            )
        out.print(t)
    kind = "deep " if report.deep else ""
    out.print(
        f"{kind}verify: {report.runs} runs, {report.disks} disks, {report.blocks} blocks "
        f"({report.blobs} stored blobs, {_size(report.bytes_read)} read): "
        + (
            f"[red]{len(report.faults)} faults[/red]"
            if report.faults
            else "[green]no faults[/green]"
        ),
        highlight=False,
    )
    for f in report.faults:
        where = f"disk {f.disk_key}" if f.disk_key is not None else "run record"
        block = f" block {f.block}" if f.block is not None else ""
        vm = names.get(f.server_id, f.server_id)
        err.print(f"fault: {vm} run {f.run_id} {where}{block}: {f.reason}", highlight=False)


@app.command()
def retention(
    vm: Annotated[str | None, typer.Argument(help="VM name or instance UUID.")] = None,
    keep: Annotated[
        int | None, typer.Argument(help="Runs to keep (0 keeps all); omit to show.", min=0)
    ] = None,
    reset: Annotated[
        bool, typer.Option("--reset", help="Drop the VM's own setting: use [retention] keep.")
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show or set how many recent runs of a VM `connector purge` keeps."""

    def go(a: App) -> None:
        if vm is not None and (keep is not None or reset):
            server = a.servers.resolve(vm, refresh=False)
            a.state.set_retention(server.id, None if reset else keep)
        servers = a.state.servers()
        if vm is not None:
            servers = [a.servers.resolve(vm, refresh=False)]
        own = a.state.retention_settings()
        default = a.config.retention.keep
        rows = [
            {
                "vm": s.name,
                "server_id": s.id,
                "keep": own.get(s.id, default),
                "source": "vm" if s.id in own else "default",
            }
            for s in servers
        ]
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        t = Table("vm", "server", "keep", "from")
        for r in rows:
            t.add_row(
                str(r["vm"]),
                str(r["server_id"]),
                "all" if r["keep"] == 0 else str(r["keep"]),
                "this VM" if r["source"] == "vm" else "[retention] keep",
            )
        out.print(t)

    _run(config, go)


def _audit_config_load(a: App) -> None:
    source = a.config.source
    digest = hashlib.sha256(source.read_bytes()).hexdigest() if source else None
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    a.audit.record("config.load", str(source), SUCCESS, sha256=digest, command=command)


# ------------------------------------------------------------------- audit log

audit_app = typer.Typer(no_args_is_help=True, help="The append-only audit log.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Audit log to check (default: the configured one)."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Check the hash chain; name the first line that was changed or removed."""

    def check(path: Path) -> None:
        result = verify_audit(path)
        if result.ok:
            out.print(f"{path}: {result.records} records, chain intact")
            return
        for problem in result.problems:
            err.print(f"[red]broken:[/red] {problem}", highlight=False, soft_wrap=True)
        err.print(f"{path}: the chain breaks at line {result.first_bad_line}", highlight=False)
        raise typer.Exit(1)

    if file is not None:
        try:
            check(file)
        except ConfigError as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        return
    _run(config, lambda a: check(a.config.audit_path), audit_load=False)


# -------------------------------------------------------------- policies, check


@app.command("bucket-policy")
def bucket_policy_cmd(config: ConfigOpt = None) -> None:
    """Print a policy for the staging bucket that denies plain HTTP, old TLS and unencrypted puts.

    The three denials: requests without TLS (aws:SecureTransport), TLS below 1.2
    (s3:TlsVersion), and PutObject without the configured server-side encryption.
    """

    def go(a: App) -> None:
        s3 = a.config.s3
        if s3.sse == "aws:kms" and s3.kms_key_id and not is_kms_key_arn(s3.kms_key_id):
            err.print(
                "note: kms_key_id is not a key ARN, so the policy cannot pin the KMS key; "
                "it still requires aws:kms",
                highlight=False,
            )
        policy = bucket_policy(s3.bucket, s3.region, s3.sse, s3.kms_key_id)
        print(json.dumps(policy, indent=2))

    _run(config, go, audit_load=False)


@app.command("iam-policy")
def iam_policy_cmd(
    config: ConfigOpt = None,
    landing: Annotated[
        bool, typer.Option("--landing", help="Add the EBS and EC2 actions of the landing stage.")
    ] = False,
) -> None:
    """Print the least-privilege IAM policy for the connector's AWS credentials."""

    def go(a: App) -> None:
        s3 = a.config.s3
        kms = s3.kms_key_id if s3.sse == "aws:kms" and is_kms_key_arn(s3.kms_key_id) else None
        policy = iam_policy(s3.bucket, s3.prefix, s3.region, kms, landing=landing)
        print(json.dumps(policy, indent=2))

    _run(config, go, audit_load=False)


@app.command("check")
def check_cmd(
    config: ConfigOpt = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only this check (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a live setup and name every missing permission.

    Secrets, vCenter (TLS, login, privileges), S3 (permissions, encryption), the
    audit log.
    """

    def go(a: App) -> int:
        try:
            results = run_checks(a, only or ())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if as_json:
            print(json.dumps([asdict(r) for r in results], indent=2))
        else:
            marks = {"ok": "[green]ok[/green]", "failed": "[red]FAILED[/red]", "skipped": "skipped"}
            for r in results:
                out.print(f"{marks[r.status]:>8}  {r.name}: {r.summary}", highlight=False)
                for line in r.details:
                    out.print(f"            {line}", highlight=False, soft_wrap=True)
        return sum(r.status == "failed" for r in results)

    if _run(config, go):
        raise typer.Exit(1)


@app.command("api")
def api_cmd(config: ConfigOpt = None) -> None:
    """Serve the HTTPS API (the config's api section) until SIGTERM or Ctrl-C."""

    def go(a: App) -> None:
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        server = a.api_server().start()
        a.audit.record("api.start", server.url, SUCCESS)
        err.print(f"serving the API on {server.url}", highlight=False)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
            signal.signal(signal.SIGTERM, previous)
            a.audit.record("api.stop", server.url, SUCCESS)

    _run(config, go)


@app.command()
def purge(
    vm: Annotated[str | None, typer.Argument(help="Only this VM (name or UUID).")] = None,
    keep: Annotated[
        int | None,
        typer.Option("--keep", min=0, help="Keep this many recent runs (0: all) this time."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be deleted; delete nothing.")
    ] = False,
    break_stale_locks: Annotated[
        bool,
        typer.Option(
            "--break-stale-locks",
            help="Remove locks of runs whose process is gone, that ended, or that are too old.",
        ),
    ] = False,
    remove_vm: Annotated[
        bool,
        typer.Option("--remove-server", help="Delete every run of VM (a VM or job that is gone)."),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm --remove-server.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply retention, then delete the packs that no kept run references."""

    def go(a: App) -> dict[str, Any]:
        settings = a.retention.settings(dry_run=dry_run, break_stale_locks=break_stale_locks)
        if remove_vm and vm is None:
            raise PermanentError("--remove-server needs the VM whose runs to delete")
        if remove_vm and not (yes or dry_run):
            raise PermanentError(
                "--remove-server deletes every run of the VM from the store; add --yes to "
                "confirm (or --dry-run to see what would go)"
            )
        repo = a.repository()
        with a.retention.guard():
            if remove_vm:
                assert vm is not None
                server = a.servers.resolve(vm, refresh=False)
                results = [remove_server(repo, a.state, server.id, dry_run=dry_run)]
                exclude = {(server.id, r) for r in results[0].deleted}
                gc = collect_garbage(repo, a.state, settings, exclude_runs=exclude)
            else:
                if vm is not None:
                    ids = {a.servers.resolve(vm, refresh=False).id}
                else:
                    known = {s.id for s in a.state.servers()}
                    ids = known & set(repo.scan_runs())
                policies = a.retention.policies(ids)
                if keep is not None:
                    policies = dict.fromkeys(policies, keep)
                report = purge_store(repo, a.state, policies, settings)
                results, gc = report.retention, report.gc
        names = {s.id: s.name for s in a.state.servers()}
        doc = {"dry_run": dry_run, "retention": [asdict(r) for r in results], "gc": asdict(gc)}
        if as_json:
            print(json.dumps(doc, indent=2))
        else:
            _print_purge(results, gc, names)
        return doc

    _run(config, go)


def _print_purge(results: list[RetentionResult], gc: GcResult, names: dict[str, str]) -> None:
    would = "would " if gc.dry_run else ""
    for r in results:
        vm = names.get(r.server_id, r.server_id)
        policy = "all" if r.keep == 0 else str(r.keep)
        out.print(
            f"{vm}: keep {policy}; {len(r.kept)} runs kept, {would}delete {len(r.deleted)} runs "
            f"and {r.manifests_deleted} manifests",
            highlight=False,
        )
        for run_id in r.deleted:
            out.print(f"  {would}delete run {run_id}", highlight=False)
        for run_id, why in sorted(r.protected.items()):
            out.print(f"  keep run {run_id}: {why}", highlight=False)
        for run_id, needers in sorted(r.bases.items()):
            out.print(
                f"  keep the manifests of run {run_id}: base of {', '.join(needers)}",
                highlight=False,
            )
    if gc.condemned:
        out.print(f"condemned {len(gc.condemned)} packs that no kept run references")
    out.print(
        f"{would}delete {len(gc.deleted)} packs ({_size(gc.bytes_freed)})"
        + (f"; kept {len(gc.restored)} that a run came to use" if gc.restored else ""),
        highlight=False,
    )
    for p in gc.pending:
        out.print(
            f"purge {p.purge_id}: {p.packs} condemned packs wait for the end of "
            f"{', '.join(p.waiting_for)}; run purge again later",
            highlight=False,
        )
    for lock in gc.locks:
        if lock.removed:
            out.print(f"removed the stale lock of run {lock.run_id}: {lock.stale}", highlight=False)
        elif lock.stale:
            out.print(
                f"[yellow]stale lock[/yellow] of run {lock.run_id}: {lock.stale}; remove it with "
                "--break-stale-locks if no such run is alive",
                highlight=False,
            )
    for fault in gc.faults:
        err.print(f"fault: {fault}", highlight=False)


@app.command("health")
def health_cmd(config: ConfigOpt = None) -> None:
    """Exit 0 when the local HTTPS API answers /healthz (the container health check)."""

    def go(a: App) -> None:
        if a.config.api is None:
            raise ConfigError("the API is not configured (no api section): nothing to check")
        try:
            status = probe_health(a.config.api)
        except (OSError, ValueError) as exc:
            raise UnreachableError(
                f"the API at {a.config.api.listen} does not answer: {exc}"
            ) from None
        if status != "ok":
            raise PermanentError(f"the API at {a.config.api.listen} reports {status!r}")
        out.print("ok")

    _run(config, go, audit_load=False)


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


# `connector run` and `connector jobs ...` live in connector/daemon/cli.py.
from connector.daemon.cli import jobs_app, run_command  # noqa: E402

app.command("run")(run_command)
app.add_typer(jobs_app, name="jobs")
