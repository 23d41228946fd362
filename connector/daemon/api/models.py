"""The API's request and response bodies (pydantic), which its OpenAPI schema describes.

Requests refuse unknown fields, so a typing error in a field name is a clear 422
rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from connector.domain.jobs import MAX_DESCRIPTION, MAX_FREQUENCY_HOURS, MAX_RETENTION


class ErrorBody(BaseModel):
    """Every error: what happened and what to do."""

    error: str = Field(description="What happened and what to do about it.")
    details: list[dict[str, Any]] | None = Field(
        default=None, description="For a request that failed validation: each bad field."
    )


class Health(BaseModel):
    status: str = Field(description='"ok" while the process serves requests.')
    version: str


class ReadinessCheck(BaseModel):
    name: str = Field(description="vcenter, s3, queue or daemon")
    ok: bool
    detail: str
    age_seconds: float = Field(description="How old the cached result is.")


class Readiness(BaseModel):
    ready: bool
    checks: list[ReadinessCheck]


class Progress(BaseModel):
    done: int
    total: int
    detail: str
    attempts: int


class DiskResult(BaseModel):
    disk_key: int
    mode: str
    reason: str | None
    capacity: int
    change_id_from: str | None
    change_id_to: str | None
    disk_uuid: str | None = None
    bytes_changed: int = 0
    bytes_read: int = 0
    bytes_uploaded: int = 0
    pack_bytes: int = 0
    blocks_new: int = 0
    blocks_dedup: int = 0
    blocks_zero: int = 0
    packs: int = 0
    chain: int = 0
    merkle_root: str | None = None
    manifest_key: str | None = None


class Run(BaseModel):
    id: str
    server_id: str
    job_id: str | None = None
    type: str = Field(description="ON_DEMAND or AUTOMATIC")
    state: str = Field(description="PENDING, MISSED, ACTIVE, FAILED, COMPLETED, DELETING, DELETED")
    stage: str
    started_at: str
    finished_at: str | None
    error: str | None
    snapshot_name: str | None
    snapshot_ref: str | None
    stats: dict[str, Any]
    disks: list[DiskResult]
    progress: Progress | None = None


class Server(BaseModel):
    id: str
    vm_uuid: str
    name: str
    ref: str
    datacenter: str
    power_state: str
    cbt_enabled: bool
    disks: list[dict[str, Any]]
    snapshots: list[dict[str, Any]]
    seen_at: str
    removed_at: str | None


class OnDemandQuota(BaseModel):
    quota: int = Field(description="[daemon] on_demand_quota_per_24h")
    used: int = Field(description="On-demand runs started in the last 24 hours.")
    left: int


class RetentionPending(BaseModel):
    state: str
    since: str
    attempts: int
    next_try: str | None
    error: str | None


class Job(BaseModel):
    id: str
    server_id: str
    vm_name: str
    vm_uuid: str
    state: str = Field(
        description="PENDING, ACTIVE, FAILING, FAILED, PAUSED_ON_FAILURE, COMPLETED, "
        "DELETING or DELETED"
    )
    paused: bool
    seed_time: str
    frequency_hours: int | None
    run_once: bool
    retention: int
    description: str
    consecutive_failures: int
    message: str
    created_at: str
    updated_at: str
    next_run: str | None
    problem: str | None = Field(description="Why a stored job cannot be scheduled, or null.")
    retention_due: str | None = None
    retention_attempts: int = 0
    retention_next_at: str | None = None
    retention_error: str | None = None
    retention_pending: RetentionPending | None
    on_demand: OnDemandQuota
    runs: list[Run] | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobCreate(_Request):
    vm: str = Field(min_length=1, max_length=200, description="VM name or instance UUID.")
    frequency_hours: int | None = Field(
        default=None,
        ge=1,
        le=MAX_FREQUENCY_HOURS,
        description="Hours between runs; null or absent with run_once.",
    )
    run_once: bool = False
    seed_time: str | None = Field(
        default=None, max_length=64, description="First run, ISO 8601 or 'now' (the default)."
    )
    retention: int | None = Field(default=None, ge=1, le=MAX_RETENTION)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)


class JobUpdate(_Request):
    frequency_hours: int | None = Field(default=None, ge=1, le=MAX_FREQUENCY_HOURS)
    run_once: bool | None = Field(default=None, description="true: run once at the seed time.")
    seed_time: str | None = Field(default=None, max_length=64)
    retention: int | None = Field(default=None, ge=1, le=MAX_RETENTION)
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)


class RunStarted(BaseModel):
    run_id: str
    job_id: str
    state: str


class Service(BaseModel):
    name: str
    target: str
    configured: bool
    reachable: bool
    error: str | None = None


class DaemonState(BaseModel):
    running: bool
    holder: str | None


class RunSummary(BaseModel):
    id: str
    type: str
    state: str
    started_at: str
    finished_at: str | None
    bytes_uploaded: int = 0
    bytes_read: int = 0


class JobHealth(BaseModel):
    id: str
    vm_name: str
    vm_uuid: str
    state: str
    paused: bool
    message: str
    last_run: RunSummary | None
    last_completed_run: RunSummary | None
    next_run: str | None
    lag_seconds: int | None
    on_demand_quota: int
    on_demand_used: int
    on_demand_left: int


class Status(BaseModel):
    """What `connector status --json` prints."""

    status: str = Field(description="HEALTHY or UNHEALTHY")
    healthy: bool
    reasons: list[str]
    version: str
    checked_at: str
    daemon: DaemonState
    vcenter: Service
    s3: Service
    jobs: list[JobHealth]


class FleetWork(BaseModel):
    run_id: str
    server_id: str
    stage: str = Field(description="The stage of the run this member executes now.")


class FleetMember(BaseModel):
    id: str = Field(description="[fleet] member_id, or the host name and a digest.")
    host: str
    pid: int
    version: str
    capabilities: list[str] = Field(description="Such as transport:vddk, vddk.")
    started_at: str
    state: str = Field(
        description="ALIVE (heartbeating), DEAD (silent for the lease timeout) or STOPPED "
        "(left cleanly)"
    )
    heartbeat_age: float = Field(description="Seconds since its last heartbeat.")
    leader: bool = Field(description="Whether it holds the scheduler's lease.")
    running: list[FleetWork]


class Fleet(BaseModel):
    """What `connector fleet status --json` prints."""

    this_member: str = Field(description="The member that answered.")
    leader: str | None = Field(description="The member that fires schedules, or null.")
    lease_timeout: float = Field(description="[fleet] lease_timeout, in seconds.")
    alive: int = Field(description="How many members are ALIVE.")
    members: list[FleetMember]
