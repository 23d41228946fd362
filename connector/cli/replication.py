"""`connector replicate`, `runs` and `restore`: runs in the foreground, their history.

`replicate` and `restore` show their progress on stderr (`connector.cli.progress`:
bars with bytes, rate and ETA per disk on a terminal, log lines elsewhere) and a
summary with the duration and the throughput; their result goes to stdout.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
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
    print_error,
    run_of,
    run_with_app,
)
from connector.cli.progress import OperationProgress, counted
from connector.cli.signals import StopOnSignals
from connector.domain.ids import check_disk_key, check_run_id
from connector.domain.jobs import LIVE_RUN_STATES, RUN_STATES
from connector.domain.landing import LandingRow
from connector.domain.records import RunRow
from connector.errors import InvalidInputError, PermanentError

if TYPE_CHECKING:
    from connector.app import App
    from connector.pipeline.replicate import RunStopped

MAX_LAST = 10000


def replicate(
    vm: Annotated[str, typer.Argument(help="VM name or instance UUID.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run one replication of VM now, in the foreground.

    SIGTERM, SIGINT or SIGHUP stops the run at a safe point and rolls it back
    (snapshot removed, FAILED with the signal as its reason); the command then
    exits with 128 + the signal's number.
    """

    def go(a: App) -> None:
        from connector.daemon.lock import StateLock
        from connector.pipeline.replicate import RunStopped

        server = a.servers.resolve(vm)
        with (
            StopOnSignals() as stop,
            OperationProgress(err, plain=as_json) as display,
            StateLock(a.config.state.path, "replicate"),
        ):
            replicator = a.replicator(display.reporter(), stop, lambda: stop.reason)
            try:
                run = replicator.replicate(server.vm_uuid)
            except RunStopped as exc:
                _report_stop(exc, vm)
                raise typer.Exit(stop.exit_code) from None
        stored = sum(d.bytes_uploaded for d in run.disks)
        display.summary(
            f"replicated {vm} ({counted(len(run.disks), 'disk')}): read",
            sum(d.bytes_read for d in run.disks),
            f"; stored {human_size(stored)}",
        )
        if stop.received is not None:
            err.print(
                f"note: {stop.received.name} came after the run was committed; it completed",
                highlight=False,
            )
        if as_json:
            print(json.dumps(asdict(run), indent=2))
            return
        out.print(f"run {run.id} {run.state}")
        for d in run.disks:
            out.print(
                f"  disk {d.disk_key}: {d.mode} ({d.reason}); "
                f"changed {human_size(d.bytes_changed)}, read {human_size(d.bytes_read)}, "
                f"stored {human_size(d.bytes_uploaded)}, "
                f"{d.blocks_new} new blocks, {d.blocks_dedup} deduplicated"
            )

    run_with_app(config, go, state_from_store=True)


def _report_stop(exc: RunStopped, vm: str) -> None:
    """Say on stderr how the stopped run ended and what to do next."""
    print_error(
        PermanentError(
            f"run {exc.run.id} {exc.run.state}: {exc.run.error or exc.reason}"
            f"; replicate it again with `connector replicate {vm}`"
        )
    )


