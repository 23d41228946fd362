"""Fleet membership, leases and the claims on runs, in the state database.

- `members`: every connector registers (id, host, pid, version, capabilities) and
  heartbeats; one silent for `lease_timeout` seconds (the database's clock) is dead.
- `leases`: a named lease held by one member until it expires; the scheduler's
  leadership ("scheduler") is one, renewed with each heartbeat, taken by another
  member once it expires.
- claims: the member executing a run's current stage holds `run_control.owner`.
  A claim is taken only for the run's current token (seq) and only when nobody
  holds it, or its holder is dead; moving the token on ends it. Since a VM has at
  most one ACTIVE run (admission is one transaction across the fleet), a claim is
  the VM's lock: two connectors never work on one VM at once, and the lock goes
  with its holder's heartbeat.
- `stage_log`: each stage executed, by whom, from when to when (the database's
  clock): `connector fleet status` shows it, and tests assert from it that no VM
  was ever worked on by two members at once.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import sqlalchemy as sa

from connector.adapters.sql import (
    Database,
    leases,
    members,
    run_control,
    runs,
    side_effects,
    stage_log,
)
from connector.domain.jobs import LIVE_RUN_STATES
from connector.domain.records import EFFECT_PENDING, MULTIPART
from connector.domain.times import stamp

SCHEDULER = "scheduler"


@dataclass(frozen=True)
class Member:
    id: str
    host: str
    pid: int
    version: str
    capabilities: list[str]
    started_at: str
    heartbeat: float
    stopped: bool
    alive: bool
    age: float  # seconds since its last heartbeat


@dataclass(frozen=True)
class Orphan:
    """A live run nobody is working on: its claim's holder is dead or lost it, or its
    next task is overdue."""

    run_id: str
    owner: str | None
    why: str


class Fleet:
    def __init__(self, db: Database, member_id: str, lease_timeout: float) -> None:
        self.db = db
        self.member_id = member_id
        self.lease_timeout = lease_timeout

    # -- membership ----------------------------------------------------------------------

    def register(self, version: str, capabilities: list[str]) -> None:
        values = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": version,
            "capabilities": json.dumps(sorted(capabilities)),
            "started_at": stamp(),
            "heartbeat": self.db.now_expr(),
            "stopped": False,
        }
        with self.db.write_tx(f"member:{self.member_id}") as c:
            done = c.execute(
                members.update().where(members.c.id == self.member_id).values(**values)
            )
            if not done.rowcount:
                c.execute(members.insert().values(id=self.member_id, **values))

    def heartbeat(self) -> None:
        with self.db.tx() as c:
            c.execute(
                members.update()
                .where(members.c.id == self.member_id)
                .values(heartbeat=self.db.now_expr(), stopped=False)
            )

    def leave(self) -> None:
        """A clean stop: the member is gone at once (its leases with it)."""
        with self.db.tx() as c:
            c.execute(members.update().where(members.c.id == self.member_id).values(stopped=True))
            c.execute(leases.delete().where(leases.c.holder == self.member_id))

    def members(self) -> list[Member]:
        with self.db.tx() as c:
            now = self.db.now(c)
            rows = c.execute(sa.select(members).order_by(members.c.id)).all()
        return [
            Member(
                id=r.id,
                host=r.host,
                pid=r.pid,
                version=r.version,
                capabilities=json.loads(r.capabilities),
                started_at=r.started_at,
                heartbeat=r.heartbeat,
                stopped=bool(r.stopped),
                alive=not r.stopped and now - r.heartbeat <= self.lease_timeout,
                age=max(0.0, now - r.heartbeat),
            )
            for r in rows
        ]

    def _alive_ids(self, c: sa.Connection) -> set[str]:
        cutoff = self.db.now(c) - self.lease_timeout
        rows = c.execute(
            sa.select(members.c.id).where(
                members.c.heartbeat >= cutoff, members.c.stopped.is_(False)
            )
        ).all()
        return {r.id for r in rows}

    # -- leases --------------------------------------------------------------------------

    def hold_lease(self, name: str) -> bool:
        """Take or renew lease `name`; True while this member holds it."""
        with self.db.write_tx(f"lease:{name}") as c:
            now = self.db.now(c)
            row = c.execute(sa.select(leases).where(leases.c.name == name)).first()
            expires = now + self.lease_timeout
            if row is None:
                c.execute(
                    leases.insert().values(
                        name=name, holder=self.member_id, expires=expires, since=now
                    )
                )
                return True
            if row.holder == self.member_id:
                c.execute(leases.update().where(leases.c.name == name).values(expires=expires))
                return True
            if row.expires < now or row.holder not in self._alive_ids(c):
                c.execute(
                    leases.update()
                    .where(leases.c.name == name)
                    .values(holder=self.member_id, expires=expires, since=now)
                )
                return True
            return False

    def lease_holder(self, name: str) -> str | None:
        with self.db.tx() as c:
            now = self.db.now(c)
            row = c.execute(sa.select(leases).where(leases.c.name == name)).first()
        return None if row is None or row.expires < now else str(row.holder)

    # -- claims on runs -----------------------------------------------------------------

    def claim(self, run_id: str, seq: int) -> bool:
        """Take the claim on the run's current stage, for token `seq`."""
        with self.db.write_tx(f"run:{run_id}") as c:
            row = c.execute(
                sa.select(run_control.c.seq, run_control.c.owner).where(
                    run_control.c.run_id == run_id
                )
            ).first()
            if row is None or row.seq != seq:
                return False
            if row.owner not in (None, self.member_id) and row.owner in self._alive_ids(c):
                return False
            c.execute(
                run_control.update()
                .where(run_control.c.run_id == run_id)
                .values(owner=self.member_id, owner_since=self.db.now_expr())
            )
            return True

    def holds(self, run_id: str) -> bool:
        with self.db.tx() as c:
            owner = c.execute(
                sa.select(run_control.c.owner).where(run_control.c.run_id == run_id)
            ).scalar()
        return owner == self.member_id

    def orphans(self, executing: set[str], grace: float) -> list[Orphan]:
        """Live runs that nobody works on: claimed by a dead member, claimed by this one
        but not executing here (a task lost to an error), or unclaimed with a task
        overdue by more than `grace` seconds (an enqueue that failed)."""
        out: list[Orphan] = []
        with self.db.tx() as c:
            now = self.db.now(c)
            alive = self._alive_ids(c)
            rows = c.execute(
                sa.select(
                    run_control.c.run_id,
                    run_control.c.owner,
                    run_control.c.owner_since,
                    run_control.c.due_at,
                )
                .select_from(runs.join(run_control, run_control.c.run_id == runs.c.id))
                .where(runs.c.state.in_(LIVE_RUN_STATES))
            ).all()
        for r in rows:
            if r.owner is None:
                if r.due_at is not None and now - r.due_at > grace:
                    out.append(Orphan(r.run_id, None, "its next task is overdue"))
            elif r.owner == self.member_id:
                # A claim taken just now may not be in `executing` yet: only an old one
                # that no task here holds is lost.
                old = r.owner_since is None or now - r.owner_since > grace
                if old and r.run_id not in executing:
                    out.append(Orphan(r.run_id, r.owner, "its task was lost on this member"))
            elif r.owner not in alive:
                out.append(Orphan(r.run_id, r.owner, f"its connector {r.owner} stopped"))
        return out

    def release_if(self, run_id: str, owner: str | None) -> bool:
        """End the claim of `owner` on the run (it is dead, or lost its task); True if
        this call ended it (another member may have been quicker)."""
        with self.db.write_tx(f"run:{run_id}") as c:
            current = c.execute(
                sa.select(run_control.c.owner).where(run_control.c.run_id == run_id)
            ).first()
            if current is None or current.owner != owner:
                return False
            c.execute(
                run_control.update()
                .where(run_control.c.run_id == run_id)
                .values(owner=None, owner_since=None, due_at=self.db.now_expr())
            )
            return True

    def dead_uploads(self) -> list[tuple[int, str, str]]:
        """(effect id, key, upload id) of pending multipart uploads whose member is dead."""
        with self.db.tx() as c:
            alive = self._alive_ids(c)
            rows = c.execute(
                sa.select(
                    side_effects.c.id,
                    side_effects.c.target,
                    side_effects.c.ref,
                    side_effects.c.owner,
                ).where(side_effects.c.kind == MULTIPART, side_effects.c.state == EFFECT_PENDING)
            ).all()
        return [
            (r.id, r.target, r.ref)
            for r in rows
            if r.owner is not None and r.owner != self.member_id and r.owner not in alive
        ]

    def live_uploads_of_others(self) -> frozenset[str]:
        """Upload ids that other members, alive, recorded as theirs and still pending."""
        with self.db.tx() as c:
            alive = self._alive_ids(c) - {self.member_id}
            rows = c.execute(
                sa.select(side_effects.c.ref, side_effects.c.owner).where(
                    side_effects.c.kind == MULTIPART, side_effects.c.state == EFFECT_PENDING
                )
            ).all()
        return frozenset(r.ref for r in rows if r.owner in alive and r.ref)

    def is_others_upload(self, owner: str | None) -> bool:
        """Whether a recorded upload belongs to another member that is alive."""
        if owner is None or owner == self.member_id:
            return False
        with self.db.tx() as c:
            return owner in self._alive_ids(c)

    # -- the stage log -------------------------------------------------------------------

    def stage_started(self, run_id: str, server_id: str, stage: str) -> int:
        with self.db.tx() as c:
            result = c.execute(
                stage_log.insert().values(
                    run_id=run_id,
                    server_id=server_id,
                    stage=stage,
                    member=self.member_id,
                    started=self.db.now_expr(),
                )
            )
            key = result.inserted_primary_key
            assert key is not None
            return int(key[0])

    def stage_ended(self, entry: int, outcome: str) -> None:
        with self.db.tx() as c:
            c.execute(
                stage_log.update()
                .where(stage_log.c.id == entry)
                .values(ended=self.db.now_expr(), outcome=outcome)
            )

    def working_on(self) -> dict[str, list[tuple[str, str, str]]]:
        """Member -> (run, server, stage) of every stage being executed now."""
        out: dict[str, list[tuple[str, str, str]]] = {}
        with self.db.tx() as c:
            rows = c.execute(
                sa.select(run_control.c.owner, runs.c.id, runs.c.server_id, runs.c.stage)
                .select_from(runs.join(run_control, run_control.c.run_id == runs.c.id))
                .where(run_control.c.owner.is_not(None), runs.c.state.in_(LIVE_RUN_STATES))
            ).all()
        for r in rows:
            out.setdefault(r.owner, []).append((r.id, r.server_id, r.stage))
        return out

    def prune_stage_log(self, older_than: float) -> int:
        """Forget stages that began more than `older_than` seconds ago."""
        with self.db.tx() as c:
            cutoff = self.db.now(c) - older_than
            return int(c.execute(stage_log.delete().where(stage_log.c.started < cutoff)).rowcount)

    def stage_history(self) -> list[dict[str, object]]:
        with self.db.tx() as c:
            rows = c.execute(sa.select(stage_log).order_by(stage_log.c.id)).all()
        return [dict(r._mapping) for r in rows]
