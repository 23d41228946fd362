"""`connector jobs ...`: create, list, show, change, start, pause and delete replication jobs.

The commands work whether or not the daemon runs: they change the state
database (the daemon picks changes up within `[daemon] sync_interval`), and
`jobs start` puts the run in the durable queue, where the daemon finds it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from connector.application.jobs import refuse_deleted
from connector.cli.common import ConfigOpt, JsonOpt, err, human_size, id_table, out, run_with_app
from connector.domain.jobs import LIVE_RUN_STATES, JobRow, validate_frequency
from connector.domain.landing import LandingSpec
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
    int | None,
    typer.Option(
        "--retention",
        "-r",
        help="Runs of the VM to keep (0: all); the VM's retention setting, as `connector "
        "retention VM N` sets it. Default: the VM's setting, else [retention] keep.",
    ),
]
DescriptionOpt = Annotated[str | None, typer.Option("--description", "-d", help="Free text.")]
LandOpt = Annotated[
    str | None,
    typer.Option("--land", help="Land runs in AWS as AMIs: every, on-demand or never."),
]
LicenseOpt = Annotated[
    str | None, typer.Option("--license-type", help="The AMIs' license type: AWS or BYOL.")
]
EncryptedOpt = Annotated[
    bool | None,
    typer.Option("--encrypted/--no-encrypted", help="Encrypt the landed EBS snapshots."),
]
KmsOpt = Annotated[
    str | None, typer.Option("--kms-key-id", help="KMS key of the snapshots ('' : the default).")
]
RoleOpt = Annotated[
    str | None, typer.Option("--role-name", help="IAM role to land as ('' : none).")
]
KeepAmisOpt = Annotated[
    int | None, typer.Option("--keep-amis", help="How many recent AMIs to keep (1 to 100).")
]
StagingOpt = Annotated[
    str | None,
    typer.Option("--staging", help="temporary (keep only what the next landing needs) or replica."),
]


def _landing(
    base: LandingSpec,
    land: str | None,
    license_type: str | None,
    encrypted: bool | None,
    kms_key_id: str | None,
    role_name: str | None,
    keep_amis: int | None,
    staging: str | None,
) -> LandingSpec | None:
    """The job's landing settings with the options given over `base`; None when none is."""
    given: dict[str, Any] = {
        "mode": land,
        "license_type": license_type.upper() if license_type else None,
        "encrypted": encrypted,
        "kms_key_id": kms_key_id,
        "role_name": role_name,
        "keep_amis": keep_amis,
        "staging": staging,
    }
    changes = {k: v for k, v in given.items() if v is not None}
    if not changes:
        return None
    for k in ("kms_key_id", "role_name"):
        if changes.get(k) == "":
            changes[k] = None
    if changes.get("encrypted") is False and "kms_key_id" not in changes:
        changes["kms_key_id"] = None
    return replace(base, **changes)


