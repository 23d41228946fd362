"""Retention, run locks and the two-phase pack purge, on the in-memory fakes."""

from __future__ import annotations

import datetime as dt
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from connector.adapters.state import RunRow
from connector.errors import IntegrityError, NotFoundError, PermanentError
from connector.pipeline.purge import (
    PurgeSettings,
    apply_retention,
    collect_garbage,
    purge,
    remove_server,
)
from connector.store.repository import RunLock, commit_key, manifest_key
from tests.unit.fake_store import Env, MiB, PauseAfterFirstPack, make_env

# Runs that hold locks in these tests (the store refuses ids of another shape).
DEAD_RUN = "r-20260101T000000000Z-0000dead"
OLD_RUN = "r-20260101T000000000Z-0000001d"
BUSY_RUN = "r-20260101T000000000Z-0000b05e"
NEXT_RUN = "r-20260101T000000000Z-0000000e"
LIVE_RUN = "r-20260101T000000000Z-000001fe"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def blocks(rng: random.Random, *indices: int) -> dict[int, bytes]:
    return {i: rng.randbytes(MiB) for i in indices}


def test_a_run_holds_a_lock_while_it_runs_and_drops_it_after(env: Env) -> None:
    uuid = env.hv.add_vm("app", [8 * MiB])
    env.write_blocks(uuid, blocks(random.Random(1), 0, 1))
    seen: list[list[str]] = []
    env.objects.after_put = lambda key: seen.append(
        [k for k in env.objects.objects if k.startswith("locks/")]
    )
    run = env.replicate(uuid)
    assert all(locks == [f"locks/{run.id}"] for locks in seen[1:])  # [0] is the lock itself
    assert not [k for k in env.objects.objects if k.startswith("locks/")]

    # a failed run drops its lock too
    def boom(key: str) -> None:
        if key.startswith("packs/"):
            raise RuntimeError("store is gone")

    env.write_blocks(uuid, blocks(random.Random(2), 3))
    env.objects.after_put = boom
    with pytest.raises(RuntimeError):
        env.rep.replicate(uuid)
    assert not [k for k in env.objects.objects if k.startswith("locks/")]


def test_the_lock_of_a_killed_run_goes_with_its_leftover_snapshot(env: Env) -> None:
    uuid = env.hv.add_vm("app", [8 * MiB])
    env.write_blocks(uuid, blocks(random.Random(1), 0))
    first = env.replicate(uuid)
    # a run killed mid-way leaves its snapshot and its lock behind
    killed = "r-20260101T000000000Z-0badc0de"
    env.hv.create_snapshot(uuid, f"connector-{killed}", "")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    env.repo().write_lock(RunLock(killed, first.server_id, now, "elsewhere", 7))
    other = "r-20260101T000000000Z-00c0ffee"  # a live run of another VM keeps its lock
    env.repo().write_lock(RunLock(other, "s-other", now, "elsewhere", 8))
    env.write_blocks(uuid, blocks(random.Random(2), 1))
    env.replicate(uuid)
    assert env.repo().lock_ids() == [other]


def test_dry_run_counts_only_what_a_purge_would_delete_now(env: Env) -> None:
    _uuid, runs, _ = three_runs(env)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    env.repo().write_lock(RunLock(LIVE_RUN, "s-other", now, "elsewhere", 8))
    dry = purge(env.repo(), env.state, {runs[0].server_id: 1}, PurgeSettings(dry_run=True))
    assert dry.retention[0].deleted == [runs[0].id, runs[1].id]
    assert dry.gc.deleted == []  # a run is in flight: condemned packs would wait
    real = purge(env.repo(), env.state, {runs[0].server_id: 1})
    assert real.gc.deleted == [] and len(real.gc.condemned) == 2


def test_lock_is_sealed_and_names_the_runs_it_builds_on(env: Env) -> None:
    uuid = env.hv.add_vm("app", [8 * MiB])
    env.write_blocks(uuid, blocks(random.Random(1), 0))
    first = env.replicate(uuid)
    env.write_blocks(uuid, blocks(random.Random(2), 1))
    locks: list[RunLock] = []
    raw: list[bytes] = []

    def grab(key: str) -> None:
        if key.startswith("packs/"):
            repo = env.repo()
            locks.extend(repo.read_lock(i) for i in repo.lock_ids())
            raw.extend(v for k, v in env.objects.objects.items() if k.startswith("locks/"))

    env.objects.after_put = grab
    second = env.replicate(uuid)
    (lock,) = locks
    assert lock.run_id == second.id and lock.base_runs == (first.id,)
    assert lock.server_id == second.server_id
    (blob,) = raw  # sealed: neither the server id nor the host is readable
    assert second.server_id.encode() not in blob and lock.host.encode() not in blob


