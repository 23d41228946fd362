"""The fleet's status: its members, their heartbeats, the leader, and what each runs.

One function, `fleet_status`, over a narrow view of the fleet's records; the CLI
(`connector fleet status`) prints it, and the API serves the same document
(GET /v1/fleet).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


class MemberView(Protocol):
    id: str
    host: str
    pid: int
    version: str
    capabilities: list[str]
    started_at: str
    heartbeat: float
    stopped: bool
    alive: bool
    age: float


class FleetView(Protocol):
    """What the status reads of the fleet (connector.adapters.fleet.Fleet)."""

    member_id: str
    lease_timeout: float

    def members(self) -> list[Any]: ...

    def lease_holder(self, name: str) -> str | None: ...

    def working_on(self) -> dict[str, list[tuple[str, str, str]]]: ...


@dataclass
class Work:
    run_id: str
    server_id: str
    stage: str


@dataclass
class MemberStatus:
    id: str
    host: str
    pid: int
    version: str
    capabilities: list[str]
    started_at: str
    state: str  # ALIVE | DEAD | STOPPED
    heartbeat_age: float  # seconds since its last heartbeat
    leader: bool
    running: list[Work] = field(default_factory=list)


@dataclass
class FleetStatus:
    this_member: str
    leader: str | None
    lease_timeout: float
    members: list[MemberStatus]

    @property
    def alive(self) -> int:
        return sum(1 for m in self.members if m.state == "ALIVE")

    def document(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["alive"] = self.alive
        return doc


def fleet_status(fleet: FleetView) -> FleetStatus:
    leader = fleet.lease_holder("scheduler")
    work = fleet.working_on()
    members: list[MemberStatus] = []
    for m in fleet.members():
        state = "STOPPED" if m.stopped else ("ALIVE" if m.alive else "DEAD")
        members.append(
            MemberStatus(
                id=m.id,
                host=m.host,
                pid=m.pid,
                version=m.version,
                capabilities=list(m.capabilities),
                started_at=m.started_at,
                state=state,
                heartbeat_age=round(m.age, 1),
                leader=m.id == leader,
                running=[Work(r, s, st) for r, s, st in work.get(m.id, [])],
            )
        )
    return FleetStatus(fleet.member_id, leader, fleet.lease_timeout, members)