def job_document(a: App, job: JobRow, with_runs: bool = False) -> dict[str, Any]:
    """A job as `jobs show --json` prints it (the API returns the same document), with
    its landing settings."""
    doc = a.job_actions.document(job, with_runs)
    doc["landing"] = a.landing_spec(job.server_id).to_json()
    return doc


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
            str(d["retention"] or "all"),
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
    quota = doc["on_demand"]
    out.print(
        f"job {doc['id']}: VM {doc['vm_name']} ({doc['vm_uuid']})\n"
        f"  state {doc['state']}{' (paused)' if doc['paused'] else ''}; {every} from "
        f"{doc['seed_time']}; next run {doc['next_run'] or '-'}; "
        f"keeps {doc['retention'] or 'all'} runs\n"
        f"  on-demand runs: {quota['left']} of {quota['quota']} left in the last 24 h "
        "(\\[daemon] on_demand_quota_per_24h)\n"
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
        progress = f"{human_size(p['done'])}/{human_size(p['total'])}" if p.get("total") else ""
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
    land: LandOpt = None,
    license_type: LicenseOpt = None,
    encrypted: EncryptedOpt = None,
    kms_key_id: KmsOpt = None,
    role_name: RoleOpt = None,
    keep_amis: KeepAmisOpt = None,
    staging: StagingOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a replication job for a VM (landing settings default to [landing]'s)."""

    def go(a: App) -> None:
        # The landing options are checked before the job exists: a refused one makes none.
        landing = _landing(
            a.default_landing_spec(),
            land,
            license_type,
            encrypted,
            kms_key_id,
            role_name,
            keep_amis,
            staging,
        )
        job = a.job_actions.create(
            vm,
            frequency_hours=_frequency(frequency, run_once),
            seed=seed,
            retention=retention,
            description=description,
        )
        if landing is not None:
            job = a.jobs.set_landing(job.id, landing)
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
        lambda a: _print_jobs(a, a.job_actions.all(include_deleted), as_json),
        state_from_store=True,
    )


@jobs_app.command("show")
def jobs_show(job: JobArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show a job and its runs, with the stage and progress of a running one."""
    run_with_app(
        config, lambda a: _print_job(a, a.job_actions.find(job), as_json), state_from_store=True
    )


@jobs_app.command("update")
def jobs_update(
    job: JobArg,
    frequency: FrequencyOpt = None,
    run_once: RunOnceOpt = False,
    seed: SeedOpt = None,
    retention: RetentionOpt = None,
    description: DescriptionOpt = None,
    land: LandOpt = None,
    license_type: LicenseOpt = None,
    encrypted: EncryptedOpt = None,
    kms_key_id: KmsOpt = None,
    role_name: RoleOpt = None,
    keep_amis: KeepAmisOpt = None,
    staging: StagingOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a job's schedule, retention, description or landing settings."""

    def go(a: App) -> None:
        changes: dict[str, Any] = {}
        if run_once or frequency is not None:
            changes["frequency_hours"] = _frequency(frequency, run_once)
        row = a.job_actions.find(job)
        landing = _landing(
            a.landing_spec(row.server_id),
            land,
            license_type,
            encrypted,
            kms_key_id,
            role_name,
            keep_amis,
            staging,
        )
        others = seed is not None or retention is not None or description is not None
        if not others and not changes and landing is None:
            raise InvalidInputError(
                "nothing to change: give --frequency/--run-once, --seed, --retention, "
                "--description or a landing option (--land, --keep-amis, --staging, ...)"
            )
        refuse_deleted(row)
        if others or changes:
            row = a.job_actions.update(
                row.id, seed=seed, retention=retention, description=description, **changes
            )
        if landing is not None:
            row = a.jobs.set_landing(row.id, landing)
        _print_job(a, row, as_json)

    run_with_app(config, go, state_from_store=True)


@jobs_app.command("start")
def jobs_start(job: JobArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Start an on-demand run now (at most `on_demand_quota_per_24h` a day)."""

    def go(a: App) -> None:
        started = a.job_actions.start(job)
        if as_json:
            print(json.dumps(asdict(started)))
        else:
            out.print(
                f"run {started.run_id} queued; `connector run` executes it. Follow it with "
                f"`connector jobs show {started.job_id}`",
                highlight=False,
            )

    run_with_app(config, go, state_from_store=True)


@jobs_app.command("pause")
def jobs_pause(job: JobArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Stop scheduling runs of a job (a running run finishes)."""

    def go(a: App) -> None:
        _print_job(a, a.job_actions.pause(job), as_json)

    run_with_app(config, go, state_from_store=True)


@jobs_app.command("resume")
def jobs_resume(job: JobArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Put a paused job (by `pause`, or PAUSED_ON_FAILURE) back on its schedule."""

    def go(a: App) -> None:
        _print_job(a, a.job_actions.resume(job), as_json)

    run_with_app(config, go, state_from_store=True)


@jobs_app.command("delete")
def jobs_delete(job: JobArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Delete a job: no more runs; an active run is stopped and rolled back.

    Replicas already in the store are kept (retention and purge remove them).
    """

    def go(a: App) -> None:
        _print_job(a, a.job_actions.delete(job), as_json)

    run_with_app(config, go, state_from_store=True)