def runs(
    vm: Annotated[
        str | None,
        typer.Argument(help="Only this VM (name or UUID); or `show` and a run id: that run."),
    ] = None,
    run_id: Annotated[
        str | None, typer.Argument(help="With `show`: the run to show.", show_default=False)
    ] = None,
    last: Annotated[
        int | None,
        typer.Option("--last", metavar="N", help=f"Only the N most recent runs (1 to {MAX_LAST})."),
    ] = None,
    state: Annotated[
        str | None,
        typer.Option(
            "--state", metavar="STATE", help=f"Only runs in STATE: {', '.join(RUN_STATES)}."
        ),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show the history of replication runs, oldest first, with what each landed in AWS
    (snapshot ids, AMI id). `connector runs show RUN` shows one run."""

    def go(a: App) -> None:
        if vm == "show" and run_id is not None:
            _show_run(a, check_run_id(run_id), as_json)
            return
        if run_id is not None:
            raise InvalidInputError(f"unexpected argument {run_id!r}; to show a run: runs show RUN")
        if last is not None and not 1 <= last <= MAX_LAST:
            raise InvalidInputError(f"--last must be 1 to {MAX_LAST} runs, not {last}")
        wanted = state.upper() if state is not None else None
        if wanted is not None and wanted not in RUN_STATES:
            raise InvalidInputError(
                f"--state {state!r} is not a run state; use one of {', '.join(RUN_STATES)}"
            )
        server_id = a.servers.resolve(vm, refresh=False).id if vm else None
        rows = a.state.runs(server_id)
        if wanted is not None:
            rows = [r for r in rows if r.state == wanted]
        if last is not None:
            rows = rows[-last:]
        landed = {row.run_id: row for row in a.landings.landings(server_id)}
        if as_json:
            print(json.dumps([_run_doc(r, landed.get(r.id)) for r in rows], indent=2))
            return
        names = {s.id: s.name for s in a.state.servers()}
        progress = a.ledger.controls([r.id for r in rows if r.state in LIVE_RUN_STATES])
        t = id_table(
            "run",
            "vm",
            "type",
            "state",
            "stage",
            "started",
            "finished",
            "read",
            "ami",
            "error",
            ids={"run", "ami"},
        )
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
                human_size(sum(d.bytes_read for d in r.disks)),
                _ami(landed.get(r.id)),
                r.error or "",
            )
        out.print(t)

    run_with_app(config, go, state_from_store=True)


def _run_doc(run: RunRow, landing: LandingRow | None) -> dict[str, Any]:
    return {**asdict(run), "landing": asdict(landing) if landing is not None else None}


def _ami(landing: LandingRow | None) -> str:
    if landing is None:
        return ""
    if landing.state == "LANDED":
        return landing.image_id or ""
    return f"({landing.state.lower()})"


def _show_run(a: App, run_id: str, as_json: bool) -> None:
    run = a.state.run(run_id)
    landing = a.landings.landing(run_id)
    if as_json:
        print(json.dumps(_run_doc(run, landing), indent=2))
        return
    out.print(f"run {run.id} {run.state} (server {run.server_id}, {run.type})")
    out.print(f"  started {run.started_at}, finished {run.finished_at or '-'}")
    if run.error:
        out.print(f"  error: {escape(run.error)}")
    for d in run.disks:
        out.print(f"  disk {d.disk_key}: {d.mode}, read {human_size(d.bytes_read)}")
    if landing is None:
        out.print("  not landed in AWS")
        return
    out.print(f"  landing {landing.state}: AMI {landing.image_id or '-'}")
    for ld in landing.disks:
        out.print(f"    disk {ld.disk_key}: snapshot {ld.snapshot_id or '-'} ({ld.state})")
    if landing.error:
        out.print(f"  landing error: {escape(landing.error)}")


def restore(
    vm: Annotated[str, typer.Argument(help="VM name or instance UUID.")],
    run: Annotated[
        str,
        typer.Option(
            "--run", help="Run id (see `connector runs`), or latest: the last COMPLETED run."
        ),
    ],
    disk: Annotated[int, typer.Option("--disk", help="Disk device key, e.g. 2000.")],
    to: Annotated[
        Path | None,
        typer.Option("--to", help="New image file (a regular file; never a device node)."),
    ] = None,
    to_device: Annotated[
        Path | None,
        typer.Option(
            "--to-device",
            help="Block device to overwrite in place with the image (at least the disk's size).",
        ),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a raw image of one disk as it was at one run, checking every block."""

    def go(a: App) -> dict[str, Any]:
        from connector.pipeline.restore import check_target, restore_disk

        if (to is None) == (to_device is None):
            raise InvalidInputError(
                "give exactly one target: --to FILE for an image file, or --to-device DEVICE "
                "to overwrite a block device"
            )
        target = to if to is not None else to_device
        assert target is not None
        device = to_device is not None
        if run != LATEST:
            check_run_id(run)
        check_disk_key(disk)
        check_target(target, device)
        if not device and target.exists():
            raise InvalidInputError(f"{target} already exists; remove it or choose another path")
        server = a.servers.resolve(vm, refresh=False)
        run_id = run_of(a, server.id, vm, run)
        with (
            a.audited(
                "restore", f"vm {server.vm_uuid}", run=run_id, disk=disk, target=str(target)
            ) as rec,
            OperationProgress(err, plain=as_json) as display,
        ):
            repo = a.repository()
            res = restore_disk(
                repo,
                server.id,
                run_id,
                disk,
                target,
                display.task(disk, f"restore disk {disk}"),
                device=device,
            )
            rec["sha256"] = res.sha256
        display.summary(f"restored disk {disk} of {vm}: wrote", display.bytes_done)
        result = {"path": str(res.path), "size": res.size, "sha256": res.sha256, "run": run_id}
        if as_json:
            print(json.dumps(result))
        else:
            out.print(
                f"restored {human_size(res.size)} of run {run_id} to {res.path}\n"
                f"sha256 {res.sha256}",
                highlight=False,
            )
        return result

    run_with_app(config, go, state_from_store=True)
