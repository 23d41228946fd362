"""`connector jobs ...`: create, list, show, change, start, pause and delete replication jobs.

The commands work whether or not the daemon runs: they change the state
database (the daemon picks changes up within `[daemon] sync_interval`), and
`jobs start` puts the run in the durable queue, where the daemon finds it.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from connector.cli.common import ConfigOpt, JsonOpt, err, id_table, out, run_with_app
from connector.domain.jobs import (
    AUTOMATIC,
    DEFAULT_RETENTION,
    JOB_DELETED,
    JOB_DELETING,
    LIVE_RUN_STATES,
    ON_DEMAND,
    RUN_PENDING,
    SCHEDULED_STATES,
    JobRow,
    make_spec,
    next_run_time,
    on_demand_refusal,
    on_resume,
    parse_seed_time,
    validate_description,
    validate_frequency,
    validate_retention,
    validate_seed_time,
)
from connector.domain.records import RunRow, new_run_id
from connector.domain.times import iso
from connector.errors import InvalidInputError

if TYPE_CHECKING:
    from connector.app import App

jobs_app = typer.Typer(
    rich_markup_mode="markdown",
    no_args_is_help=True,
    help="Replication jobs: a VM, a seed time, a frequency (or once), a retention.",
)

JobArg = Annotated[str, typer.Argument(help="Job id, or the name or instance UUID of its VM.")]
FrequencyOpt = Annotated[
    int | None, typer.Option("--frequency", "-f", help="Hours between runs, 1 to 24.")
]
RunOnceOpt = Annotated[bool, typer.Option("--run-once", help="Run once, at the seed time.")]
SeedOpt = Annotated[
    str | None,
    typer.Option("--seed", help="First run, ISO 8601 (e.g. 2026-12-01T02:00:00Z) or 'now'."),
]
RetentionOpt = Annotated[
    int | None, typer.Option("--retention", "-r", help="How many recent runs to keep.")
]
DescriptionOpt = Annotated[str | None, typer.Option("--description", "-d", help="Free text.")]


def _now() -> dt.datetime:
    """Now in UTC, to the second (seed times and quotas are compared with it)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def job_document(a: App, job: JobRow, with_runs: bool = False) -> dict[str, Any]:
    """A job as `jobs show --json` prints it: its row, its VM, its next run, and its runs.

    A stored job with an invalid field has no next run and says why in `problem`
    (the daemon does not schedule it)."""
    server = a.state.server(job.server_id)
    problem = job.problem
    ran = a.jobs.count_runs(job.id, run_type=AUTOMATIC) > 0
    nxt = (
        next_run_time(
            job.seed, job.frequency_hours, _now(), ran, a.config.daemon.schedule_unit_seconds
        )
        if problem is None and not job.paused and job.state in SCHEDULED_STATES
        else None
    )
    doc: dict[str, Any] = asdict(job)
    doc.update(
        vm_name=server.name,
        vm_uuid=server.vm_uuid,
        run_once=job.run_once,
        next_run=iso(nxt) if nxt else None,
        problem=problem,
        retention_pending=_retention_pending(job),
    )
    if with_runs:
        doc["runs"] = _run_docs(a, a.jobs.runs_of(job.id))
    return doc


def _retention_pending(job: JobRow) -> dict[str, Any] | None:
    """The retention a completed run owes and has not had applied yet, or None."""
    if job.retention_due is None:
        return None
    return {
        "state": "failed" if job.retention_attempts else "pending",
        "since": job.retention_due,
        "attempts": job.retention_attempts,
        "next_try": job.retention_next_at,
        "error": job.retention_error,
    }


def _run_docs(a: App, rows: list[RunRow]) -> list[dict[str, Any]]:
    """Runs as JSON documents, with the job and the progress the ledger holds of each."""
    controls = a.ledger.controls([r.id for r in rows])
    docs = []
    for r in rows:
        doc = asdict(r)
        ctl = controls.get(r.id)
        doc["job_id"] = ctl.job_id if ctl else None
        doc["progress"] = (
            {
                "done": ctl.progress_done,
                "total": ctl.progress_total,
                "detail": ctl.detail,
                "attempts": ctl.attempts,
            }
            if ctl
            else None
        )
        docs.append(doc)
    return docs


