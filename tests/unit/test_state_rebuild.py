"""The state rebuilt from the replica store over the in-memory state fakes: the runs,
chains and disk states of a long history, from new and from older commit records."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from connector.application.rebuild import UNKNOWN_TYPE, StateRebuild
from connector.domain.records import DiskResult, RunRow
from connector.fakestate import MemoryState
from connector.pipeline.commit import MAX_CHAIN
from tests.unit.fake_store import Env, MiB, make_env

RUNS = MAX_CHAIN + 3  # past a chain reset: the 17th manifest is full again


def history(tmp_path: Path) -> tuple[Env, str, list[RunRow]]:
    env = make_env(tmp_path)
    uuid = env.hv.add_vm("web", [4 * MiB, 2 * MiB])
    rng = random.Random(3)
    for _ in range(RUNS):
        env.write_blocks(uuid, {rng.randrange(4): rng.randbytes(4096)}, key=2000)
        env.replicate(uuid)
    return env, uuid, env.state.runs()


def rebuild_into(env: Env, state: MemoryState) -> StateRebuild:
    return StateRebuild(
        open_repo=env.repo,
        store_exists=lambda: env.objects.stat("config") is not None,
        catalog=state,
        disks=state,
        runs=state,
        blocks=state,
    )


def test_a_long_history_rebuilds_with_its_chains_and_last_disk_states(tmp_path: Path) -> None:
    env, uuid, runs = history(tmp_path)
    assert [d.chain for r in runs for d in r.disks if d.disk_key == 2000][MAX_CHAIN:] == [
        MAX_CHAIN,
        0,
        1,
    ]
    fresh = MemoryState()
    rebuild = rebuild_into(env, fresh)
    assert rebuild.needed()
    report = rebuild.rebuild()
    assert (report.servers_added, report.runs_added, report.disks) == (1, RUNS, 2)
    assert report.faults == [] and report.unnamed == []
    assert not rebuild.needed()
    (server,) = fresh.servers()
    assert (server.id, server.vm_uuid, server.name) == (runs[0].server_id, uuid, "web")
    rebuilt = fresh.runs()
    assert [replace(r, finished_at=None) for r in rebuilt] == [
        replace(r, finished_at=None) for r in runs
    ]
    assert fresh.disk_states(server.id) == env.state.disk_states(server.id)
    # the last run's blocks are in the index, where the next run deduplicates
    last = env.repo().read_manifest(server.id, runs[-1].id, 2000)
    for ref in env.repo().resolve_map(last).values():
        assert ref is not None and fresh.lookup(ref.block_id) == ref


def test_commits_without_results_rebuild_chains_from_the_manifests(tmp_path: Path) -> None:
    env, _uuid, runs = history(tmp_path)
    repo = env.repo()
    server_id = runs[0].server_id
    for run in runs:
        commit = repo.read_commit(server_id, run.id)
        del commit["type"], commit["started_at"]
        for disk in commit["disks"]:
            del disk["result"]
        repo.write_commit(server_id, run.id, commit)
    repo.delete_server(server_id)
    fresh = MemoryState()
    report = rebuild_into(env, fresh).rebuild()
    assert report.unnamed == [server_id] and report.faults == []
    (server,) = fresh.servers()
    assert (server.id, server.vm_uuid, server.name) == (
        server_id,
        f"unknown:{server_id}",
        server_id,
    )

    def known(d: DiskResult) -> tuple[object, ...]:
        return (d.disk_key, d.mode, d.reason, d.change_id_to, d.disk_uuid, d.chain, d.merkle_root)

    rebuilt = fresh.runs()
    assert [r.id for r in rebuilt] == [r.id for r in runs]
    assert {r.type for r in rebuilt} == {UNKNOWN_TYPE}
    assert [[known(d) for d in r.disks] for r in rebuilt] == [
        [known(d) for d in r.disks] for r in runs
    ]
    assert fresh.disk_states(server_id) == env.state.disk_states(server_id)


def test_a_later_run_in_the_store_replaces_an_older_disk_state_not_the_reverse(
    tmp_path: Path,
) -> None:
    env, uuid, runs = history(tmp_path)
    server_id = runs[0].server_id
    state = MemoryState()
    latest = env.state.disk_states(server_id)
    older = [replace(d, last_run_id=runs[0].id, change_id="52 old/1") for d in latest]
    state.add_server(server_id, uuid, "web")
    for row in older:
        state.put_disk_state(row)
    report = rebuild_into(env, state).rebuild()
    assert report.faults == [] and report.disks == 2
    assert state.disk_states(server_id) == latest
    newer = [replace(d, last_run_id="r-99991231T000000000Z-ffffffff") for d in latest]
    for row in newer:
        state.put_disk_state(row)
    report = rebuild_into(env, state).rebuild()
    assert report.disks == 0 and report.runs_added == 0
    assert state.disk_states(server_id) == newer


def test_a_manifest_chain_that_loops_is_a_fault_of_its_run_in_the_rebuild(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    uuid = env.hv.add_vm("loops", [4 * MiB])
    runs = []
    for seed in (1, 2):
        env.write_blocks(uuid, {seed: random.Random(seed).randbytes(MiB)})
        runs.append(env.replicate(uuid))
    repo = env.repo()
    for run in runs:  # without results, the chains come from the manifests
        commit = repo.read_commit(run.server_id, run.id)
        for disk in commit["disks"]:
            del disk["result"]
        repo.write_commit(run.server_id, run.id, commit)
    last = runs[-1]
    manifest = repo.read_manifest(last.server_id, last.id, 2000)
    repo.write_manifest(replace(manifest, base_run=last.id))
    report = rebuild_into(env, MemoryState()).rebuild()
    assert report.faults == [
        f"run {last.id} of server {last.server_id}: the manifest chain of disk 2000 loops"
    ]