def three_runs(env: Env) -> tuple[str, list[RunRow], list[str]]:
    """Runs 1-3 rewrite blocks 0 and 1: each run's pack is unique to it."""
    rng = random.Random(3)
    uuid = env.hv.add_vm("web", [8 * MiB])
    runs, shas = [], []
    for _ in range(3):
        before = env.packs()
        env.write_blocks(uuid, blocks(rng, 0, 1))
        runs.append(env.replicate(uuid))
        shas.append(env.disk_sha(uuid))
        assert len(env.packs() - before) == 1
    for run, sha in zip(runs, shas, strict=True):
        assert env.restore_sha(run) == sha
    return uuid, runs, shas


def test_retention_keeps_the_newest_and_purge_frees_the_others_packs(env: Env) -> None:
    uuid, runs, shas = three_runs(env)
    server = runs[0].server_id
    pack_of = {}
    for run in runs:
        pack_of[run.id] = env.state.packs_of_runs({run.id})
    report = purge(env.repo(), env.state, {server: 1})
    (ret,) = report.retention
    assert ret.deleted == [runs[0].id, runs[1].id] and ret.kept == [runs[2].id]
    # the commits are gone; the manifests stay as the bases of run 3's chain
    for run in runs[:2]:
        assert commit_key(server, run.id) not in env.objects.objects
        assert manifest_key(server, run.id, 2000) in env.objects.objects
    assert ret.bases == {runs[0].id: [runs[2].id], runs[1].id: [runs[2].id]}
    gc = report.gc
    assert set(gc.deleted) == pack_of[runs[0].id] | pack_of[runs[1].id]
    assert gc.bytes_freed > 4 * MiB
    assert env.packs() == pack_of[runs[2].id]
    assert not env.objects.objects.keys() & {k for k in env.objects.objects if "condemned/" in k}
    assert env.restore_sha(runs[2]) == shas[2]
    with pytest.raises(NotFoundError, match="not committed"):
        env.restore_sha(runs[0])
    states = {r.id: r.state for r in env.state.runs(server)}
    assert states == {runs[0].id: "DELETED", runs[1].id: "DELETED", runs[2].id: "COMPLETED"}
    # the index no longer points into deleted packs
    with env.state.engine.connect() as c:
        rows = c.exec_driver_sql("SELECT DISTINCT pack_id FROM blocks").all()
    assert {r[0] for r in rows} <= env.packs()
    # a next run of the disk still builds on run 3 and restores
    env.write_blocks(uuid, blocks(random.Random(4), 2))
    run4 = env.replicate(uuid)
    assert run4.disks[0].mode == "incremental"
    assert env.restore_sha(run4) == env.disk_sha(uuid)


def test_keep_zero_keeps_every_run(env: Env) -> None:
    _uuid, runs, shas = three_runs(env)
    before = dict(env.objects.objects)
    report = purge(env.repo(), env.state, {runs[0].server_id: 0})
    assert report.retention[0].deleted == [] and report.gc.deleted == []
    assert report.gc.condemned == []
    assert env.objects.objects == before
    for run, sha in zip(runs, shas, strict=True):
        assert env.restore_sha(run) == sha


def test_a_full_manifest_releases_the_bases_before_it(env: Env) -> None:
    uuid, _runs, _shas = three_runs(env)
    env.hv.vms[uuid].disks[2000].uuid = "replaced-disk"  # a full read, with no base
    env.write_blocks(uuid, blocks(random.Random(9), 5))
    run4 = env.replicate(uuid)
    assert run4.disks[0].mode == "allocated"  # a full read of the allocated areas
    report = purge(env.repo(), env.state, {run4.server_id: 1})
    assert report.retention[0].bases == {}
    assert report.retention[0].manifests_deleted == 3
    assert not [k for k in env.objects.objects if k.startswith("runs/") and run4.id not in k]
    assert env.restore_sha(run4) == env.disk_sha(uuid)


def test_dry_run_changes_nothing_and_says_what_would_go(env: Env) -> None:
    _uuid, runs, _ = three_runs(env)
    before = dict(env.objects.objects)
    report = purge(env.repo(), env.state, {runs[0].server_id: 1}, PurgeSettings(dry_run=True))
    assert report.retention[0].deleted == [runs[0].id, runs[1].id]
    assert set(report.gc.deleted) == env.state.packs_of_runs({runs[0].id, runs[1].id})
    assert report.gc.condemned == []
    assert env.objects.objects == before
    assert {r.state for r in env.state.runs()} == {"COMPLETED"}