def _print_jobs(a: App, rows: list[JobRow], as_json: bool) -> None:
    """Jobs as a table, or as a JSON list of job documents."""
    docs = [job_document(a, j) for j in rows]
    if as_json:
        print(json.dumps(docs, indent=2))
        _warn_problems(docs)
        return
    t = id_table(
        "job",
        "vm",
        "state",
        "every",
        "seed",
        "next run",
        "keep",
        "failures",
        "description",
        ids={"job"},
    )
    for d in docs:
        state = d["state"] + (" (paused)" if d["paused"] else "")
        if d["problem"]:
            state += " (invalid, not scheduled)"
        every = "once" if d["run_once"] else f"{d['frequency_hours']} h"
        t.add_row(
            d["id"],
            d["vm_name"],
            state,
            every,
            d["seed_time"],
            d["next_run"] or "",
            str(d["retention"]),
            str(d["consecutive_failures"]),
            d["description"],
        )
    out.print(t)
    _warn_problems(docs)


def _warn_problems(docs: list[dict[str, Any]]) -> None:
    """One line on stderr per job the daemon skips because a stored field is invalid."""
    for d in docs:
        if d["problem"]:
            err.print(
                f"[yellow]warning:[/yellow] job {d['id']} is not scheduled: {escape(d['problem'])}",
                highlight=False,
                soft_wrap=True,
            )


def _print_job(a: App, job: JobRow, as_json: bool) -> None:
    """One job and a table of its runs, or its job document with runs as JSON."""
    doc = job_document(a, job, with_runs=True)
    if as_json:
        print(json.dumps(doc, indent=2))
        _warn_problems([doc])
        return
    every = "once" if doc["run_once"] else f"every {doc['frequency_hours']} h"
    out.print(
        f"job {doc['id']}: VM {doc['vm_name']} ({doc['vm_uuid']})\n"
        f"  state {doc['state']}{' (paused)' if doc['paused'] else ''}; {every} from "
        f"{doc['seed_time']}; next run {doc['next_run'] or '-'}; keeps {doc['retention']} runs\n"
        f"  {doc['description']}\n  {doc['message']}",
        highlight=False,
    )
    owed = doc["retention_pending"]
    if owed is not None and owed["attempts"]:
        out.print(
            f"  [yellow]retention not applied[/yellow] since {owed['since']}: "
            f"{owed['attempts']} tries failed, the last with: {owed['error']}; "
            f"next try at {owed['next_try']} (while `connector run` runs)",
            highlight=False,
        )
    elif owed is not None:
        out.print(f"  retention pending since {owed['since']}", highlight=False)
    t = id_table(
        "run", "type", "state", "stage", "progress", "started", "finished", "error", ids={"run"}
    )
    for r in doc["runs"]:
        p = r["progress"] or {}
        progress = f"{p['done']}/{p['total']} blocks" if p.get("total") else ""
        if p.get("detail") and r["state"] in LIVE_RUN_STATES:
            progress = f"{progress} {p['detail']}".strip()
        t.add_row(
            r["id"],
            r["type"],
            r["state"],
            r["stage"],
            progress,
            r["started_at"],
            r["finished_at"] or "",
            r["error"] or "",
        )
    out.print(t)
    _warn_problems([doc])


def _frequency(frequency: int | None, run_once: bool) -> int | None:
    """The hours between runs from --frequency, or None for --run-once; exactly one is given."""
    if run_once and frequency is not None:
        raise InvalidInputError("give either --frequency or --run-once, not both")
    if not run_once and frequency is None:
        raise InvalidInputError("give --frequency HOURS (1 to 24), or --run-once")
    return None if run_once else validate_frequency(frequency)


