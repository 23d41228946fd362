"""Replication jobs and runs: states, validation and transitions (pure rules, no I/O).

The vocabulary is the one users know from AWS Server Migration Service:
a job replicates one VM from a seed time, every 1 to 24 hours or once, keeps
the N most recent runs, and pauses itself after repeated failures.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, replace

from connector.domain.backoff import backoff_delay as backoff_delay  # the daemon's import
from connector.domain.landing import LandingSpec
from connector.domain.times import parse as parse_time
from connector.errors import InvalidInputError

# -- job states ------------------------------------------------------------------
JOB_PENDING = "PENDING"  # created, no run started yet
JOB_ACTIVE = "ACTIVE"  # runs on schedule; the last run did not fail
JOB_FAILING = "FAILING"  # the last run failed, fewer than the pause threshold in a row
JOB_FAILED = "FAILED"  # a run-once job whose run failed
JOB_PAUSED_ON_FAILURE = "PAUSED_ON_FAILURE"  # too many failures in a row; resume to go on
JOB_COMPLETED = "COMPLETED"  # a run-once job whose run completed
JOB_DELETING = "DELETING"  # delete asked; waits for its active run to stop
JOB_DELETED = "DELETED"

JOB_STATES = (
    JOB_PENDING,
    JOB_ACTIVE,
    JOB_FAILING,
    JOB_FAILED,
    JOB_PAUSED_ON_FAILURE,
    JOB_COMPLETED,
    JOB_DELETING,
    JOB_DELETED,
)
# States in which the schedule fires.
SCHEDULED_STATES = frozenset({JOB_PENDING, JOB_ACTIVE, JOB_FAILING})

# -- run states --------------------------------------------------------------------
RUN_PENDING = "PENDING"  # queued, waiting for a free slot
RUN_MISSED = "MISSED"  # the schedule fired while a run of the same VM was active
RUN_ACTIVE = "ACTIVE"
RUN_FAILED = "FAILED"
RUN_COMPLETED = "COMPLETED"
RUN_DELETING = "DELETING"  # beyond the job's retention; its data is due for purge
RUN_DELETED = "DELETED"

RUN_STATES = (
    RUN_PENDING,
    RUN_MISSED,
    RUN_ACTIVE,
    RUN_FAILED,
    RUN_COMPLETED,
    RUN_DELETING,
    RUN_DELETED,
)
LIVE_RUN_STATES = (RUN_PENDING, RUN_ACTIVE)

ON_DEMAND = "ON_DEMAND"
AUTOMATIC = "AUTOMATIC"

MIN_FREQUENCY_HOURS = 1
MAX_FREQUENCY_HOURS = 24
MAX_RETENTION = 1000
MAX_DESCRIPTION = 500
# A seed time is at most this far ahead (as AWS SMS allowed) ...
MAX_SEED_AHEAD = dt.timedelta(days=30)
# ... and at most this far back: a past seed sets the phase of the schedule and the
# first run is at once; one from years ago is a typing error.
MAX_SEED_BEHIND = dt.timedelta(days=365)
# No stored seed time is older than this, whenever it was written.
EARLIEST_SEED = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class JobSpec:
    """What a user sets on a job."""

    seed_time: dt.datetime  # first run, timezone-aware (UTC)
    frequency_hours: int | None  # None: run once
    retention: int
    description: str


def validate_frequency(value: int | None) -> int | None:
    if value is None:
        return None
    if not MIN_FREQUENCY_HOURS <= value <= MAX_FREQUENCY_HOURS:
        raise InvalidInputError(
            f"frequency {value} is out of range: give a whole number of hours from "
            f"{MIN_FREQUENCY_HOURS} to {MAX_FREQUENCY_HOURS}, or --run-once"
        )
    return value


def validate_retention(value: int) -> int:
    """Runs a job's VM keeps: 1 to MAX_RETENTION recent runs, or 0 for all of them."""
    if not 0 <= value <= MAX_RETENTION:
        raise InvalidInputError(
            f"retention {value} is out of range: keep from 1 to {MAX_RETENTION} recent runs, "
            "or 0 to keep all"
        )
    return value