def test_purge_waits_for_a_run_in_flight_that_deduplicated_against_a_condemned_pack(
    env: Env,
) -> None:
    rng = random.Random(5)
    uuid = env.hv.add_vm("db", [16 * MiB])
    x = blocks(rng, 0, 1)
    env.write_blocks(uuid, x)
    run1 = env.replicate(uuid)
    x_packs = env.state.packs_of_runs({run1.id})
    env.write_blocks(uuid, blocks(rng, 0, 1))  # overwrite: run 1's pack is unique to it
    env.replicate(uuid)
    # run 3 writes run 1's blocks again (dedup against run 1's pack) and new ones
    env.write_blocks(uuid, {i + 4: data for i, data in x.items()})
    env.write_blocks(uuid, blocks(rng, 8, 9))
    expected = env.disk_sha(uuid)
    pause = PauseAfterFirstPack(env.objects)
    result: dict[str, object] = {}

    def run3() -> None:
        try:
            result["run"] = env.rep.replicate(uuid)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run3)
    thread.start()
    try:
        assert pause.uploaded.wait(30), "run 3 uploaded no pack"
        report = purge(env.repo(), env.state, {run1.server_id: 1})
        assert report.retention[0].deleted == [run1.id]
        assert x_packs <= set(report.gc.condemned)
        assert report.gc.deleted == []
        (pending,) = report.gc.pending
        assert len(pending.waiting_for) == 1
        # a second purge before the run ends still waits
        again = purge(env.repo(), env.state, {run1.server_id: 1})
        assert again.gc.deleted == [] and again.gc.pending
        assert x_packs <= env.packs()
    finally:
        pause.resume.set()
        thread.join(60)
    run = result.get("run")
    assert run is not None, result.get("error")
    assert run.disks[0].blocks_dedup == 2  # type: ignore[attr-defined]
    report = purge(env.repo(), env.state, {run1.server_id: 1})
    assert x_packs <= set(report.gc.restored)
    assert x_packs <= env.packs()
    assert not [k for k in env.objects.objects if k.startswith("condemned/")]
    assert env.restore_sha(run) == expected  # type: ignore[arg-type]
    # the restored packs are in the dedup index again
    with env.state.engine.connect() as c:
        rows = c.exec_driver_sql("SELECT DISTINCT pack_id FROM blocks").all()
    assert x_packs <= {r[0] for r in rows}


