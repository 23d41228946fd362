"""In-memory implementations of the state ports, for fast tests of the core.

`MemoryState` is the catalog, the disk states, the runs, the block store and the
retention settings in one object (as `StateStore` is over SQL); `MemoryLedger`
is the run ledger, its run controls and the upload journal over a
`MemoryState`, whose runs its `advance` moves on (as `RunLedger` does through
`SqlRuns`). Both keep the observable behaviour of the SQL adapters, which the
contract suite (`tests/contract/state_contract.py`) checks over both:

- values go in and come out as copies, so a caller cannot change what is stored
  by mutating a row it was given; step results, run stats and effect details
  come back as JSON values, as they do from the database;
- timestamps are `stamp()` strings, strictly increasing within one
  `MemoryState`, so rows written one after the other sort in that order;
- updates of an unknown run, control or effect are silently nothing, as an
  UPDATE that matches no row is; reads of an unknown server or run raise the
  same `NotFoundError`, with the same message;
- a second `create_run` or `record_pack` of the same id raises ValueError
  (where the database refuses the duplicate key).

Pure Python: no SQLAlchemy. One re-entrant lock per `MemoryState`, shared by its
ledger, makes each call atomic (`advance` changes the control and the run
together).
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from connector.domain.jobs import RUN_ACTIVE, RUN_COMPLETED, RUN_DELETED, RUN_FAILED, RUN_MISSED
from connector.domain.landing import LANDING_ACTIVE, LandedDisk, LandingRow
from connector.domain.manifest import BlockRef
from connector.domain.model import SnapshotInfo, VmInfo
from connector.domain.records import (
    EFFECT_DONE,
    EFFECT_PENDING,
    EFFECT_UNDONE,
    MULTIPART,
    NO_DISK,
    SNAPSHOT,
    Control,
    DiskResult,
    DiskStateRow,
    Effect,
    RunRow,
    ServerRow,
    server_conflict,
)
from connector.domain.times import stamp, utcnow
from connector.errors import NotFoundError
from connector.faults import crash_point

__all__ = ["MemoryLandings", "MemoryLedger", "MemoryState"]

DONE_STAGE = "done"  # the stage of a finished run
TERMINAL_STATES = frozenset({RUN_MISSED, RUN_FAILED, RUN_COMPLETED, RUN_DELETED})


def _json(value: Any) -> Any:
    """`value` as it comes back from a JSON column."""
    return json.loads(json.dumps(value))


class _Clock:
    """`stamp()` times that never repeat or go back (call it under the lock)."""

    def __init__(self) -> None:
        self._last: dt.datetime | None = None

    def __call__(self) -> str:
        now = utcnow()
        if self._last is not None and now <= self._last:
            now = self._last + dt.timedelta(microseconds=1)
        self._last = now
        return stamp(now)


@dataclass
class _Pack:
    size: int
    run_id: str | None
    created_at: str


class MemoryState:
    """The `Catalog`, `DiskStates`, `Runs`, `BlockStore` and `RetentionSettings` ports."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.clock = _Clock()
        self._servers: dict[str, ServerRow] = {}
        self._server_by_uuid: dict[str, str] = {}
        self._disk_states: dict[tuple[str, int], DiskStateRow] = {}
        self._runs: dict[str, RunRow] = {}  # without their disks
        self._run_disks: dict[str, dict[int, dict[str, Any]]] = {}  # run -> key -> JSON
        self._blocks: dict[bytes, BlockRef] = {}
        self._packs: dict[str, _Pack] = {}
        self._retention: dict[str, int] = {}

    # -- Catalog -----------------------------------------------------------------------

    def upsert_server(self, vm: VmInfo) -> ServerRow:
        disks = [
            {
                "key": d.key,
                "label": d.label,
                "capacity": d.capacity,
                "backing": d.backing,
                "cbt": d.change_id is not None,
            }
            for d in vm.disks
        ]
        snapshots = [{"name": s.name, "ref": s.ref} for s in vm.snapshots]
        with self.lock:
            server_id = self._server_by_uuid.get(vm.uuid)
            if server_id is None:
                server_id = "s-" + os.urandom(8).hex()
                self._server_by_uuid[vm.uuid] = server_id
            self._servers[server_id] = ServerRow(
                id=server_id,
                vm_uuid=vm.uuid,
                name=vm.name,
                ref=vm.ref,
                datacenter=vm.datacenter,
                power_state=vm.power_state,
                cbt_enabled=vm.cbt_enabled,
                disks=_json(disks),
                snapshots=_json(snapshots),
                seen_at=self.clock(),
                removed_at=None,
            )
            return copy.deepcopy(self._servers[server_id])

    def server(self, server_id: str) -> ServerRow:
        with self.lock:
            row = self._servers.get(server_id)
            if row is None:
                raise NotFoundError(f"no server {server_id} in the catalog")
            return copy.deepcopy(row)

    def servers(self) -> list[ServerRow]:
        with self.lock:
            rows = sorted(self._servers.values(), key=lambda s: s.name)
            return copy.deepcopy(rows)

    def find_servers(self, name_or_uuid: str) -> list[ServerRow]:
        with self.lock:
            rows = [s for s in self._servers.values() if name_or_uuid in (s.vm_uuid, s.name, s.id)]
            return copy.deepcopy(rows)

    def mark_removed(self, present_uuids: set[str]) -> None:
        with self.lock:
            now = self.clock()
            for s in self._servers.values():
                if s.vm_uuid not in present_uuids and s.removed_at is None:
                    s.removed_at = now

    def add_server(self, server_id: str, vm_uuid: str, name: str) -> ServerRow:
        with self.lock:
            have = self._servers.get(server_id)
            if have is None and vm_uuid in self._server_by_uuid:
                have = self._servers[self._server_by_uuid[vm_uuid]]
            if have is None:
                self._server_by_uuid[vm_uuid] = server_id
                self._servers[server_id] = ServerRow(
                    id=server_id,
                    vm_uuid=vm_uuid,
                    name=name,
                    ref="",
                    datacenter="",
                    power_state="unknown",
                    cbt_enabled=False,
                    disks=[],
                    snapshots=[],
                    seen_at=self.clock(),
                    removed_at=None,
                )
            elif (have.id, have.vm_uuid) != (server_id, vm_uuid):
                raise ValueError(server_conflict(server_id, vm_uuid, have.id, have.vm_uuid))
            return copy.deepcopy(self._servers[server_id])

    # -- DiskStates ----------------------------------------------------------------------

    def disk_state(self, server_id: str, disk_key: int) -> DiskStateRow | None:
        with self.lock:
            row = self._disk_states.get((server_id, disk_key))
            return None if row is None else replace(row)

    def disk_states(self, server_id: str) -> list[DiskStateRow]:
        with self.lock:
            rows = [r for (sid, _), r in self._disk_states.items() if sid == server_id]
            return [replace(r) for r in sorted(rows, key=lambda r: r.disk_key)]

    def forget_disks(self, server_id: str) -> None:
        with self.lock:
            for key in [k for k in self._disk_states if k[0] == server_id]:
                del self._disk_states[key]

    def put_disk_state(self, row: DiskStateRow) -> None:
        with self.lock:
            self._disk_states[(row.server_id, row.disk_key)] = replace(row)

    # -- Runs ------------------------------------------------------------------------------

    def create_run(
        self,
        run_id: str,
        server_id: str,
        run_type: str,
        *,
        state: str = RUN_ACTIVE,
        stage: str = "validate",
        error: str | None = None,
    ) -> None:
        with self.lock:
            if run_id in self._runs:
                raise ValueError(f"run {run_id} exists already")
            now = self.clock()
            self._runs[run_id] = RunRow(
                id=run_id,
                server_id=server_id,
                type=run_type,
                state=state,
                stage=stage,
                started_at=now,
                finished_at=now if state in TERMINAL_STATES else None,
                error=error,
                snapshot_name=None,
                snapshot_ref=None,
            )

    def run(self, run_id: str) -> RunRow:
        with self.lock:
            row = self._runs.get(run_id)
            if row is None:
                raise NotFoundError(f"no run {run_id}; list runs with `connector runs`")
            return self._with_disks(row)

    def runs(self, server_id: str | None = None) -> list[RunRow]:
        with self.lock:
            rows = sorted(self._runs.values(), key=lambda r: (r.started_at, r.id))
            return [
                self._with_disks(r) for r in rows if server_id is None or r.server_id == server_id
            ]

    def _with_disks(self, row: RunRow) -> RunRow:
        disks = self._run_disks.get(row.id, {})
        return replace(
            row,
            stats=_json(row.stats),
            disks=[DiskResult.from_json(_json(disks[k])) for k in sorted(disks)],
        )

    def set_stage(
        self,
        run_id: str,
        stage: str,
        *,
        snapshot_name: str | None = None,
        snapshot_ref: str | None = None,
    ) -> None:
        with self.lock:
            row = self._runs.get(run_id)
            if row is None:
                return
            row.stage = stage
            if snapshot_name is not None:
                row.snapshot_name = snapshot_name
            if snapshot_ref is not None:
                row.snapshot_ref = snapshot_ref

    def move(self, run_id: str, *, stage: str | None = None, state: str | None = None) -> None:
        """A new stage or state of a run (the ledger moving its queue token on)."""
        with self.lock:
            row = self._runs.get(run_id)
            if row is None:
                return
            if stage is not None:
                row.stage = stage
            if state is not None:
                row.state = state

    def record_disk(self, run_id: str, result: DiskResult) -> None:
        with self.lock:
            self._run_disks.setdefault(run_id, {})[result.disk_key] = _json(result.to_json())

    def record_commit(self, run_id: str, disks: list[DiskStateRow], stats: dict[str, Any]) -> None:
        stored = _json(stats)
        rows = [replace(d) for d in disks]
        with self.lock:
            for d in rows:
                self._disk_states[(d.server_id, d.disk_key)] = d
            run = self._runs.get(run_id)
            if run is not None:
                run.stats = stored

    def finish_run(self, run_id: str, note: str | None = None) -> None:
        with self.lock:
            row = self._runs.get(run_id)
            if row is None:
                return
            row.state = RUN_COMPLETED
            row.stage = DONE_STAGE
            row.finished_at = self.clock()
            row.error = note

    def fail_run(self, run_id: str, error: str) -> None:
        self.end_run(run_id, RUN_FAILED, error)

    def end_run(self, run_id: str, state: str, error: str | None) -> None:
        with self.lock:
            row = self._runs.get(run_id)
            if row is None:
                return
            row.state = state
            row.finished_at = self.clock()
            row.error = error

    def mark_runs_deleted(self, run_ids: set[str]) -> None:
        with self.lock:
            for run_id in run_ids:
                row = self._runs.get(run_id)
                if row is not None:
                    row.state = RUN_DELETED

    def import_run(self, run: RunRow) -> bool:
        with self.lock:
            if run.id in self._runs:
                return False
            self._runs[run.id] = replace(run, stats=_json(run.stats), disks=[])
            self._run_disks[run.id] = {d.disk_key: _json(d.to_json()) for d in run.disks}
            return True

    # -- BlockStore --------------------------------------------------------------------------

    def lookup(self, block_id: bytes) -> BlockRef | None:
        with self.lock:
            return self._blocks.get(bytes(block_id))

    def lookup_many(self, block_ids: Sequence[bytes]) -> dict[bytes, BlockRef]:
        with self.lock:
            found = ((bytes(b), self._blocks.get(bytes(b))) for b in block_ids)
            return {b: ref for b, ref in found if ref is not None}

    def add(self, refs: list[BlockRef]) -> None:
        with self.lock:
            for r in refs:
                self._blocks.setdefault(
                    bytes(r.block_id), BlockRef(bytes(r.block_id), r.pack_id, r.offset, r.length)
                )

    def record_pack(self, pack_id: str, size: int, run_id: str | None) -> None:
        with self.lock:
            if pack_id in self._packs:
                raise ValueError(f"pack {pack_id} is recorded already")
            self._packs[pack_id] = _Pack(size, run_id, self.clock())

    def packs_of_runs(self, run_ids: set[str]) -> set[str]:
        with self.lock:
            return {p for p, rec in self._packs.items() if rec.run_id in run_ids}

    def forget_blocks_in_packs(self, pack_ids: set[str]) -> None:
        with self.lock:
            for block_id in [b for b, r in self._blocks.items() if r.pack_id in pack_ids]:
                del self._blocks[block_id]

    def forget_packs(self, pack_ids: set[str]) -> None:
        with self.lock:
            self.forget_blocks_in_packs(pack_ids)
            for pack_id in pack_ids:
                self._packs.pop(pack_id, None)

    # -- RetentionSettings -----------------------------------------------------------------

    def set_retention(self, server_id: str, keep: int | None) -> None:
        with self.lock:
            if keep is None:
                self._retention.pop(server_id, None)
            else:
                self._retention[server_id] = keep

    def retention_settings(self) -> dict[str, int]:
        with self.lock:
            return dict(self._retention)

    def close(self) -> None:
        """Nothing to release (as `StateStore.close`, for callers that close it)."""


