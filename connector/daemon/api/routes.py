"""The API's endpoints, one router per resource, over the use cases in `ApiServices`.

To add an endpoint: a function in the router of its resource (or a new router
listed in `routers()`), with a response model from `models.py`; what it needs
comes from `ApiServices` (add a field there, the composition root fills it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from connector import __version__
from connector.application.fleet import FleetStatus
from connector.application.jobs import JobActions
from connector.application.readiness import Readiness
from connector.application.status import StatusReport
from connector.daemon.api import models
from connector.domain.jobs import RUN_STATES
from connector.domain.records import RunRow, ServerRow
from connector.errors import InvalidInputError, NotFoundError

RunState = Enum("RunState", {s: s for s in RUN_STATES}, type=str)  # type: ignore[misc]


class CatalogSource(Protocol):
    def servers(self) -> list[ServerRow]: ...
    def server(self, server_id: str) -> ServerRow: ...


class RunSource(Protocol):
    def runs(self, server_id: str | None = None) -> list[RunRow]: ...
    def run(self, run_id: str) -> RunRow: ...


@dataclass
class ApiServices:
    """What the endpoints use; the composition root (`App.api_server`) builds it."""

    jobs: JobActions
    catalog: CatalogSource
    runs: RunSource
    status: Callable[[], StatusReport]
    readiness: Readiness
    registry: CollectorRegistry
    fleet: Callable[[], FleetStatus] | None = None  # None: not in a fleet (no [fleet])
    _status_lock: threading.Lock = field(default_factory=threading.Lock)


ServerId = Annotated[str, Path(max_length=100, description="A server id (`s-...`).")]
RunId = Annotated[str, Path(max_length=100, description="A run id (`r-...`).")]


def services(request: Request) -> ApiServices:
    found: ApiServices = request.app.state.services
    return found


Services = Annotated[ApiServices, Depends(services)]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": models.ErrorBody, "description": "No token, or a wrong one."},
    422: {"model": models.ErrorBody, "description": "A malformed parameter or body."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": models.ErrorBody, "description": "No such object."}
}
BAD: dict[int | str, dict[str, Any]] = {
    400: {"model": models.ErrorBody, "description": "A value out of range, or refused."}
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": models.ErrorBody, "description": "vCenter or S3 did not answer."}
}


def actor(request: Request) -> str:
    """Who asked, for the audit log: the API and the client's address."""
    client = request.client.host if request.client else "?"
    return f"api client {client}"


# -- the process -------------------------------------------------------------------------

system = APIRouter(tags=["system"], responses=ERRORS)


@system.get("/healthz", response_model=models.Health, summary="The process answers")
def healthz() -> models.Health:
    return models.Health(status="ok", version=__version__)


@system.get(
    "/readyz",
    response_model=models.Readiness,
    summary="vCenter, S3 and the queue reachable, the daemon's loops alive",
    responses={503: {"model": models.Readiness, "description": "Not ready: see `checks`."}},
)
def readyz(svc: Services, response: Response) -> models.Readiness:
    report = svc.readiness.report()
    if not report.ready:
        response.status_code = 503
    return models.Readiness(
        ready=report.ready, checks=[models.ReadinessCheck(**asdict(c)) for c in report.checks]
    )


@system.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(svc: Services) -> Response:
    return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)


@system.get(
    "/v1/status",
    response_model=models.Status,
    summary="HEALTHY or UNHEALTHY with the reasons (what `connector status` shows)",
)
def status(svc: Services) -> models.Status:
    with svc._status_lock:  # the probes' clients are not shared between threads
        report = svc.status()
    return models.Status(**asdict(report), healthy=report.healthy)


# -- the fleet ----------------------------------------------------------------------------

fleet = APIRouter(prefix="/v1/fleet", tags=["fleet"], responses=ERRORS)


@fleet.get(
    "",
    response_model=models.Fleet,
    summary="The fleet's members, heartbeats, leader and what each runs "
    "(what `connector fleet status --json` shows)",
    responses={
        404: {"model": models.ErrorBody, "description": "Not in a fleet (no [fleet] section)."},
        503: {"model": models.ErrorBody, "description": "The fleet database did not answer."},
    },
)
def get_fleet(svc: Services) -> dict[str, Any]:
    if svc.fleet is None:
        raise NotFoundError(
            "this connector is not in a fleet: add a [fleet] section with database_url "
            "(see docs/fleet.md)"
        )
    return svc.fleet().document()


# -- the server catalog ------------------------------------------------------------------

catalog = APIRouter(prefix="/v1/servers", tags=["catalog"], responses=ERRORS)


@catalog.get("", response_model=list[models.Server], summary="The VMs in the catalog")
def list_servers(svc: Services) -> list[dict[str, Any]]:
    return [asdict(s) for s in svc.catalog.servers()]


@catalog.get(
    "/{server_id}",
    response_model=models.Server,
    summary="One VM of the catalog with its disks",
    responses=NOT_FOUND,
)
def get_server(svc: Services, server_id: ServerId) -> dict[str, Any]:
    return asdict(svc.catalog.server(server_id))


# -- runs -----------------------------------------------------------------------------------

runs = APIRouter(prefix="/v1/runs", tags=["runs"], responses=ERRORS)