def test_a_run_that_deduplicates_and_commits_while_purge_condemns_keeps_its_packs(
    env: Env,
) -> None:
    """The run starts after purge read the references and ends before it lists the locks."""
    rng = random.Random(6)
    uuid = env.hv.add_vm("db", [16 * MiB])
    x = blocks(rng, 0, 1)
    env.write_blocks(uuid, x)
    run1 = env.replicate(uuid)
    x_packs = env.state.packs_of_runs({run1.id})
    env.write_blocks(uuid, blocks(rng, 0, 1))
    env.replicate(uuid)
    env.write_blocks(uuid, {i + 4: data for i, data in x.items()})
    done: dict[str, object] = {}

    def sneak_in(prefix: str) -> None:
        if prefix == "packs/" and "run" not in done:
            done["run"] = None
            done["run"] = env.replicate(uuid)

    env.objects.before_list = sneak_in
    report = purge(env.repo(), env.state, {run1.server_id: 1})
    env.objects.before_list = None
    run3 = done["run"]
    assert run3 is not None
    assert x_packs <= set(report.gc.condemned)  # condemned before the run was seen...
    assert x_packs <= set(report.gc.restored)  # ...and kept: the run committed against them
    assert x_packs <= env.packs()
    assert env.restore_sha(run3) == env.disk_sha(uuid)  # type: ignore[arg-type]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_locks_are_reported_and_broken_on_request(env: Env) -> None:
    _uuid, runs, shas = three_runs(env)
    repo = env.repo()
    now = dt.datetime.now(dt.UTC)
    import socket

    repo.write_lock(
        RunLock(
            DEAD_RUN,
            runs[0].server_id,
            now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            socket.gethostname(),
            dead_pid(),
        )
    )
    old = (now - dt.timedelta(hours=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    repo.write_lock(RunLock(OLD_RUN, runs[0].server_id, old, "other-host", 1))
    report = purge(repo, env.state, {runs[0].server_id: 1})
    stale = {i.run_id: i.stale for i in report.gc.locks}
    assert "process" in (stale[DEAD_RUN] or "") and "gone" in (stale[DEAD_RUN] or "")
    assert "older than 24 h" in (stale[OLD_RUN] or "")
    assert report.gc.deleted == [] and report.gc.pending
    assert set(report.gc.pending[0].waiting_for) == {DEAD_RUN, OLD_RUN}
    broken = collect_garbage(repo, env.state, PurgeSettings(break_stale_locks=True))
    assert {i.run_id for i in broken.locks if i.removed} == {DEAD_RUN, OLD_RUN}
    assert not repo.lock_ids()
    assert len(broken.deleted) == 2 and not broken.pending
    assert env.restore_sha(runs[2]) == shas[2]


def test_a_young_lock_of_another_host_is_not_stale(env: Env) -> None:
    _uuid, runs, _ = three_runs(env)
    repo = env.repo()
    young = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    repo.write_lock(RunLock(BUSY_RUN, runs[0].server_id, young, "other-host", 1))
    report = collect_garbage(repo, env.state, PurgeSettings(break_stale_locks=True))
    info = {i.run_id: i for i in report.locks}[BUSY_RUN]
    assert info.stale is None and not info.removed
    assert repo.lock_ids() == [BUSY_RUN]


def test_retention_keeps_the_base_of_a_run_in_flight(env: Env) -> None:
    _uuid, runs, _ = three_runs(env)
    repo = env.repo()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    repo.write_lock(RunLock(NEXT_RUN, runs[0].server_id, now, "other", 1, (runs[1].id,)))
    result = apply_retention(repo, env.state, runs[0].server_id, 1)
    assert result.deleted == [runs[0].id]
    assert runs[1].id in result.protected and NEXT_RUN in result.protected[runs[1].id]
    assert commit_key(runs[0].server_id, runs[1].id) in env.objects.objects


def test_manifests_of_a_run_that_never_committed_are_removed(env: Env) -> None:
    rng = random.Random(8)
    uuid = env.hv.add_vm("app", [8 * MiB])
    env.write_blocks(uuid, blocks(rng, 0))
    good = env.replicate(uuid)
    env.write_blocks(uuid, blocks(rng, 2))

    def no_commit(key: str) -> None:
        if key.endswith("/commit"):
            env.objects.inner.objects.pop(key)
            raise RuntimeError("killed before the commit")

    env.objects.after_put = no_commit
    with pytest.raises(RuntimeError):
        env.rep.replicate(uuid)
    env.objects.after_put = None
    (failed,) = [r for r in env.state.runs() if r.state == "FAILED"]
    failed_packs = env.state.packs_of_runs({failed.id})
    assert manifest_key(good.server_id, failed.id, 2000) in env.objects.objects
    report = purge(env.repo(), env.state, {good.server_id: 0})
    assert report.retention[0].manifests_deleted == 1
    assert manifest_key(good.server_id, failed.id, 2000) not in env.objects.objects
    assert set(report.gc.deleted) == failed_packs
    assert env.restore_sha(good)


def test_remove_server_deletes_its_runs_and_only_its_own_packs(env: Env) -> None:
    rng = random.Random(10)
    template = blocks(rng, 0, 1, 2)
    a = env.hv.add_vm("clone-a", [8 * MiB])
    b = env.hv.add_vm("clone-b", [8 * MiB])
    env.write_blocks(a, template)
    env.write_blocks(b, template)
    env.write_blocks(b, blocks(rng, 5))
    run_a = env.replicate(a)
    run_b = env.replicate(b)
    assert run_b.disks[0].blocks_new == 1 and run_b.disks[0].blocks_dedup == 3
    b_packs = env.state.packs_of_runs({run_b.id})
    repo = env.repo()
    result = remove_server(repo, env.state, run_b.server_id)
    assert result.deleted == [run_b.id]
    assert not [k for k in env.objects.objects if k.startswith(f"runs/{run_b.server_id}/")]
    assert env.state.disk_states(run_b.server_id) == []
    gc = collect_garbage(repo, env.state)
    assert set(gc.deleted) == b_packs
    assert env.restore_sha(run_a) == env.disk_sha(a)
    # the VM can be replicated again from scratch
    again = env.replicate(b)
    assert again.disks[0].mode != "incremental"
    assert env.restore_sha(again) == env.disk_sha(b)


def test_remove_server_refuses_while_its_run_is_in_flight(env: Env) -> None:
    _uuid, runs, _ = three_runs(env)
    repo = env.repo()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    repo.write_lock(RunLock(LIVE_RUN, runs[0].server_id, now, "other", 1))
    with pytest.raises(PermanentError, match=LIVE_RUN):
        remove_server(repo, env.state, runs[0].server_id)
    assert commit_key(runs[0].server_id, runs[0].id) in env.objects.objects


def test_an_unreadable_manifest_stops_purge_before_any_delete(env: Env) -> None:
    _uuid, runs, _ = three_runs(env)
    key = manifest_key(runs[2].server_id, runs[2].id, 2000)
    damaged = bytearray(env.objects.objects[key])
    damaged[30] ^= 0x40
    env.objects.objects[key] = bytes(damaged)
    before = env.packs()
    with pytest.raises(IntegrityError, match="verify"):
        purge(env.repo(), env.state, {runs[0].server_id: 0})
    assert env.packs() == before


def test_negative_retention_is_refused(env: Env) -> None:
    _uuid, runs, _ = three_runs(env)
    with pytest.raises(PermanentError, match="0 or more"):
        apply_retention(env.repo(), env.state, runs[0].server_id, -1)