@dataclass
class _EffectRow:
    effect: Effect
    updated_at: str


class MemoryLedger:
    """The `Ledger` (steps, side effects), `RunControls` and `UploadJournal` ports."""

    def __init__(self, state: MemoryState) -> None:
        self.state = state
        self._lock = state.lock
        self._now = state.clock
        self._controls: dict[str, Control] = {}
        self._steps: dict[tuple[str, str, int], dict[str, Any]] = {}
        self._effects: dict[int, _EffectRow] = {}
        self._ids = itertools.count(1)

    # -- RunControls -----------------------------------------------------------------------

    def ensure_control(self, run_id: str, job_id: str | None = None) -> Control:
        with self._lock:
            ctl = self._controls.get(run_id)
            if ctl is None:
                ctl = Control(
                    run_id=run_id,
                    job_id=job_id,
                    seq=0,
                    attempts=0,
                    host=None,
                    failed_stage=None,
                    failure=None,
                    progress_done=0,
                    progress_total=0,
                    detail="",
                    updated_at=self._now(),
                )
                self._controls[run_id] = ctl
            return ctl

    def control(self, run_id: str) -> Control | None:
        with self._lock:
            return self._controls.get(run_id)

    def controls(self, run_ids: list[str]) -> dict[str, Control]:
        with self._lock:
            return {r: self._controls[r] for r in run_ids if r in self._controls}

    def advance(
        self,
        run_id: str,
        stage: str | None = None,
        attempts: int | None = None,
        state: str | None = None,
        host: str | None = None,
        due_in: float = 0.0,
    ) -> int:
        with self._lock:
            ctl = self.ensure_control(run_id)
            values: dict[str, Any] = {
                "seq": ctl.seq + 1,
                "updated_at": self._now(),
                "owner": None,
                "owner_since": None,
                "due_at": time.time() + due_in,
            }
            if stage is not None:
                values["attempts"] = 0
                values["detail"] = ""
            if attempts is not None:
                values["attempts"] = attempts
            if host is not None:
                values["host"] = host
            self._controls[run_id] = replace(ctl, **values)
            self.state.move(run_id, stage=stage, state=state)
            return int(values["seq"])

    def set_failure(self, run_id: str, failed_stage: str, reason: str) -> None:
        with self._lock:
            ctl = self.ensure_control(run_id)
            self._controls[run_id] = replace(
                ctl, failed_stage=failed_stage, failure=reason, updated_at=self._now()
            )

    def set_progress(self, run_id: str, done: int, total: int, detail: str) -> None:
        with self._lock:
            ctl = self._controls.get(run_id)
            if ctl is None:
                return
            self._controls[run_id] = replace(
                ctl,
                progress_done=done,
                progress_total=total,
                detail=detail,
                updated_at=self._now(),
            )

    # -- RunSteps --------------------------------------------------------------------------

    def step(self, run_id: str, stage: str, disk_key: int = NO_DISK) -> dict[str, Any] | None:
        with self._lock:
            result = self._steps.get((run_id, stage, disk_key))
            return None if result is None else copy.deepcopy(result)

    def steps(self, run_id: str, stage: str) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {
                key: copy.deepcopy(result)
                for (rid, st, key), result in self._steps.items()
                if rid == run_id and st == stage
            }

    def step_done(self, run_id: str, stage: str, disk_key: int, result: dict[str, Any]) -> None:
        stored: dict[str, Any] = _json(result)
        with self._lock:
            self._steps[(run_id, stage, disk_key)] = stored

    # -- SideEffects: snapshots ----------------------------------------------------------

    def snapshot_intent(self, run_id: str, vm_uuid: str, name: str) -> Effect:
        with self._lock:
            for row in self._effects.values():
                e = row.effect
                if (e.run_id, e.kind, e.name, e.state) == (run_id, SNAPSHOT, name, EFFECT_PENDING):
                    return copy.deepcopy(e)
            return self._insert(run_id, SNAPSHOT, vm_uuid, name, None)

    def snapshot_created(self, effect_id: int, snap: SnapshotInfo) -> None:
        detail = _json({"disks": [asdict(d) for d in snap.disks]})
        with self._lock:
            row = self._effects.get(effect_id)
            if row is not None:
                row.effect = replace(row.effect, ref=snap.ref, detail=detail)
                row.updated_at = self._now()

    def undone(self, effect_id: int, state: str = EFFECT_UNDONE) -> None:
        with self._lock:
            row = self._effects.get(effect_id)
            if row is not None:
                self._settle(row, state)

    def snapshots_removed(self, vm_uuid: str, names: list[str]) -> None:
        with self._lock:
            for row in self._effects.values():
                e = row.effect
                if (
                    e.kind == SNAPSHOT
                    and e.target == vm_uuid
                    and e.name in names
                    and e.state == EFFECT_PENDING
                ):
                    self._settle(row, EFFECT_UNDONE)

    def pending(self, kind: str | None = None, run_id: str | None = None) -> list[Effect]:
        with self._lock:
            return [
                copy.deepcopy(row.effect)
                for _, row in sorted(self._effects.items())
                if row.effect.state == EFFECT_PENDING
                and (kind is None or row.effect.kind == kind)
                and (run_id is None or row.effect.run_id == run_id)
            ]

    # -- UploadJournal ---------------------------------------------------------------------

    def upload_started(self, key: str, upload_id: str) -> None:
        with self._lock:
            self._insert(None, MULTIPART, key, None, upload_id)
        crash_point("multipart-created")

    def upload_ended(self, key: str, upload_id: str) -> None:
        with self._lock:
            for row in self._effects.values():
                e = row.effect
                if e.kind == MULTIPART and e.target == key and e.ref == upload_id:
                    self._settle(row, EFFECT_DONE)

    # -- helpers -----------------------------------------------------------------------------

    def _insert(
        self, run_id: str | None, kind: str, target: str, name: str | None, ref: str | None
    ) -> Effect:
        now = self._now()
        effect = Effect(
            id=next(self._ids),
            run_id=run_id,
            kind=kind,
            target=target,
            name=name,
            ref=ref,
            detail={},
            state=EFFECT_PENDING,
            created_at=now,
        )
        self._effects[effect.id] = _EffectRow(effect, now)
        return copy.deepcopy(effect)

    def _settle(self, row: _EffectRow, state: str) -> None:
        row.effect = replace(row.effect, state=state)
        row.updated_at = self._now()


