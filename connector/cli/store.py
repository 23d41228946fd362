"""`connector verify`, `retention` and `purge`: the replica store's health and trimming."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from connector.cli.common import (
    LATEST,
    ConfigOpt,
    JsonOpt,
    err,
    human_size,
    id_table,
    out,
    run_of,
    run_with_app,
)
from connector.cli.progress import OperationProgress, counted
from connector.domain.ids import check_keep, check_run_id
from connector.errors import ConnectorError, InvalidInputError, PermanentError
from connector.pipeline.purge import (
    GcResult,
    RetentionResult,
    collect_garbage,
    remove_server,
)
from connector.pipeline.purge import (
    drop_run as drop_one_run,
)
from connector.pipeline.purge import (
    purge as purge_store,
)
from connector.pipeline.verify import VerifyReport, verify_store

if TYPE_CHECKING:
    from connector.app import App


def verify(
    vm: Annotated[str | None, typer.Argument(help="Only this VM (name or UUID).")] = None,
    run: Annotated[
        str | None,
        typer.Option("--run", help="Only this run; latest: the VM's last COMPLETED run."),
    ] = None,
    deep: Annotated[
        bool,
        typer.Option("--deep", help="Also decrypt, decompress and re-hash every block."),
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check that every block each run needs is present and authenticates; exit 1 on a fault."""

    def go(a: App) -> VerifyReport:
        if run is not None and run != LATEST:
            check_run_id(run)
        if run == LATEST and vm is None:
            raise InvalidInputError("--run latest needs the VM: connector verify VM --run latest")
        targets: dict[str, list[str] | None]
        if vm is not None:
            server_id = a.servers.resolve(vm, refresh=False).id
            targets = {server_id: [run_of(a, server_id, vm, run)] if run else None}
        repo = a.repository()
        if vm is None and run is not None:
            targets = {_server_of_run(a, repo.scan_runs(), run): [run]}
        elif vm is None:
            targets = dict.fromkeys(repo.scan_runs(), None)
        with OperationProgress(err, plain=as_json) as display:
            report = verify_store(
                repo,
                targets,
                deep=deep,
                progress=display.task("verify", "verify" + (" --deep" if deep else "")),
            )
        display.summary(
            f"{'deep ' if deep else ''}verified {counted(report.runs, 'run')}: read",
            report.bytes_read,
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

    if not run_with_app(config, go, state_from_store=True).ok:
        raise typer.Exit(1)


def _server_of_run(a: App, scan: dict[str, Any], run_id: str) -> str:
    """The server a run belongs to: from the store's scan, else from the state database."""
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
    """A table of the faults and a summary on stdout; one line per fault on stderr."""
    if report.faults:
        t = id_table("vm", "run", "disk", "block", "pack", "fault", ids={"run"})
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
        f"({report.blobs} stored blobs, {human_size(report.bytes_read)} read): "
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


def retention(
    vm: Annotated[str | None, typer.Argument(help="VM name or instance UUID.")] = None,
    keep: Annotated[
        int | None, typer.Argument(help="Runs to keep (0 keeps all); omit to show.")
    ] = None,
    reset: Annotated[
        bool, typer.Option("--reset", help="Drop the VM's own setting: use [retention] keep.")
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show or set how many recent runs of a VM `connector purge` keeps."""

    def go(a: App) -> None:
        if keep is not None:
            check_keep(keep)
        if vm is not None and (keep is not None or reset):
            server = a.servers.resolve(vm, refresh=False)
            a.state.set_retention(server.id, None if reset else keep)
            job = a.jobs.for_server(server.id)
            if job is not None:  # its job shows the same number (one setting per VM)
                a.jobs.update(job.id, retention=a.retention.keep_for(server.id)[0])
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
        t = id_table("vm", "server", "keep", "from", ids={"server"})
        for r in rows:
            t.add_row(
                str(r["vm"]),
                str(r["server_id"]),
                "all" if r["keep"] == 0 else str(r["keep"]),
                "this VM" if r["source"] == "vm" else escape("[retention] keep"),
            )
        out.print(t)

    run_with_app(config, go, state_from_store=True)


def purge(
    vm: Annotated[str | None, typer.Argument(help="Only this VM (name or UUID).")] = None,
    keep: Annotated[
        int | None,
        typer.Option("--keep", help="Keep this many recent runs (0: all) this time."),
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
    drop_run: Annotated[
        str | None,
        typer.Option(
            "--drop-run",
            metavar="RUN",
            help="Delete this committed run first (one whose manifest is lost or damaged); "
            "latest: the VM's last COMPLETED run.",
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm --remove-server or --drop-run.")
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply retention, then delete the packs that no kept run references."""

    def go(a: App) -> dict[str, Any]:
        if keep is not None:
            check_keep(keep, "--keep")
        settings = a.retention.settings(dry_run=dry_run, break_stale_locks=break_stale_locks)
        if remove_vm and vm is None:
            raise PermanentError("--remove-server needs the VM whose runs to delete")
        if remove_vm and not (yes or dry_run):
            raise PermanentError(
                "--remove-server deletes every run of the VM from the store; add --yes to "
                "confirm (or --dry-run to see what would go)"
            )
        drop = drop_run
        if drop == LATEST:
            if vm is None:
                raise InvalidInputError(
                    "--drop-run latest needs the VM: connector purge VM --drop-run latest --yes"
                )
            drop = run_of(a, a.servers.resolve(vm, refresh=False).id, vm, drop)
        if drop is not None and not (yes or dry_run):
            raise PermanentError(
                f"--drop-run deletes run {drop} from the store; add --yes to confirm "
                "(or --dry-run to see what would go)"
            )
        repo = a.repository()
        with a.retention.guard(), OperationProgress(err, plain=as_json) as display:
            progress = display.task("purge", "delete packs")
            dropped: list[RetentionResult] = []
            if drop is not None:
                server_id = _server_of_run(a, repo.scan_runs(), drop)
                dropped = [drop_one_run(repo, a.state, server_id, drop, dry_run=dry_run)]
            if remove_vm:
                assert vm is not None
                server = a.servers.resolve(vm, refresh=False)
                results = [remove_server(repo, a.state, server.id, dry_run=dry_run)]
                exclude = {(server.id, r) for r in results[0].deleted}
                gc = collect_garbage(
                    repo, a.state, settings, exclude_runs=exclude, progress=progress
                )
            else:
                if vm is not None:
                    ids = {a.servers.resolve(vm, refresh=False).id}
                else:
                    known = {s.id for s in a.state.servers()}
                    ids = known & set(repo.scan_runs())
                policies = a.retention.policies(ids)
                if keep is not None:
                    policies = dict.fromkeys(policies, keep)
                exclude = {(r.server_id, run) for r in dropped for run in r.deleted}
                report = purge_store(
                    repo, a.state, policies, settings, exclude_runs=exclude, progress=progress
                )
                results, gc = report.retention, report.gc
            results = dropped + results
        display.summary(
            f"purge: {'would delete' if dry_run else 'deleted'} "
            f"{counted(len(gc.deleted), 'pack')},",
            gc.bytes_freed,
        )
        names = {s.id: s.name for s in a.state.servers()}
        doc = {"dry_run": dry_run, "retention": [asdict(r) for r in results], "gc": asdict(gc)}
        if as_json:
            print(json.dumps(doc, indent=2))
        else:
            _print_purge(results, gc, names)
        return doc

    run_with_app(config, go, state_from_store=True)


def _print_purge(results: list[RetentionResult], gc: GcResult, names: dict[str, str]) -> None:
    """Per VM what retention keeps and deletes, then the packs, pending purges and locks."""
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
        f"{would}delete {len(gc.deleted)} packs ({human_size(gc.bytes_freed)})"
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
            out.print(
                f"removed the stale lock of run {lock.run_id}: {escape(lock.stale or '')}",
                highlight=False,
            )
        elif lock.stale:
            out.print(
                f"[yellow]stale lock[/yellow] of run {lock.run_id}: {escape(lock.stale)}; "
                "remove it with --break-stale-locks if no such run is alive",
                highlight=False,
            )
    for fault in gc.faults:
        err.print(f"fault: {fault}", highlight=False)