@jobs_app.command("create")
def jobs_create(
    vm: Annotated[str, typer.Argument(help="VM name or instance UUID.")],
    frequency: FrequencyOpt = None,
    run_once: RunOnceOpt = False,
    seed: SeedOpt = None,
    retention: RetentionOpt = None,
    description: DescriptionOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a replication job for a VM."""

    def go(a: App) -> None:
        now = _now()
        spec = make_spec(
            parse_seed_time(seed or "now", now),
            _frequency(frequency, run_once),
            DEFAULT_RETENTION if retention is None else retention,
            description or "",
            now=now,
        )
        server = a.servers.resolve(vm)
        job = a.jobs.create(server.id, spec)
        if as_json:
            _print_job(a, job, as_json)
        else:
            _print_jobs(a, [job], False)

    run_with_app(config, go, state_from_store=True)


@jobs_app.command("list")
def jobs_list(
    include_deleted: Annotated[bool, typer.Option("--all", help="Deleted jobs too.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List replication jobs."""
    run_with_app(
        config,
        lambda a: _print_jobs(a, a.jobs.all(include_deleted), as_json),
        state_from_store=True,
    )


@jobs_app.command("show")
def jobs_show(job: JobArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show a job and its runs, with the stage and progress of a running one."""
    run_with_app(config, lambda a: _print_job(a, a.jobs.find(job), as_json), state_from_store=True)


@jobs_app.command("update")
def jobs_update(
    job: JobArg,
    frequency: FrequencyOpt = None,
    run_once: RunOnceOpt = False,
    seed: SeedOpt = None,
    retention: RetentionOpt = None,
    description: DescriptionOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a job's schedule, retention or description."""

    def go(a: App) -> None:
        values: dict[str, Any] = {}
        if run_once or frequency is not None:
            values["frequency_hours"] = _frequency(frequency, run_once)
        if seed is not None:
            now = _now()
            values["seed_time"] = iso(validate_seed_time(parse_seed_time(seed, now), now))
        if retention is not None:
            values["retention"] = validate_retention(retention)
        if description is not None:
            values["description"] = validate_description(description)
        if not values:
            raise InvalidInputError(
                "nothing to change: give --frequency/--run-once, --seed, --retention or "
                "--description"
            )
        row = a.jobs.find(job)
        _refuse_deleted(row)
        _print_job(a, a.jobs.update(row.id, **values), as_json)

    run_with_app(config, go, state_from_store=True)


@jobs_app.command("start")
def jobs_start(job: JobArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Start an on-demand run now (at most `on_demand_quota_per_24h` a day)."""

    def go(a: App) -> None:
        row = a.jobs.find(job)
        since = _now() - dt.timedelta(hours=24)
        refusal = on_demand_refusal(
            live_runs=len(a.jobs.live_runs(row.server_id)),
            on_demand_last_24h=a.jobs.on_demand_since(row.id, since),
            quota=a.config.daemon.on_demand_quota_per_24h,
            job_state=row.state,
        )
        if refusal:
            raise InvalidInputError(f"cannot start a run of job {row.id}: {refusal}")
        run_id = new_run_id()
        a.jobs.create_run(run_id, row, ON_DEMAND, RUN_PENDING)
        from connector.daemon.queue import RunQueue

        queue = RunQueue(a.queue_path)
        try:
            queue.enqueue(run_id, 0)
        finally:
            queue.close()
        if as_json:
            print(json.dumps({"run_id": run_id, "job_id": row.id, "state": RUN_PENDING}))
        else:
            out.print(
                f"run {run_id} queued; `connector run` executes it. Follow it with "
                f"`connector jobs show {row.id}`",
                highlight=False,
            )

    run_with_app(config, go, state_from_store=True)


@jobs_app.command("pause")
def jobs_pause(job: JobArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Stop scheduling runs of a job (a running run finishes)."""

    def go(a: App) -> None:
        row = a.jobs.find(job)
        _refuse_deleted(row)
        _print_job(a, a.jobs.update(row.id, paused=True), as_json)

    run_with_app(config, go, state_from_store=True)


@jobs_app.command("resume")
def jobs_resume(job: JobArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Put a paused job (by `pause`, or PAUSED_ON_FAILURE) back on its schedule."""

    def go(a: App) -> None:
        row = a.jobs.find(job)
        status = on_resume(row.status, a.jobs.has_completed_run(row.id))
        a.jobs.set_status(row.id, status)
        _print_job(a, a.jobs.update(row.id, paused=False), as_json)

    run_with_app(config, go, state_from_store=True)


@jobs_app.command("delete")
def jobs_delete(job: JobArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Delete a job: no more runs; an active run is stopped and rolled back.

    Replicas already in the store are kept (retention and purge remove them).
    """

    def go(a: App) -> None:
        row = a.jobs.find(job)
        _refuse_deleted(row)
        live = a.jobs.live_runs(row.server_id)
        state = JOB_DELETING if live else JOB_DELETED
        message = "deleting: waiting for the active run to stop" if live else "deleted"
        _print_job(a, a.jobs.update(row.id, state=state, message=message), as_json)

    run_with_app(config, go, state_from_store=True)


def _refuse_deleted(job: JobRow) -> None:
    """Refuse to change a job that is deleted or being deleted."""
    if job.state in (JOB_DELETING, JOB_DELETED):
        raise InvalidInputError(f"job {job.id} is {job.state}; create a new job for the VM")
