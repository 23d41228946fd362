"""The state ports' contract: every implementation must pass this one suite.

The ports of `connector.ports` that keep the connector's state (Catalog,
DiskStates, Runs, RunSteps, SideEffects, UploadJournal, RunControls, BlockIndex,
PackRecords, RetentionSettings) are tested together, because they share one
store: a commit's disk states are read back through DiskStates, a ledger's
`advance` moves the run that Runs shows. Subclass `StateContract` in a test
module and override the `ports` fixture to give a fresh, empty `StatePorts` of
one implementation (parametrize it to run the suite over several).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import pytest

from connector.domain.jobs import (
    RUN_ACTIVE,
    RUN_COMPLETED,
    RUN_DELETED,
    RUN_FAILED,
    RUN_MISSED,
    RUN_PENDING,
)
from connector.domain.landing import (
    LANDING_ACTIVE,
    LANDING_FAILED,
    LANDING_LANDED,
    SNAP_COMPLETED,
    SNAP_STARTED,
    LandedDisk,
)
from connector.domain.manifest import BlockRef
from connector.domain.model import DiskInfo, SnapshotInfo, VmInfo
from connector.domain.records import (
    EFFECT_DONE,
    MULTIPART,
    NO_DISK,
    SNAPSHOT,
    DiskResult,
    DiskStateRow,
    RunRow,
)
from connector.errors import NotFoundError
from connector.ports import (
    BlockStore,
    Catalog,
    DiskStates,
    Landings,
    Ledger,
    RetentionSettings,
    RunControls,
    Runs,
    UploadJournal,
)


@dataclass
class StatePorts:
    """One implementation's state ports, all over the same store."""

    catalog: Catalog
    disk_states: DiskStates
    runs: Runs
    ledger: Ledger
    controls: RunControls
    journal: UploadJournal
    blocks: BlockStore
    retention: RetentionSettings


# -- values -----------------------------------------------------------------------------


def disk(key: int, capacity: int = 8 << 30, change_id: str | None = "52 aa/7") -> DiskInfo:
    return DiskInfo(
        key=key,
        label=f"Hard disk {key - 1999}",
        capacity=capacity,
        file_name=f"[ds1] vm/vm_{key}.vmdk",
        backing="flat",
        uuid=f"6000C29{key}",
        change_id=change_id,
        datastore="ds1",
    )


def listed(key: int, capacity: int, *, cbt: bool) -> dict[str, object]:
    """A disk as the catalog lists it in `ServerRow.disks`."""
    return {
        "key": key,
        "label": f"Hard disk {key - 1999}",
        "capacity": capacity,
        "backing": "flat",
        "cbt": cbt,
    }


def vm(
    uuid: str = "4210aaaa-0001",
    name: str = "web-1",
    *,
    ref: str = "vm-101",
    datacenter: str = "dc1",
    power_state: str = "poweredOn",
    cbt_enabled: bool = True,
    disks: tuple[DiskInfo, ...] = (disk(2000), disk(2001, 1 << 30, None)),
    snapshots: tuple[SnapshotInfo, ...] = (),
) -> VmInfo:
    return VmInfo(
        uuid=uuid,
        name=name,
        ref=ref,
        datacenter=datacenter,
        power_state=power_state,
        cbt_enabled=cbt_enabled,
        disks=disks,
        snapshots=snapshots,
    )