class MemoryLandings:
    """The Landings port in memory."""

    def __init__(self) -> None:
        self._rows: dict[str, LandingRow] = {}
        self._lock = threading.Lock()

    def landing(self, run_id: str) -> LandingRow | None:
        with self._lock:
            row = self._rows.get(run_id)
            return _copy_landing(row) if row else None

    def landings(self, server_id: str | None = None) -> list[LandingRow]:
        with self._lock:
            return [
                _copy_landing(r)
                for _, r in sorted(self._rows.items())
                if server_id is None or r.server_id == server_id
            ]

    def start_landing(self, run_id: str, server_id: str, image_name: str) -> LandingRow:
        with self._lock:
            row = self._rows.get(run_id)
            if row is None:
                row = LandingRow(
                    run_id, server_id, LANDING_ACTIVE, image_name, None, 0, stamp(), None, None
                )
                self._rows[run_id] = row
            else:
                row.state, row.error, row.finished_at = LANDING_ACTIVE, None, None
            return _copy_landing(row)

    def record_snapshot(self, disk: LandedDisk) -> None:
        with self._lock:
            row = self._rows[disk.run_id]
            row.disks = sorted(
                [d for d in row.disks if d.disk_key != disk.disk_key] + [replace(disk)],
                key=lambda d: d.disk_key,
            )

    def set_snapshot_state(
        self, run_id: str, disk_key: int, state: str, blocks_sent: int | None = None
    ) -> None:
        with self._lock:
            row = self._rows.get(run_id)
            for d in row.disks if row else []:
                if d.disk_key == disk_key:
                    d.state = state
                    if blocks_sent is not None:
                        d.blocks_sent = blocks_sent

    def set_attempt(self, run_id: str, attempt: int) -> None:
        with self._lock:
            if run_id in self._rows:
                self._rows[run_id].attempt = attempt

    def record_image(self, run_id: str, image_id: str) -> None:
        with self._lock:
            if run_id in self._rows:
                self._rows[run_id].image_id = image_id

    def end_landing(self, run_id: str, state: str, error: str | None = None) -> None:
        with self._lock:
            row = self._rows.get(run_id)
            if row is not None:
                row.state, row.error, row.finished_at = state, error, stamp()


def _copy_landing(row: LandingRow) -> LandingRow:
    return replace(row, disks=[replace(d) for d in row.disks])
