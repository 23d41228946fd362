"""`connector land`: land a committed run in AWS now, in the foreground, with progress.

The run's disks become EBS snapshots (only the blocks that changed since the last
landed run) and one AMI; then AMI retention and, in temporary staging mode, the
release of the staging data the next incremental no longer needs (docs/landing.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from connector.cli.common import LATEST, ConfigOpt, JsonOpt, err, out, run_of, run_with_app
from connector.daemon.lock import StateLock
from connector.domain.jobs import RUN_COMPLETED
from connector.errors import PermanentError
from connector.pipeline.context import RunRef
from connector.pipeline.land import land as land_run
from connector.pipeline.land import release_staging

if TYPE_CHECKING:
    from connector.app import App


class LandReporter:
    """Stage lines and one progress bar per disk (blocks considered of the disk)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[int, TaskID] = {}

    def stage(self, run_id: str, stage: str, detail: str = "") -> None:
        self.progress.console.print(f"[bold]{stage}[/bold] {detail}", highlight=False)

    def disk_progress(self, run_id: str, disk_key: int, done: int, total: int) -> None:
        if disk_key not in self.tasks:
            self.tasks[disk_key] = self.progress.add_task(f"disk {disk_key}", total=total)
        self.progress.update(self.tasks[disk_key], completed=done, total=total)


def land(
    vm: Annotated[str, typer.Argument(help="VM name or instance UUID.")],
    run: Annotated[
        str, typer.Option("--run", help="The run to land (default: latest COMPLETED).")
    ] = LATEST,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Land one committed run of VM in AWS as EBS snapshots and an AMI, now.

    Landing a run again finishes what an interrupted landing left, and changes
    nothing once it is landed.
    """

    def go(a: App) -> None:
        server = a.servers.resolve(vm)
        run_id = run_of(a, server.id, vm, run)
        row = a.state.run(run_id)
        if row.server_id != server.id:
            raise PermanentError(
                f"run {run_id} is not a run of {vm}; list them with `connector runs {vm}`"
            )
        if row.state != RUN_COMPLETED:
            raise PermanentError(f"run {run_id} is {row.state}: only a COMPLETED run can be landed")
        spec = a.landing_spec(server.id)
        with (
            Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} blocks"),
                TimeElapsedColumn(),
                console=err,
                disable=as_json,
            ) as progress,
            StateLock(a.config.state.path, "land"),
        ):
            ctx = a.stage_context(LandReporter(progress))
            ref = RunRef(run_id, server.id, server.vm_uuid)
            landed = land_run(ctx, a.lander, ref, spec)
            release_staging(ctx, ref)
        if as_json:
            print(json.dumps(asdict(landed), indent=2))
            return
        out.print(f"run {run_id} landed: AMI {landed.image_id}")
        for d in landed.disks:
            out.print(
                f"  disk {d.disk_key}: snapshot {d.snapshot_id} ({d.blocks_sent} blocks sent)"
            )

    run_with_app(config, go, state_from_store=True)