def validate_description(value: str) -> str:
    if len(value) > MAX_DESCRIPTION:
        raise InvalidInputError(
            f"the description has {len(value)} characters; at most {MAX_DESCRIPTION} are allowed"
        )
    if any(ord(c) < 32 and c not in "\t" for c in value):
        raise InvalidInputError("the description must be one line of printable text")
    return value


def parse_seed_time(text: str, now: dt.datetime) -> dt.datetime:
    """An ISO 8601 time ('now' allowed); without a zone it is taken as UTC."""
    if text.strip().lower() == "now":
        return now
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputError(
            f"seed time {text!r} is not an ISO 8601 time; write e.g. 2026-12-01T02:00:00Z or 'now'"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise InvalidInputError(_seed_range_message(text.strip(), now)) from None


def validate_seed_time(value: dt.datetime, now: dt.datetime) -> dt.datetime:
    """A seed time given now: from a year before `now` to 30 days after it.

    A seed in the past sets the phase of the schedule (runs at the seed time plus
    whole periods) and the first run starts at once.
    """
    if value.tzinfo is None:
        raise InvalidInputError("the seed time needs a time zone; write e.g. 2026-12-01T02:00:00Z")
    if not now - MAX_SEED_BEHIND <= value <= now + MAX_SEED_AHEAD:
        raise InvalidInputError(_seed_range_message(_show(value), now))
    return value


def _seed_range_message(shown: str, now: dt.datetime) -> str:
    earliest = _show(now - MAX_SEED_BEHIND)
    latest = _show(now + MAX_SEED_AHEAD)
    return (
        f"seed time {shown} is out of range: give a time from {earliest} "
        f"(a year ago) to {latest} (30 days ahead), or 'now'"
    )


def _show(value: dt.datetime) -> str:
    utc = value.astimezone(dt.UTC).replace(tzinfo=None)
    return f"{utc.year:04d}-{utc.strftime('%m-%dT%H:%M:%S')}Z"


def make_spec(
    seed_time: dt.datetime,
    frequency_hours: int | None,
    retention: int,
    description: str,
    now: dt.datetime | None = None,
) -> JobSpec:
    """A job's settings, each checked (the seed time against `now`, default: the clock)."""
    return JobSpec(
        seed_time=validate_seed_time(seed_time, now or dt.datetime.now(dt.UTC)),
        frequency_hours=validate_frequency(frequency_hours),
        retention=validate_retention(retention),
        description=validate_description(description),
    )


@dataclass(frozen=True)
class JobStatus:
    """The part of a job that runs change."""

    state: str
    consecutive_failures: int
    message: str = ""


def on_run_started(status: JobStatus) -> JobStatus:
    if status.state == JOB_PENDING:
        return replace(status, state=JOB_ACTIVE)
    return status


def on_run_completed(status: JobStatus, run_once: bool) -> JobStatus:
    if status.state in (JOB_DELETING, JOB_DELETED):
        return replace(status, consecutive_failures=0)
    state = JOB_COMPLETED if run_once else JOB_ACTIVE
    return JobStatus(state, 0, "the last run completed")


def on_run_failed(
    status: JobStatus, run_once: bool, failures_before_pause: int, reason: str
) -> JobStatus:
    failures = status.consecutive_failures + 1
    if status.state in (JOB_DELETING, JOB_DELETED):
        return replace(status, consecutive_failures=failures)
    if failures >= failures_before_pause:
        return JobStatus(
            JOB_PAUSED_ON_FAILURE,
            failures,
            f"paused after {failures} failed runs in a row (last: {reason}); fix the cause, "
            "then `connector jobs resume`",
        )
    if run_once:
        return JobStatus(JOB_FAILED, failures, f"the run failed: {reason}")
    return JobStatus(JOB_FAILING, failures, f"{failures} failed run(s) in a row (last: {reason})")


def on_resume(status: JobStatus, has_completed_run: bool) -> JobStatus:
    """A resume request: a job paused on failure goes back on schedule."""
    if status.state in (JOB_DELETING, JOB_DELETED):
        raise InvalidInputError("the job is being deleted; create a new one")
    if status.state == JOB_PAUSED_ON_FAILURE:
        return JobStatus(JOB_ACTIVE if has_completed_run else JOB_PENDING, 0, "resumed")
    return status


def on_demand_refusal(
    live_runs: int, on_demand_last_24h: int, quota: int, job_state: str
) -> str | None:
    """Why an on-demand run cannot start now, or None when it can."""
    if job_state in (JOB_DELETING, JOB_DELETED):
        return "the job is being deleted"
    if live_runs:
        return "a run of this VM is already pending or active; wait for it to finish"
    if on_demand_last_24h >= quota:
        return (
            f"the on-demand quota is used up ({on_demand_last_24h} of {quota} in the last "
            "24 hours); wait, or raise [daemon] on_demand_quota_per_24h"
        )
    return None


def next_run_time(
    seed: dt.datetime,
    frequency_hours: int | None,
    now: dt.datetime,
    ran: bool,
    unit_seconds: float = 3600.0,
) -> dt.datetime | None:
    """When the schedule fires next: the seed time, then every `frequency_hours`
    after it (a seed in the past that never ran fires at once); None when a
    run-once job has had its run."""
    if frequency_hours is None:
        return None if ran else max(seed, now)
    if seed >= now:
        return seed
    if not ran:
        return now
    interval = dt.timedelta(seconds=frequency_hours * unit_seconds)
    elapsed = now - seed
    periods = -(-elapsed // interval)  # ceiling division of timedeltas
    return seed + periods * interval


@dataclass(frozen=True)
class JobRow:
    """A job as stored."""

    id: str
    server_id: str
    state: str
    paused: bool
    seed_time: str
    frequency_hours: int | None
    retention: int
    description: str
    consecutive_failures: int
    message: str
    created_at: str
    updated_at: str
    # Retention owed after a completed run (None: none owed), and its failed tries.
    retention_due: str | None = None
    retention_attempts: int = 0
    retention_next_at: str | None = None
    retention_error: str | None = None
    landing: str | None = None  # JSON of a LandingSpec; None: the [landing] defaults

    @property
    def landing_spec(self) -> LandingSpec | None:
        """The job's own landing settings, if it has any."""
        return None if self.landing is None else LandingSpec.from_json(json.loads(self.landing))

    @property
    def run_once(self) -> bool:
        return self.frequency_hours is None

    @property
    def seed(self) -> dt.datetime:
        return parse_time(self.seed_time)

    @property
    def status(self) -> JobStatus:
        return JobStatus(self.state, self.consecutive_failures, self.message)

    @property
    def problem(self) -> str | None:
        """Why this stored job cannot be scheduled (a row written by hand or by an
        older version), or None when every field is valid."""
        return stored_job_problem(self)


def stored_job_problem(job: JobRow) -> str | None:
    """What is wrong with a job as stored, or None.

    A stored seed time must be a UTC time from 1970 to 30 days after the row was
    last changed (every seed accepted by `validate_seed_time` stays valid).
    """
    fix = f"fix it with `connector jobs update {job.id} --seed now` or delete the job"
    try:
        seed = parse_time(job.seed_time)
    except (ValueError, TypeError, AttributeError):
        return f"its stored seed time {job.seed_time!r} is not a valid time; {fix}"
    try:
        changed = parse_time(job.updated_at)
    except (ValueError, TypeError, AttributeError):
        changed = None
    if seed.tzinfo is None:
        return f"its stored seed time {job.seed_time!r} has no time zone; {fix}"
    if seed < EARLIEST_SEED or (changed is not None and seed > changed + MAX_SEED_AHEAD):
        return (
            f"its stored seed time {job.seed_time} is out of range (1970 to 30 days after "
            f"the job was last changed); {fix}"
        )
    if job.state not in JOB_STATES:
        return f"its stored state {job.state!r} is unknown; delete the job and create it again"
    try:
        validate_frequency(job.frequency_hours)
        validate_retention(job.retention)
    except InvalidInputError as exc:
        return f"its stored {exc}; fix it with `connector jobs update {job.id}`"
    return None