def result(disk_key: int, **changes: object) -> DiskResult:
    base = DiskResult(
        disk_key=disk_key,
        mode="incremental",
        reason=None,
        capacity=8 << 30,
        change_id_from="52 aa/6",
        change_id_to="52 aa/7",
        disk_uuid=f"6000C29{disk_key}",
        bytes_changed=3 << 20,
        bytes_read=3 << 20,
        bytes_uploaded=1 << 20,
        pack_bytes=2 << 20,
        blocks_new=4,
        blocks_dedup=2,
        blocks_zero=1,
        packs=1,
        chain=3,
        merkle_root="ab" * 32,
        manifest_key=f"manifests/s-1/r-1/{disk_key}",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def next_state(
    server_id: str, disk_key: int, change_id: str | None, run_id: str, chain: int = 1
) -> DiskStateRow:
    return DiskStateRow(
        server_id=server_id,
        disk_key=disk_key,
        disk_uuid=f"6000C29{disk_key}",
        capacity=8 << 30,
        change_id=change_id,
        last_run_id=run_id,
        chain_length=chain,
    )


def block(n: int, pack: str = "p-1", offset: int = 0, length: int = 4096) -> BlockRef:
    return BlockRef(block_id=n.to_bytes(32, "big"), pack_id=pack, offset=offset, length=length)


class _Fixture:
    @pytest.fixture
    def ports(self) -> StatePorts:
        raise NotImplementedError("a contract subclass must provide the `ports` fixture")


# -- Catalog ----------------------------------------------------------------------------


class CatalogContract(_Fixture):
    def test_upsert_adds_a_new_vm_with_its_fields(self, ports: StatePorts) -> None:
        snap = SnapshotInfo(ref="snapshot-9", name="before-upgrade")
        row = ports.catalog.upsert_server(vm(snapshots=(snap,)))
        assert row.id
        assert row.id != row.vm_uuid
        assert (row.vm_uuid, row.name, row.ref, row.datacenter) == (
            "4210aaaa-0001",
            "web-1",
            "vm-101",
            "dc1",
        )
        assert row.power_state == "poweredOn"
        assert row.cbt_enabled is True
        assert row.disks == [
            listed(2000, 8 << 30, cbt=True),
            listed(2001, 1 << 30, cbt=False),
        ]
        assert row.snapshots == [{"name": "before-upgrade", "ref": "snapshot-9"}]
        assert row.seen_at
        assert row.removed_at is None
        assert ports.catalog.server(row.id) == row

    def test_new_vms_get_distinct_ids(self, ports: StatePorts) -> None:
        a = ports.catalog.upsert_server(vm("u-a", "a"))
        b = ports.catalog.upsert_server(vm("u-b", "b"))
        assert a.id != b.id
        assert ports.catalog.server(a.id).vm_uuid == "u-a"
        assert ports.catalog.server(b.id).vm_uuid == "u-b"

    def test_upsert_of_a_known_uuid_keeps_its_id_and_refreshes_its_fields(
        self, ports: StatePorts
    ) -> None:
        first = ports.catalog.upsert_server(vm())
        again = ports.catalog.upsert_server(
            vm(
                name="web-1-renamed",
                ref="vm-202",
                datacenter="dc2",
                power_state="poweredOff",
                cbt_enabled=False,
                disks=(disk(2000, 16 << 30, None),),
                snapshots=(SnapshotInfo(ref="snapshot-3", name="s"),),
            )
        )
        assert again.id == first.id
        assert again.name == "web-1-renamed"
        assert (again.ref, again.datacenter, again.power_state) == ("vm-202", "dc2", "poweredOff")
        assert again.cbt_enabled is False
        assert again.disks == [listed(2000, 16 << 30, cbt=False)]
        assert again.snapshots == [{"name": "s", "ref": "snapshot-3"}]
        assert again.seen_at >= first.seen_at
        assert ports.catalog.server(first.id) == again
        assert [s.id for s in ports.catalog.servers()] == [first.id]

    def test_server_of_an_unknown_id_raises_not_found(self, ports: StatePorts) -> None:
        with pytest.raises(NotFoundError) as info:
            ports.catalog.server("s-0000000000000000")
        assert str(info.value) == "no server s-0000000000000000 in the catalog"

    def test_servers_are_listed_by_name(self, ports: StatePorts) -> None:
        assert ports.catalog.servers() == []
        for uuid, name in [("u-1", "zeta"), ("u-2", "alpha"), ("u-3", "mike")]:
            ports.catalog.upsert_server(vm(uuid, name))
        assert [s.name for s in ports.catalog.servers()] == ["alpha", "mike", "zeta"]

    def test_find_servers_by_uuid_name_or_id(self, ports: StatePorts) -> None:
        a = ports.catalog.upsert_server(vm("u-1", "db"))
        b = ports.catalog.upsert_server(vm("u-2", "db"))  # same name, another datacenter
        c = ports.catalog.upsert_server(vm("u-3", "web"))
        assert [s.id for s in ports.catalog.find_servers("u-1")] == [a.id]
        assert sorted(s.id for s in ports.catalog.find_servers("db")) == sorted([a.id, b.id])
        assert ports.catalog.find_servers(c.id) == [c]
        assert ports.catalog.find_servers("nothing") == []
        assert ports.catalog.find_servers("we") == []  # whole values only

    def test_mark_removed_stamps_the_absent_once_and_upsert_brings_them_back(
        self, ports: StatePorts
    ) -> None:
        a = ports.catalog.upsert_server(vm("u-1", "a"))
        b = ports.catalog.upsert_server(vm("u-2", "b"))
        ports.catalog.mark_removed({"u-1"})
        assert ports.catalog.server(a.id).removed_at is None
        removed_at = ports.catalog.server(b.id).removed_at
        assert removed_at is not None
        assert removed_at >= b.seen_at
        ports.catalog.mark_removed({"u-1"})
        assert ports.catalog.server(b.id).removed_at == removed_at  # the first removal stays
        back = ports.catalog.upsert_server(vm("u-2", "b"))
        assert back.id == b.id
        assert back.removed_at is None

    def test_mark_removed_with_no_vm_present_removes_every_server(self, ports: StatePorts) -> None:
        ports.catalog.upsert_server(vm("u-1", "a"))
        ports.catalog.upsert_server(vm("u-2", "b"))
        ports.catalog.mark_removed(set())
        assert all(s.removed_at is not None for s in ports.catalog.servers())

    def test_a_returned_row_is_a_copy(self, ports: StatePorts) -> None:
        row = ports.catalog.upsert_server(vm())
        row.name = "changed by the caller"
        row.disks.append({"key": 9})
        stored = ports.catalog.server(row.id)
        assert stored.name == "web-1"
        assert len(stored.disks) == 2

    def test_add_server_keeps_its_known_id_and_discovery_refreshes_it(
        self, ports: StatePorts
    ) -> None:
        added = ports.catalog.add_server("s-00000000000000aa", "4210aaaa-0001", "old-name")
        assert (added.id, added.vm_uuid, added.name) == (
            "s-00000000000000aa",
            "4210aaaa-0001",
            "old-name",
        )
        assert added.disks == [] and added.removed_at is None
        assert ports.catalog.find_servers("old-name") == [added]
        seen = ports.catalog.upsert_server(vm("4210aaaa-0001", "web-1"))
        assert seen.id == "s-00000000000000aa"
        assert seen.name == "web-1" and len(seen.disks) == 2
        assert [s.id for s in ports.catalog.servers()] == ["s-00000000000000aa"]

    def test_add_server_again_is_not_an_error_and_changes_nothing(self, ports: StatePorts) -> None:
        ports.catalog.add_server("s-1", "u-1", "a")
        seen = ports.catalog.upsert_server(vm("u-1", "renamed"))
        again = ports.catalog.add_server("s-1", "u-1", "a")
        assert again == seen
        assert again.name == "renamed"

    def test_add_server_refuses_an_id_or_uuid_of_another_server(self, ports: StatePorts) -> None:
        ports.catalog.add_server("s-1", "u-1", "a")
        with pytest.raises(ValueError, match="VM u-1 is server s-1 in the catalog, not server s-2"):
            ports.catalog.add_server("s-2", "u-1", "a")
        with pytest.raises(ValueError, match="server s-1 is VM u-1 in the catalog, not VM u-2"):
            ports.catalog.add_server("s-1", "u-2", "b")
        assert [(s.id, s.vm_uuid) for s in ports.catalog.servers()] == [("s-1", "u-1")]


# -- DiskStates (written by Runs.record_commit) ------------------------------------------


class DiskStatesContract(_Fixture):
    def test_an_unknown_disk_has_no_state(self, ports: StatePorts) -> None:
        assert ports.disk_states.disk_state("s-1", 2000) is None
        assert ports.disk_states.disk_states("s-1") == []

    def test_commit_writes_the_states_read_by_server_and_key(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        rows = [
            next_state("s-1", 2001, "52 bb/1", "r-1"),
            next_state("s-1", 2000, "52 aa/7", "r-1"),
            next_state("s-2", 2000, "52 cc/1", "r-1"),
        ]
        ports.runs.record_commit("r-1", rows, {})
        assert ports.disk_states.disk_state("s-1", 2000) == rows[1]
        assert ports.disk_states.disk_state("s-1", 2001) == rows[0]
        assert ports.disk_states.disk_state("s-1", 2002) is None
        assert ports.disk_states.disk_states("s-1") == [rows[1], rows[0]]  # by disk key
        assert ports.disk_states.disk_states("s-2") == [rows[2]]

    def test_a_state_without_change_id_round_trips(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        row = replace(next_state("s-1", 2000, None, "r-1", chain=0), disk_uuid=None)
        ports.runs.record_commit("r-1", [row], {})
        assert ports.disk_states.disk_state("s-1", 2000) == row

    def test_put_disk_state_sets_and_replaces_one_disks_state(self, ports: StatePorts) -> None:
        first = next_state("s-1", 2000, "52 aa/1", "r-1", chain=0)
        ports.disk_states.put_disk_state(first)
        ports.disk_states.put_disk_state(next_state("s-1", 2001, None, "r-1"))
        assert ports.disk_states.disk_state("s-1", 2000) == first
        later = next_state("s-1", 2000, "52 aa/2", "r-2", chain=1)
        ports.disk_states.put_disk_state(later)
        assert ports.disk_states.disk_states("s-1") == [
            later,
            next_state("s-1", 2001, None, "r-1"),
        ]

    def test_forget_disks_drops_only_that_servers_states(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        ports.runs.record_commit(
            "r-1",
            [
                next_state("s-1", 2000, "a", "r-1"),
                next_state("s-1", 2001, "b", "r-1"),
                next_state("s-2", 2000, "c", "r-1"),
            ],
            {},
        )
        ports.disk_states.forget_disks("s-1")
        assert ports.disk_states.disk_states("s-1") == []
        assert ports.disk_states.disk_state("s-1", 2000) is None
        assert [d.change_id for d in ports.disk_states.disk_states("s-2")] == ["c"]
        ports.disk_states.forget_disks("s-unknown")  # not an error


# -- Runs ---------------------------------------------------------------------------------


class RunsContract(_Fixture):
    def test_create_run_defaults_to_an_active_run_at_validate(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "incremental")
        run = ports.runs.run("r-1")
        assert (run.id, run.server_id, run.type) == ("r-1", "s-1", "incremental")
        assert run.state == RUN_ACTIVE
        assert run.stage == "validate"
        assert run.started_at
        assert run.finished_at is None
        assert run.error is None
        assert (run.snapshot_name, run.snapshot_ref) == (None, None)
        assert run.stats == {}
        assert run.disks == []

    @pytest.mark.parametrize("state", [RUN_MISSED, RUN_FAILED])
    def test_a_run_created_terminal_has_ended(self, ports: StatePorts, state: str) -> None:
        ports.runs.create_run("r-1", "s-1", "full", state=state, stage="queued", error="why")
        run = ports.runs.run("r-1")
        assert (run.state, run.stage, run.error) == (state, "queued", "why")
        assert run.finished_at is not None
        assert run.finished_at >= run.started_at

    def test_a_pending_run_has_not_ended(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full", state=RUN_PENDING, stage="queued")
        run = ports.runs.run("r-1")
        assert (run.state, run.stage, run.finished_at) == (RUN_PENDING, "queued", None)

    def test_run_of_an_unknown_id_raises_not_found(self, ports: StatePorts) -> None:
        with pytest.raises(NotFoundError) as info:
            ports.runs.run("r-missing")
        assert str(info.value) == "no run r-missing; list runs with `connector runs`"

    def test_set_stage_with_and_without_snapshot_fields(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        ports.runs.set_stage("r-1", "snapshot", snapshot_name="connector-r-1")
        run = ports.runs.run("r-1")
        assert (run.stage, run.snapshot_name, run.snapshot_ref) == (
            "snapshot",
            "connector-r-1",
            None,
        )
        ports.runs.set_stage("r-1", "changes", snapshot_ref="snapshot-42")
        run = ports.runs.run("r-1")
        assert (run.stage, run.snapshot_name, run.snapshot_ref) == (
            "changes",
            "connector-r-1",
            "snapshot-42",
        )
        ports.runs.set_stage("r-1", "transfer")  # keeps the snapshot fields
        run = ports.runs.run("r-1")
        assert (run.stage, run.snapshot_name, run.snapshot_ref) == (
            "transfer",
            "connector-r-1",
            "snapshot-42",
        )
        assert run.state == RUN_ACTIVE

    def test_record_disk_shows_results_by_key_and_replaces_a_disks_earlier_one(
        self, ports: StatePorts
    ) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        ports.runs.create_run("r-2", "s-1", "full")
        second = result(2001, mode="full", reason="new disk", change_id_from=None)
        first = result(2000)
        ports.runs.record_disk("r-1", second)
        ports.runs.record_disk("r-1", first)
        assert ports.runs.run("r-1").disks == [first, second]
        assert ports.runs.run("r-2").disks == []
        retried = result(2000, mode="compare", reason="retried", bytes_read=7, merkle_root=None)
        ports.runs.record_disk("r-1", retried)
        assert ports.runs.run("r-1").disks == [retried, second]

    def test_a_minimal_disk_result_round_trips(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        bare = DiskResult(
            disk_key=2000,
            mode="allocated",
            reason=None,
            capacity=1 << 40,
            change_id_from=None,
            change_id_to=None,
        )
        ports.runs.record_disk("r-1", bare)
        assert ports.runs.run("r-1").disks == [bare]

    def test_record_commit_writes_disk_states_and_stats_and_the_run_stays_active(
        self, ports: StatePorts
    ) -> None:
        ports.runs.create_run("r-1", "s-1", "incremental")
        ports.runs.create_run("r-2", "s-1", "incremental")
        ports.runs.record_commit("r-1", [next_state("s-1", 2000, "52 aa/1", "r-1")], {"old": 1})
        stats = {"bytes_uploaded": 1 << 20, "disks": {"2000": {"blocks": 3}}, "tags": ["a", "b"]}
        ports.runs.record_commit(
            "r-2",
            [next_state("s-1", 2000, "52 aa/2", "r-2", 2), next_state("s-1", 2001, "x", "r-2")],
            stats,
        )
        run = ports.runs.run("r-2")
        assert run.stats == stats
        assert run.state == RUN_ACTIVE
        assert run.finished_at is None
        assert ports.runs.run("r-1").stats == {"old": 1}
        assert ports.disk_states.disk_state("s-1", 2000) == next_state(
            "s-1", 2000, "52 aa/2", "r-2", 2
        )
        assert [d.disk_key for d in ports.disk_states.disk_states("s-1")] == [2000, 2001]

    def test_finish_run_completes_with_an_optional_note(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        ports.runs.create_run("r-2", "s-1", "full")
        ports.runs.set_stage("r-1", "cleanup")
        ports.runs.finish_run("r-1")
        ports.runs.finish_run("r-2", note="the snapshot could not be removed")
        one, two = ports.runs.run("r-1"), ports.runs.run("r-2")
        assert (one.state, one.stage, one.error) == (RUN_COMPLETED, "done", None)
        assert one.finished_at is not None
        assert one.finished_at >= one.started_at
        assert (two.state, two.error) == (RUN_COMPLETED, "the snapshot could not be removed")

    def test_fail_run_records_the_reason_and_keeps_the_stage(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        ports.runs.set_stage("r-1", "transfer")
        ports.runs.fail_run("r-1", "transfer: the store refused the write")
        run = ports.runs.run("r-1")
        assert (run.state, run.stage) == (RUN_FAILED, "transfer")
        assert run.error == "transfer: the store refused the write"
        assert run.finished_at is not None

    def test_end_run_ends_a_run_that_never_started(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full", state=RUN_PENDING, stage="queued")
        ports.runs.create_run("r-2", "s-1", "full", state=RUN_PENDING, stage="queued")
        ports.runs.end_run("r-1", RUN_MISSED, "run r-0 of this VM was still active")
        ports.runs.end_run("r-2", RUN_FAILED, None)
        one, two = ports.runs.run("r-1"), ports.runs.run("r-2")
        assert (one.state, one.error) == (RUN_MISSED, "run r-0 of this VM was still active")
        assert one.finished_at is not None
        assert (two.state, two.error) == (RUN_FAILED, None)
        assert two.finished_at is not None

    def test_mark_runs_deleted_changes_only_those_runs(self, ports: StatePorts) -> None:
        for run_id in ("r-1", "r-2", "r-3"):
            ports.runs.create_run(run_id, "s-1", "full")
            ports.runs.finish_run(run_id)
        finished = ports.runs.run("r-1").finished_at
        ports.runs.mark_runs_deleted({"r-1", "r-3", "r-unknown"})
        ports.runs.mark_runs_deleted(set())
        assert [r.state for r in ports.runs.runs()] == [RUN_DELETED, RUN_COMPLETED, RUN_DELETED]
        assert ports.runs.run("r-1").finished_at == finished

    def test_runs_are_oldest_first_and_filtered_by_server(self, ports: StatePorts) -> None:
        assert ports.runs.runs() == []
        for run_id, server in [("r-c", "s-1"), ("r-a", "s-2"), ("r-b", "s-1"), ("r-0", "s-2")]:
            ports.runs.create_run(run_id, server, "full")
        ports.runs.record_disk("r-b", result(2000))
        assert [r.id for r in ports.runs.runs()] == ["r-c", "r-a", "r-b", "r-0"]
        of_s1 = ports.runs.runs("s-1")
        assert [r.id for r in of_s1] == ["r-c", "r-b"]
        assert [r.disks for r in of_s1] == [[], [result(2000)]]
        assert [r.id for r in ports.runs.runs("s-2")] == ["r-a", "r-0"]
        assert ports.runs.runs("s-none") == []
        assert ports.runs.runs()[2] == ports.runs.run("r-b")

    def test_import_run_adds_a_run_as_given_with_its_disks(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-2", "s-1", "ON_DEMAND")
        imported = RunRow(
            id="r-1",
            server_id="s-1",
            type="AUTOMATIC",
            state=RUN_COMPLETED,
            stage="done",
            started_at="2026-11-30T06:00:00.000000Z",
            finished_at="2026-11-30T06:05:00.000000Z",
            error=None,
            snapshot_name="connector-r-1",
            snapshot_ref="snapshot-7",
            stats={"bytes_read": 5},
            disks=[result(2001), result(2000, mode="full", chain=0)],
        )
        assert ports.runs.import_run(imported) is True
        back = ports.runs.run("r-1")
        assert back == replace(imported, disks=[result(2000, mode="full", chain=0), result(2001)])
        assert [r.id for r in ports.runs.runs("s-1")] == ["r-1", "r-2"]  # by start time

    def test_import_run_of_a_known_id_changes_nothing(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "ON_DEMAND")
        before = ports.runs.run("r-1")
        other = replace(before, state=RUN_COMPLETED, disks=[result(2000)])
        assert ports.runs.import_run(other) is False
        assert ports.runs.run("r-1") == before

    def test_a_returned_run_is_a_copy(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        ports.runs.record_commit("r-1", [], {"n": 1})
        ports.runs.record_disk("r-1", result(2000))
        run = ports.runs.run("r-1")
        run.stats["n"] = 2
        run.disks[0].bytes_read = -1
        run.disks.append(result(2001))
        again = ports.runs.run("r-1")
        assert again.stats == {"n": 1}
        assert again.disks == [result(2000)]


# -- RunSteps ------------------------------------------------------------------------------


class RunStepsContract(_Fixture):
    def test_a_step_not_done_is_none(self, ports: StatePorts) -> None:
        assert ports.ledger.step("r-1", "commit") is None
        assert ports.ledger.step("r-1", "transfer", 2000) is None
        assert ports.ledger.steps("r-1", "transfer") == {}

    def test_step_done_then_step_returns_its_result(self, ports: StatePorts) -> None:
        ports.ledger.step_done("r-1", "commit", NO_DISK, {"commit_key": "commits/r-1"})
        ports.ledger.step_done("r-1", "transfer", 0, {"disk": 0})
        assert ports.ledger.step("r-1", "commit") == {"commit_key": "commits/r-1"}
        assert ports.ledger.step("r-1", "commit", NO_DISK) == {"commit_key": "commits/r-1"}
        assert ports.ledger.step("r-1", "transfer", 0) == {"disk": 0}
        assert ports.ledger.step("r-1", "transfer") is None  # not-per-disk is not disk 0
        assert ports.ledger.step("r-2", "commit") is None

    def test_step_done_again_replaces_the_result(self, ports: StatePorts) -> None:
        ports.ledger.step_done("r-1", "changes", 2000, {"mode": "incremental", "n": 1})
        ports.ledger.step_done("r-1", "changes", 2000, {"mode": "full"})
        assert ports.ledger.step("r-1", "changes", 2000) == {"mode": "full"}
        assert ports.ledger.steps("r-1", "changes") == {2000: {"mode": "full"}}

    def test_steps_of_a_stage_by_disk(self, ports: StatePorts) -> None:
        ports.ledger.step_done("r-1", "transfer", 2001, {"k": 2001})
        ports.ledger.step_done("r-1", "transfer", 2000, {"k": 2000})
        ports.ledger.step_done("r-1", "changes", 2000, {"other": "stage"})
        ports.ledger.step_done("r-2", "transfer", 2000, {"other": "run"})
        assert ports.ledger.steps("r-1", "transfer") == {2000: {"k": 2000}, 2001: {"k": 2001}}
        assert ports.ledger.steps("r-2", "transfer") == {2000: {"other": "run"}}
        assert ports.ledger.steps("r-1", "commit") == {}

    def test_results_come_back_as_json_values(self, ports: StatePorts) -> None:
        # What a resumed run reads: tuples become lists, nested values are kept.
        result = {"extents": [(0, 4096), (8192, 512)], "plan": {"mode": "full", "why": None}}
        ports.ledger.step_done("r-1", "changes", 2000, result)
        expected = {"extents": [[0, 4096], [8192, 512]], "plan": {"mode": "full", "why": None}}
        assert ports.ledger.step("r-1", "changes", 2000) == expected
        assert ports.ledger.steps("r-1", "changes") == {2000: expected}

    def test_a_result_is_stored_as_it_was_when_done(self, ports: StatePorts) -> None:
        result: dict[str, object] = {"items": [1]}
        ports.ledger.step_done("r-1", "changes", 2000, result)
        result["items"] = [1, 2]  # the caller's dict changes afterwards
        got = ports.ledger.step("r-1", "changes", 2000)
        assert got == {"items": [1]}
        assert got is not None
        got["items"].append(3)
        assert ports.ledger.step("r-1", "changes", 2000) == {"items": [1]}


# -- SideEffects ----------------------------------------------------------------------------


class SideEffectsContract(_Fixture):
    def test_snapshot_intent_records_a_pending_snapshot(self, ports: StatePorts) -> None:
        effect = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1")
        assert effect.run_id == "r-1"
        assert (effect.kind, effect.target, effect.name) == (SNAPSHOT, "u-1", "connector-r-1")
        assert effect.ref is None
        assert effect.detail == {}
        assert effect.state == "pending"
        assert effect.created_at
        assert ports.ledger.pending() == [effect]

    def test_snapshot_intent_is_recorded_once_while_pending(self, ports: StatePorts) -> None:
        first = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1")
        again = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1")
        assert again == first
        assert ports.ledger.pending(SNAPSHOT, "r-1") == [first]
        other_name = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1-b")
        other_run = ports.ledger.snapshot_intent("r-2", "u-1", "connector-r-1")
        assert len({first.id, other_name.id, other_run.id}) == 3

    def test_after_undone_an_intent_is_a_new_entry(self, ports: StatePorts) -> None:
        first = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1")
        ports.ledger.undone(first.id)
        second = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1")
        assert second.id != first.id
        assert second.ref is None
        assert ports.ledger.pending() == [second]

    def test_snapshot_created_records_the_ref_and_the_frozen_disks(self, ports: StatePorts) -> None:
        effect = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1")
        snap = SnapshotInfo(
            ref="snapshot-42",
            name="connector-r-1",
            disks=(disk(2000), replace(disk(2001, 1 << 30, None), independent=True, rdm=True)),
        )
        ports.ledger.snapshot_created(effect.id, snap)
        (got,) = ports.ledger.pending(SNAPSHOT)
        assert (got.id, got.ref, got.state) == (effect.id, "snapshot-42", "pending")
        assert got.created_at == effect.created_at
        assert got.snapshot() == snap
        # The intent of the same run and name is the created entry now.
        assert ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1") == got

    def test_undone_settles_an_effect_as_undone_or_done(self, ports: StatePorts) -> None:
        a = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1")
        b = ports.ledger.snapshot_intent("r-2", "u-2", "connector-r-2")
        c = ports.ledger.snapshot_intent("r-3", "u-3", "connector-r-3")
        ports.ledger.undone(a.id)
        ports.ledger.undone(c.id, EFFECT_DONE)
        assert ports.ledger.pending() == [b]
        ports.ledger.undone(10_000)  # an unknown effect: nothing to settle
        assert ports.ledger.pending() == [b]

    def test_snapshots_removed_settles_only_that_vms_pending_snapshots_of_those_names(
        self, ports: StatePorts
    ) -> None:
        mine = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1")
        kept_name = ports.ledger.snapshot_intent("r-2", "u-1", "connector-r-2")
        other_vm = ports.ledger.snapshot_intent("r-3", "u-2", "connector-r-1")
        ports.journal.upload_started("u-1", "connector-r-1")  # another kind, same target
        ports.ledger.snapshots_removed("u-1", [])
        assert len(ports.ledger.pending()) == 4
        ports.ledger.snapshots_removed("u-1", ["connector-r-1", "connector-r-9"])
        pending = ports.ledger.pending()
        assert mine not in pending
        assert [e.id for e in pending[:2]] == [kept_name.id, other_vm.id]
        assert [(e.kind, e.target, e.ref) for e in pending[2:]] == [
            (MULTIPART, "u-1", "connector-r-1")
        ]
        # A new intent of the removed name is a new entry, settled by the next sweep.
        again = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1")
        assert again.id != mine.id
        ports.ledger.snapshots_removed("u-1", ["connector-r-1"])
        assert again not in ports.ledger.pending()

    def test_pending_filters_by_kind_and_run_oldest_first(self, ports: StatePorts) -> None:
        s2 = ports.ledger.snapshot_intent("r-2", "u-2", "connector-r-2")
        ports.journal.upload_started("packs/00/aa", "up-1")
        s1 = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1")
        s1b = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1-retry")
        ports.journal.upload_started("packs/00/ab", "up-2")
        everything = ports.ledger.pending()
        assert [e.id for e in everything] == sorted(e.id for e in everything)
        assert [e.ref or e.name for e in everything] == [
            "connector-r-2",
            "up-1",
            "connector-r-1",
            "connector-r-1-retry",
            "up-2",
        ]
        assert ports.ledger.pending(SNAPSHOT) == [s2, s1, s1b]
        assert [e.ref for e in ports.ledger.pending(MULTIPART)] == ["up-1", "up-2"]
        assert ports.ledger.pending(run_id="r-1") == [s1, s1b]
        assert ports.ledger.pending(SNAPSHOT, "r-2") == [s2]
        assert ports.ledger.pending(MULTIPART, "r-1") == []
        assert ports.ledger.pending(run_id="r-none") == []

    def test_a_returned_effect_detail_is_a_copy(self, ports: StatePorts) -> None:
        effect = ports.ledger.snapshot_intent("r-1", "u-1", "connector-r-1")
        ports.ledger.snapshot_created(effect.id, SnapshotInfo("snapshot-1", "n", (disk(2000),)))
        (got,) = ports.ledger.pending()
        got.detail["disks"].clear()
        (again,) = ports.ledger.pending()
        assert len(again.detail["disks"]) == 1


# -- UploadJournal ----------------------------------------------------------------------------


class UploadJournalContract(_Fixture):
    def test_an_upload_started_is_pending_until_it_ends(self, ports: StatePorts) -> None:
        ports.journal.upload_started("packs/00/aa", "up-1")
        (effect,) = ports.ledger.pending(MULTIPART)
        assert effect.run_id is None
        assert (effect.kind, effect.target, effect.ref) == (MULTIPART, "packs/00/aa", "up-1")
        assert effect.name is None
        assert effect.state == "pending"
        assert effect.detail == {}
        assert ports.ledger.pending(SNAPSHOT) == []
        ports.journal.upload_ended("packs/00/aa", "up-1")
        assert ports.ledger.pending() == []

    def test_upload_ended_settles_only_that_upload(self, ports: StatePorts) -> None:
        ports.journal.upload_started("packs/00/aa", "up-1")
        ports.journal.upload_started("packs/00/aa", "up-2")  # the same key, uploaded again
        ports.journal.upload_started("packs/00/ab", "up-1")
        ports.journal.upload_ended("packs/00/aa", "up-1")
        assert [(e.target, e.ref) for e in ports.ledger.pending(MULTIPART)] == [
            ("packs/00/aa", "up-2"),
            ("packs/00/ab", "up-1"),
        ]
        ports.journal.upload_ended("packs/00/zz", "up-9")  # never started: nothing happens
        assert len(ports.ledger.pending(MULTIPART)) == 2

    def test_an_aborted_upload_settled_by_recovery_stays_settled(self, ports: StatePorts) -> None:
        ports.journal.upload_started("packs/00/aa", "up-1")
        (effect,) = ports.ledger.pending(MULTIPART)
        ports.ledger.undone(effect.id)
        assert ports.ledger.pending(MULTIPART) == []
        ports.journal.upload_ended("packs/00/aa", "up-1")
        assert ports.ledger.pending(MULTIPART) == []


# -- RunControls -----------------------------------------------------------------------------


class RunControlsContract(_Fixture):
    def test_ensure_control_creates_a_fresh_control_once(self, ports: StatePorts) -> None:
        assert ports.controls.control("r-1") is None
        ctl = ports.controls.ensure_control("r-1", "j-1")
        assert (ctl.run_id, ctl.job_id, ctl.seq, ctl.attempts) == ("r-1", "j-1", 0, 0)
        assert (ctl.host, ctl.failed_stage, ctl.failure) == (None, None, None)
        assert (ctl.progress_done, ctl.progress_total, ctl.detail) == (0, 0, "")
        assert ctl.updated_at
        assert ports.controls.control("r-1") == ctl
        ports.controls.advance("r-1")
        again = ports.controls.ensure_control("r-1", "j-other")
        assert (again.job_id, again.seq) == ("j-1", 1)  # the existing control, unchanged
        assert ports.controls.ensure_control("r-2").job_id is None

    def test_advance_moves_the_token_on(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        assert ports.controls.advance("r-1") == 1  # creates the control
        assert ports.controls.advance("r-1") == 2
        ctl = ports.controls.control("r-1")
        assert ctl is not None
        assert ctl.seq == 2
        assert ports.runs.run("r-1").stage == "validate"  # no stage given: unchanged
        assert ports.controls.advance("r-other") == 1  # each run has its own token

    def test_advance_to_a_new_stage_resets_attempts_and_detail_and_moves_the_run(
        self, ports: StatePorts
    ) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        ports.controls.ensure_control("r-1", "j-1")
        ports.controls.advance("r-1", attempts=2)
        ports.controls.set_progress("r-1", 5, 10, "transfer: 5 of 10 GiB")
        ctl = ports.controls.control("r-1")
        assert ctl is not None
        assert (ctl.attempts, ctl.detail) == (2, "transfer: 5 of 10 GiB")
        seq = ports.controls.advance("r-1", stage="commit")
        ctl = ports.controls.control("r-1")
        assert ctl is not None
        assert (ctl.seq, seq, ctl.attempts, ctl.detail) == (2, 2, 0, "")
        assert ctl.job_id == "j-1"
        run = ports.runs.run("r-1")
        assert (run.stage, run.state) == ("commit", RUN_ACTIVE)

    def test_advance_without_a_stage_keeps_attempts_and_detail(self, ports: StatePorts) -> None:
        ports.controls.advance("r-1", attempts=3)
        ports.controls.set_progress("r-1", 0, 0, "waiting for a free slot")
        ports.controls.advance("r-1")
        ctl = ports.controls.control("r-1")
        assert ctl is not None
        assert (ctl.seq, ctl.attempts, ctl.detail) == (2, 3, "waiting for a free slot")

    def test_advance_with_attempts_and_a_stage_sets_the_attempts(self, ports: StatePorts) -> None:
        ports.controls.advance("r-1", stage="transfer", attempts=4)
        ctl = ports.controls.control("r-1")
        assert ctl is not None
        assert ctl.attempts == 4

    def test_advance_admits_a_pending_run(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full", state=RUN_PENDING, stage="queued")
        seq = ports.controls.advance("r-1", stage="validate", state=RUN_ACTIVE, host="esx-1")
        assert seq == 1
        run = ports.runs.run("r-1")
        assert (run.state, run.stage, run.finished_at) == (RUN_ACTIVE, "validate", None)
        ctl = ports.controls.control("r-1")
        assert ctl is not None
        assert ctl.host == "esx-1"
        ports.controls.advance("r-1")  # no host given: kept
        ctl = ports.controls.control("r-1")
        assert ctl is not None
        assert ctl.host == "esx-1"

    def test_advance_of_a_state_only_keeps_the_stage(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "full")
        ports.runs.set_stage("r-1", "transfer")
        ports.controls.advance("r-1", state=RUN_PENDING)
        run = ports.runs.run("r-1")
        assert (run.state, run.stage) == (RUN_PENDING, "transfer")

    def test_set_failure_records_the_failed_stage_and_reason(self, ports: StatePorts) -> None:
        ports.controls.set_failure("r-1", "transfer", "transfer: the disk could not be read")
        ctl = ports.controls.control("r-1")  # created when missing
        assert ctl is not None
        assert (ctl.failed_stage, ctl.failure) == (
            "transfer",
            "transfer: the disk could not be read",
        )
        assert ctl.seq == 0
        ports.controls.advance("r-1", attempts=0)
        ctl = ports.controls.control("r-1")
        assert ctl is not None
        assert ctl.failure == "transfer: the disk could not be read"  # until the rollback ends

    def test_set_progress_updates_the_control(self, ports: StatePorts) -> None:
        before = ports.controls.ensure_control("r-1")
        ports.controls.set_progress("r-1", 3 << 30, 8 << 30, "transfer: disk 2000")
        ctl = ports.controls.control("r-1")
        assert ctl is not None
        assert (ctl.progress_done, ctl.progress_total) == (3 << 30, 8 << 30)
        assert ctl.detail == "transfer: disk 2000"
        assert ctl.seq == before.seq
        assert ctl.updated_at >= before.updated_at

    def test_controls_of_several_runs(self, ports: StatePorts) -> None:
        assert ports.controls.controls([]) == {}
        ports.controls.ensure_control("r-1", "j-1")
        ports.controls.advance("r-2")
        got = ports.controls.controls(["r-1", "r-2", "r-3"])
        assert set(got) == {"r-1", "r-2"}
        assert got["r-1"] == ports.controls.control("r-1")
        assert got["r-2"].seq == 1
        assert ports.controls.controls(["r-3"]) == {}


# -- BlockIndex and PackRecords ----------------------------------------------------------------


class BlockStoreContract(_Fixture):
    def test_lookup_of_an_unknown_block_is_none(self, ports: StatePorts) -> None:
        assert ports.blocks.lookup(block(1).block_id) is None
        ports.blocks.add([])
        assert ports.blocks.lookup(block(1).block_id) is None

    def test_add_then_lookup(self, ports: StatePorts) -> None:
        refs = [block(1, "p-1", 0, 4096), block(2, "p-1", 4096, 100), block(3, "p-2", 0, 1)]
        ports.blocks.add(refs)
        for ref in refs:
            assert ports.blocks.lookup(ref.block_id) == ref
        assert ports.blocks.lookup(block(4).block_id) is None

    def test_lookup_many_answers_a_batch_in_one_call(self, ports: StatePorts) -> None:
        assert ports.blocks.lookup_many([]) == {}
        refs = [block(n, f"p-{n % 3}", n * 10, 100 + n) for n in range(1200)]  # over CHUNK
        ports.blocks.add(refs)
        asked = [r.block_id for r in refs[::2]] + [block(n).block_id for n in range(5000, 5010)]
        got = ports.blocks.lookup_many(asked + asked[:3])  # an id twice is not an error
        assert got == {r.block_id: r for r in refs[::2]}  # unknown ids are left out
        assert ports.blocks.lookup_many([block(9999).block_id]) == {}
        # the first ref of a block wins here too
        ports.blocks.add([block(1, "p-9", 7)])
        assert ports.blocks.lookup_many([block(1).block_id]) == {block(1).block_id: refs[1]}
        # forgotten packs are not found
        ports.blocks.forget_blocks_in_packs({"p-0"})
        found = ports.blocks.lookup_many([r.block_id for r in refs[:6]])
        assert set(found) == {refs[n].block_id for n in (1, 2, 4, 5)}

    def test_the_first_ref_of_a_block_wins(self, ports: StatePorts) -> None:
        ports.blocks.add([block(1, "p-1", 0)])
        ports.blocks.add([block(1, "p-2", 512), block(2, "p-2", 0)])  # not an error
        assert ports.blocks.lookup(block(1).block_id) == block(1, "p-1", 0)
        assert ports.blocks.lookup(block(2).block_id) == block(2, "p-2", 0)
        ports.blocks.add([block(3, "p-3", 0), block(3, "p-4", 8)])  # twice in one batch
        assert ports.blocks.lookup(block(3).block_id) == block(3, "p-3", 0)

    def test_concurrent_writers_may_add_the_same_blocks(self, ports: StatePorts) -> None:
        # Disks are packed in parallel; neither writer may fail for a shared block.
        errors: list[BaseException] = []

        def writer(pack: str) -> None:
            try:
                for start in range(0, 40, 10):
                    ports.blocks.add([block(n, pack, n * 10) for n in range(start, start + 10)])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(f"p-{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        for n in range(40):
            ref = ports.blocks.lookup(block(n).block_id)
            assert ref is not None
            assert ref.pack_id in {"p-0", "p-1", "p-2", "p-3"}
            assert ref.offset == n * 10

    def test_packs_of_runs(self, ports: StatePorts) -> None:
        ports.blocks.record_pack("p-1", 1000, "r-1")
        ports.blocks.record_pack("p-2", 2000, "r-1")
        ports.blocks.record_pack("p-3", 3000, "r-2")
        ports.blocks.record_pack("p-4", 4000, None)  # written outside a run
        assert ports.blocks.packs_of_runs({"r-1"}) == {"p-1", "p-2"}
        assert ports.blocks.packs_of_runs({"r-1", "r-2", "r-9"}) == {"p-1", "p-2", "p-3"}
        assert ports.blocks.packs_of_runs({"r-9"}) == set()
        assert ports.blocks.packs_of_runs(set()) == set()

    def test_forget_blocks_in_packs_keeps_the_pack_records(self, ports: StatePorts) -> None:
        ports.blocks.record_pack("p-1", 1000, "r-1")
        ports.blocks.record_pack("p-2", 2000, "r-2")
        ports.blocks.add([block(1, "p-1"), block(2, "p-1", 4096), block(3, "p-2")])
        ports.blocks.forget_blocks_in_packs({"p-1", "p-unknown"})
        assert ports.blocks.lookup(block(1).block_id) is None
        assert ports.blocks.lookup(block(2).block_id) is None
        assert ports.blocks.lookup(block(3).block_id) == block(3, "p-2")
        assert ports.blocks.packs_of_runs({"r-1", "r-2"}) == {"p-1", "p-2"}
        # A new run stores the block again and deduplicates against its new place.
        ports.blocks.add([block(1, "p-5", 64)])
        assert ports.blocks.lookup(block(1).block_id) == block(1, "p-5", 64)
        ports.blocks.forget_blocks_in_packs(set())
        assert ports.blocks.lookup(block(3).block_id) == block(3, "p-2")

    def test_forget_packs_drops_their_blocks_and_records(self, ports: StatePorts) -> None:
        ports.blocks.record_pack("p-1", 1000, "r-1")
        ports.blocks.record_pack("p-2", 2000, "r-1")
        ports.blocks.add([block(1, "p-1"), block(2, "p-2")])
        ports.blocks.forget_packs({"p-1"})
        assert ports.blocks.lookup(block(1).block_id) is None
        assert ports.blocks.lookup(block(2).block_id) == block(2, "p-2")
        assert ports.blocks.packs_of_runs({"r-1"}) == {"p-2"}
        ports.blocks.forget_packs(set())
        assert ports.blocks.packs_of_runs({"r-1"}) == {"p-2"}
        # The id of a forgotten pack may be recorded again.
        ports.blocks.record_pack("p-1", 10, "r-3")
        assert ports.blocks.packs_of_runs({"r-3"}) == {"p-1"}


# -- RetentionSettings -------------------------------------------------------------------------


class RetentionContract(_Fixture):
    def test_retention_set_replace_and_clear(self, ports: StatePorts) -> None:
        assert ports.retention.retention_settings() == {}
        ports.retention.set_retention("s-1", 7)
        ports.retention.set_retention("s-2", 0)  # keep all: a setting, not the default
        assert ports.retention.retention_settings() == {"s-1": 7, "s-2": 0}
        ports.retention.set_retention("s-1", 3)
        assert ports.retention.retention_settings() == {"s-1": 3, "s-2": 0}
        ports.retention.set_retention("s-2", None)
        assert ports.retention.retention_settings() == {"s-1": 3}
        ports.retention.set_retention("s-9", None)  # no setting to clear: not an error
        assert ports.retention.retention_settings() == {"s-1": 3}

    def test_the_settings_returned_are_a_copy(self, ports: StatePorts) -> None:
        ports.retention.set_retention("s-1", 7)
        ports.retention.retention_settings()["s-1"] = 1
        assert ports.retention.retention_settings() == {"s-1": 7}


def _together(n: int, work) -> list[object]:
    """Run `work(i)` in n threads at once; their results, or the first error raised."""
    results: list[object] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


class AtomicityContract(_Fixture):
    """Writes that read first stay right when writers race (threads here; connectors of
    a fleet on PostgreSQL, which the same locks serve)."""

    def test_concurrent_advances_each_get_their_own_token(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-1", "s-1", "ON_DEMAND")
        seqs = _together(8, lambda _i: ports.controls.advance("r-1"))
        assert sorted(int(str(s)) for s in seqs) == list(
            range(1, 9)
        )  # no two advances read the same seq
        ctl = ports.controls.control("r-1")
        assert ctl is not None and ctl.seq == 8

    def test_concurrent_ensure_control_makes_one_control(self, ports: StatePorts) -> None:
        ctls = _together(6, lambda _i: ports.controls.ensure_control("r-2", "j-1"))
        assert {c.run_id for c in ctls} == {"r-2"}  # type: ignore[attr-defined]
        assert ports.controls.controls(["r-2"])["r-2"].seq == 0

    def test_concurrent_snapshot_intents_record_one_snapshot(self, ports: StatePorts) -> None:
        effects = _together(
            6, lambda _i: ports.ledger.snapshot_intent("r-3", "uuid-3", "connector-r-3")
        )
        assert len({e.id for e in effects}) == 1  # type: ignore[attr-defined]
        assert len(ports.ledger.pending("snapshot", "r-3")) == 1

    def test_concurrent_step_done_of_one_step_keeps_one_result(self, ports: StatePorts) -> None:
        _together(6, lambda i: ports.ledger.step_done("r-4", "transfer", 2000, {"by": i}))
        steps = ports.ledger.steps("r-4", "transfer")
        assert list(steps) == [2000]
        assert steps[2000]["by"] in range(6)

    def test_concurrent_upserts_of_one_vm_make_one_server(self, ports: StatePorts) -> None:
        rows = _together(6, lambda _i: ports.catalog.upsert_server(vm("uuid-5", "db-5")))
        assert len({r.id for r in rows}) == 1  # type: ignore[attr-defined]
        assert len(ports.catalog.find_servers("uuid-5")) == 1

    def test_concurrent_disk_results_of_one_disk_keep_one(self, ports: StatePorts) -> None:
        ports.runs.create_run("r-6", "s-6", "ON_DEMAND")
        _together(6, lambda i: ports.runs.record_disk("r-6", result(2000, bytes_read=i)))
        disks = ports.runs.run("r-6").disks
        assert [d.disk_key for d in disks] == [2000]


class StateContract(
    AtomicityContract,
    CatalogContract,
    DiskStatesContract,
    RunsContract,
    RunStepsContract,
    SideEffectsContract,
    UploadJournalContract,
    RunControlsContract,
    BlockStoreContract,
    RetentionContract,
):
    """Every state port's contract, over one `ports` fixture."""


# -- landings ---------------------------------------------------------------------------


class LandingsContract:
    """The Landings port: ids recorded, states moved, read back in run order.

    Override the `landings` fixture with a fresh, empty implementation.
    """

    @pytest.fixture
    def landings(self) -> Landings:
        raise NotImplementedError

    def test_a_landing_records_its_snapshots_and_its_image(self, landings: Landings) -> None:
        assert landings.landing("r-2") is None
        row = landings.start_landing("r-2", "s-1", "connector-s-1-r-2")
        assert (row.state, row.image_id, row.disks) == (LANDING_ACTIVE, None, [])
        landings.record_snapshot(LandedDisk("r-2", 2001, "snap-b", SNAP_STARTED, "t2", None, 5))
        landings.record_snapshot(LandedDisk("r-2", 2000, "snap-a", SNAP_STARTED, "t1", "p", 7))
        landings.set_snapshot_state("r-2", 2000, SNAP_COMPLETED, blocks_sent=3)
        landings.set_attempt("r-2", 1)
        landings.record_image("r-2", "ami-1")
        landings.end_landing("r-2", LANDING_LANDED)
        got = landings.landing("r-2")
        assert got is not None
        assert (got.state, got.image_id, got.attempt, got.error) == (
            LANDING_LANDED,
            "ami-1",
            1,
            None,
        )
        assert got.finished_at is not None
        assert [(d.disk_key, d.snapshot_id, d.state, d.blocks_sent) for d in got.disks] == [
            (2000, "snap-a", SNAP_COMPLETED, 3),
            (2001, "snap-b", SNAP_STARTED, 0),
        ]
        assert got.snapshot_ids() == ["snap-a", "snap-b"]

    def test_a_snapshot_record_replaces_the_earlier_one(self, landings: Landings) -> None:
        landings.start_landing("r-1", "s-1", "n")
        landings.record_snapshot(LandedDisk("r-1", 2000, "snap-a", SNAP_STARTED, "t0", None, 5))
        landings.record_snapshot(LandedDisk("r-1", 2000, "snap-b", SNAP_STARTED, "t1", None, 5))
        got = landings.landing("r-1")
        assert got is not None and [d.snapshot_id for d in got.disks] == ["snap-b"]

    def test_starting_again_keeps_the_ids_and_makes_it_active(self, landings: Landings) -> None:
        landings.start_landing("r-1", "s-1", "n")
        landings.record_image("r-1", "ami-9")
        landings.end_landing("r-1", LANDING_FAILED, "throttled")
        row = landings.start_landing("r-1", "s-1", "n")
        assert (row.state, row.error, row.image_id) == (LANDING_ACTIVE, None, "ami-9")

    def test_landings_are_by_run_and_by_server(self, landings: Landings) -> None:
        landings.start_landing("r-3", "s-2", "c")
        landings.start_landing("r-1", "s-1", "a")
        landings.start_landing("r-2", "s-1", "b")
        assert [r.run_id for r in landings.landings()] == ["r-1", "r-2", "r-3"]
        assert [r.run_id for r in landings.landings("s-1")] == ["r-1", "r-2"]
