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

from connector.cli.common import LATEST, ConfigOpt, JsonOpt, err, out, run_of, run_with_app
from connector.cli.progress import OperationProgress
from connector.daemon.lock import StateLock
from connector.domain.jobs import RUN_COMPLETED
from connector.domain.landing import EBS_BLOCK
from connector.errors import PermanentError
from connector.pipeline.context import RunRef
from connector.pipeline.land import land as land_run
from connector.pipeline.land import release_staging

if TYPE_CHECKING:
    from connector.app import App


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
            StateLock(a.config.state.path, "land"),
            OperationProgress(err, plain=as_json) as display,
        ):
            ctx = a.stage_context(display.reporter())
            ref = RunRef(run_id, server.id, server.vm_uuid)
            landed = land_run(ctx, a.lander, ref, spec)
            release_staging(ctx, ref)
        sent = sum(d.blocks_sent for d in landed.disks) * EBS_BLOCK
        display.summary(f"landed {vm} ({len(landed.disks)} disks): sent", sent)
        if as_json:
            print(json.dumps(asdict(landed), indent=2))
            return
        out.print(f"run {run_id} landed: AMI {landed.image_id}")
        for d in landed.disks:
            out.print(
                f"  disk {d.disk_key}: snapshot {d.snapshot_id} ({d.blocks_sent} blocks sent)"
            )

    run_with_app(config, go, state_from_store=True)
