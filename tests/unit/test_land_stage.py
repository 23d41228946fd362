"""The land stage over the in-memory fakes: a snapshot that failed in AWS is replaced
and deleted, an AMI is found again after a crash, a parent snapshot is built on."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.adapters.state import StateStore
from connector.domain.landing import EBS_BLOCK, LANDING_LANDED, LandingSpec
from connector.fakelanding import FakeSnapshotTarget
from connector.fakes import FakeDiskSource, FakeHypervisor, MemoryObjectStore
from connector.fakestate import MemoryLandings
from connector.pipeline.context import (
    Lander,
    LandSettings,
    PipelineSettings,
    RunRef,
    StageContext,
)
from connector.pipeline.land import land
from connector.pipeline.replicate import Replicator
from connector.store.keys import LocalKeyProvider, generate_key_file
from connector.store.repository import Repository
from tests.harness.pipeline import stage_context

MiB = 1024 * 1024
SPEC = LandingSpec(mode="on-demand", encrypted=False, keep_amis=2)


Env = tuple[FakeHypervisor, StageContext, Lander, FakeSnapshotTarget]


@pytest.fixture
def env(tmp_path: Path) -> Env:
    hv = FakeHypervisor(page=2)
    objects = MemoryObjectStore()
    generate_key_file(tmp_path / "key")
    provider = LocalKeyProvider(tmp_path / "key")
    state = StateStore.at_path(tmp_path / "state.db")
    ctx = stage_context(
        hv,
        FakeDiskSource(hv),
        lambda: Repository.open(objects, provider, create=True),
        state,
        PipelineSettings(pack_size=4 * MiB),
    )
    target = FakeSnapshotTarget()
    lander = Lander(
        landings=MemoryLandings(),
        target=lambda spec: target,
        spec_for=lambda server_id: SPEC,
        settings=LandSettings(poll_interval=0.0, poll_interval_max=0.0, wait_timeout=5),
    )
    ctx.lander = lander
    return hv, ctx, lander, target


def _replicate(ctx: StageContext, uuid: str) -> RunRef:
    run = Replicator(ctx).replicate(uuid)
    return RunRef(run.id, run.server_id, uuid)


def _disk_bytes(target: FakeSnapshotTarget, snapshot_id: str, size: int) -> bytes:
    out = bytearray()
    for i in range(-(-size // EBS_BLOCK)):
        out += target.read_block(snapshot_id, i)
    return bytes(out[:size])


def test_a_failed_snapshot_is_replaced_and_deleted(env: Env) -> None:
    hv, ctx, lander, target = env
    uuid = hv.add_vm("web", [2 * MiB])
    hv.write(uuid, 2000, 100, b"x" * 5000)
    ref = _replicate(ctx, uuid)
    first = land(ctx, lander, ref, SPEC)
    failed = first.disks[0].snapshot_id
    assert failed is not None
    # As if the landing had died before completion and AWS then failed the snapshot:
    lander.landings.start_landing(ref.run_id, ref.server_id, first.image_name)
    lander.landings.set_snapshot_state(ref.run_id, 2000, "started")
    target.deregister_image(first.image_id or "")
    lander.landings.end_landing(ref.run_id, "FAILED", "killed")
    target.snapshots[failed].status = "error"
    again = land(ctx, lander, ref, SPEC)
    assert again.state == LANDING_LANDED and again.attempt == 1
    replaced = again.disks[0].snapshot_id
    assert replaced not in (None, failed)
    assert failed not in target.snapshots  # cleaned up
    assert target.snapshots_tagged("connector:run", ref.run_id) == [replaced]
    data = hv.vms[uuid].disks[2000].data
    assert _disk_bytes(target, replaced or "", len(data)) == bytes(data)


def test_an_image_registered_before_a_crash_is_found_not_registered_again(env: Env) -> None:
    hv, ctx, lander, target = env
    uuid = hv.add_vm("web", [MiB])
    ref = _replicate(ctx, uuid)
    landed = land(ctx, lander, ref, SPEC)
    lander.landings.start_landing(ref.run_id, ref.server_id, landed.image_name)
    lander.landings.end_landing(ref.run_id, "FAILED", "died before recording the AMI")
    # The AMI id was never recorded (a crash right after RegisterImage).
    row = lander.landings.landing(ref.run_id)
    assert row is not None
    again = land(ctx, lander, ref, SPEC)
    assert again.image_id == landed.image_id
    assert len(target.images) == 1


def test_an_incremental_lands_on_its_parent(env: Env) -> None:
    hv, ctx, lander, target = env
    uuid = hv.add_vm("web", [3 * MiB])
    hv.write(uuid, 2000, 0, b"a" * (2 * MiB))
    first = land(ctx, lander, _replicate(ctx, uuid), SPEC)
    hv.write(uuid, 2000, MiB + 10, b"b" * 10)  # EBS block 2 only
    second = land(ctx, lander, _replicate(ctx, uuid), SPEC)
    assert second.disks[0].parent_snapshot_id == first.disks[0].snapshot_id
    sent = [
        i
        for op, sid, i in target.calls
        if op == "PutSnapshotBlock" and sid == second.disks[0].snapshot_id
    ]
    assert sent == [2]
    data = hv.vms[uuid].disks[2000].data
    assert _disk_bytes(target, second.disks[0].snapshot_id or "", len(data)) == bytes(data)