@runs.get("", response_model=list[models.Run], summary="Runs, newest last", responses=BAD)
def list_runs(
    svc: Services,
    server: Annotated[str | None, Query(max_length=100, description="A server id.")] = None,
    state: Annotated[RunState | None, Query(description="Only runs in this state.")] = None,
    last: Annotated[int | None, Query(ge=1, le=10000, description="Only the last N.")] = None,
) -> list[dict[str, Any]]:
    rows = svc.runs.runs(server)
    if state is not None:
        rows = [r for r in rows if r.state == state.value]
    if last is not None:
        rows = rows[-last:]
    return svc.jobs.run_documents(rows)


@runs.get("/{run_id}", response_model=models.Run, summary="One run", responses=NOT_FOUND)
def get_run(svc: Services, run_id: RunId) -> dict[str, Any]:
    return svc.jobs.run_documents([svc.runs.run(run_id)])[0]


@runs.get(
    "/{run_id}/disks",
    response_model=list[models.DiskResult],
    summary="What the run did with each disk",
    responses=NOT_FOUND,
)
def get_run_disks(svc: Services, run_id: RunId) -> list[dict[str, Any]]:
    return [asdict(d) for d in svc.runs.run(run_id).disks]


# -- jobs -----------------------------------------------------------------------------------

jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses={**ERRORS, **NOT_FOUND})
JobRef = Annotated[
    str, Path(max_length=200, description="A job id, or the name or instance UUID of its VM.")
]


@jobs.get("", response_model=list[models.Job], summary="Jobs, with their on-demand quota")
def list_jobs(
    svc: Services,
    include_deleted: Annotated[bool, Query(description="Deleted jobs too.")] = False,
) -> list[dict[str, Any]]:
    return [svc.jobs.document(j) for j in svc.jobs.all(include_deleted)]


@jobs.post(
    "",
    response_model=models.Job,
    status_code=201,
    summary="Create a job for a VM",
    responses={**BAD, **UNAVAILABLE},
)
def create_job(svc: Services, body: models.JobCreate, request: Request) -> dict[str, Any]:
    job = svc.jobs.create(
        body.vm,
        frequency_hours=_frequency(body.frequency_hours, body.run_once),
        seed=body.seed_time,
        retention=body.retention,
        description=body.description,
        actor=actor(request),
    )
    return svc.jobs.document(job, with_runs=True)


@jobs.get("/{job}", response_model=models.Job, summary="A job and its runs")
def get_job(svc: Services, job: JobRef) -> dict[str, Any]:
    return svc.jobs.document(svc.jobs.find(job), with_runs=True)


@jobs.patch(
    "/{job}",
    response_model=models.Job,
    summary="Change a job's schedule, retention or description",
    responses=BAD,
)
def update_job(
    svc: Services, job: JobRef, body: models.JobUpdate, request: Request
) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if body.run_once is not None or body.frequency_hours is not None:
        changes["frequency_hours"] = _frequency(body.frequency_hours, bool(body.run_once))
    row = svc.jobs.update(
        job,
        seed=body.seed_time,
        retention=body.retention,
        description=body.description,
        actor=actor(request),
        **changes,
    )
    return svc.jobs.document(row, with_runs=True)


@jobs.delete(
    "/{job}",
    response_model=models.Job,
    summary="Delete a job (an active run is stopped; replicas are kept)",
    responses=BAD,
)
def delete_job(svc: Services, job: JobRef, request: Request) -> dict[str, Any]:
    return svc.jobs.document(svc.jobs.delete(job, actor=actor(request)), with_runs=True)


@jobs.post(
    "/{job}/start",
    response_model=models.RunStarted,
    status_code=202,
    summary="Queue an on-demand run (within the on-demand quota)",
    responses={
        409: {
            "model": models.ErrorBody,
            "description": "A run is pending or active, the quota is used up, or the job "
            "is being deleted.",
        }
    },
)
def start_job(svc: Services, job: JobRef, request: Request) -> Any:
    try:
        started = svc.jobs.start(job, actor=actor(request))
    except InvalidInputError as exc:
        return JSONResponse({"error": str(exc)}, status_code=409)
    return models.RunStarted(**asdict(started))


@jobs.post(
    "/{job}/pause",
    response_model=models.Job,
    summary="Stop scheduling runs (a running run finishes)",
    responses=BAD,
)
def pause_job(svc: Services, job: JobRef, request: Request) -> dict[str, Any]:
    return svc.jobs.document(svc.jobs.pause(job, actor=actor(request)), with_runs=True)


@jobs.post(
    "/{job}/resume",
    response_model=models.Job,
    summary="Put a paused job back on its schedule",
    responses=BAD,
)
def resume_job(svc: Services, job: JobRef, request: Request) -> dict[str, Any]:
    return svc.jobs.document(svc.jobs.resume(job, actor=actor(request)), with_runs=True)


@jobs.get("/{job}/runs", response_model=list[models.Run], summary="The runs of a job")
def job_runs(svc: Services, job: JobRef) -> list[dict[str, Any]]:
    return svc.jobs.document(svc.jobs.find(job), with_runs=True)["runs"]  # type: ignore[no-any-return]


def _frequency(frequency: int | None, run_once: bool) -> int | None:
    """Hours between runs, or None to run once; exactly one of the two is given."""
    if run_once and frequency is not None:
        raise InvalidInputError("give either frequency_hours or run_once, not both")
    if not run_once and frequency is None:
        raise InvalidInputError("give frequency_hours (1 to 24), or run_once: true")
    return None if run_once else frequency


def routers() -> list[APIRouter]:
    return [system, fleet, catalog, runs, jobs]
