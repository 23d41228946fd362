"""Stage `land`: a committed run becomes EBS snapshots (one per disk) and an AMI.

Per disk, through the EBS direct APIs: StartSnapshot on top of the previous landed
snapshot of the same disk (same capacity), with a ClientToken derived from run,
disk and attempt; PutSnapshotBlock for exactly the 512 KiB blocks whose bytes
differ from the parent's (found from the two runs' manifests, then compared);
CompleteSnapshot; a wait until AWS reports it completed. Then RegisterImage with
the disks as mappings, the boot disk (the lowest device key) first. Then AMI
retention, and staging cleanup in temporary mode.

Crash safety: the landing, each disk's client token and each snapshot id are in
the state store before anything depends on them (docs/landing.md). A restart finds
its snapshot again through the token; a snapshot that failed or vanished is
marked abandoned and a new attempt replaces it; the run's snapshots that no disk
record names are deleted before the AMI is registered; RegisterImage only ever
names completed snapshots, and an AMI registered just before a crash is found
again by its (opaque, unique) name instead of being registered twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from connector.domain.landing import (
    EBS_BLOCK,
    LAND_EVERY,
    LANDING_DELETED,
    LANDING_FAILED,
    LANDING_LANDED,
    SNAP_ABANDONED,
    SNAP_COMPLETED,
    SNAP_DELETED,
    SNAP_SENT,
    SNAP_STARTED,
    STAGING_TEMPORARY,
    LandedDisk,
    LandingRow,
    LandingSpec,
    ami_retention,
    architecture,
    boot_mode,
    changed_ebs_blocks,
    client_token,
    covering,
    device_names,
    image_name,
    must_send,
    parent_of,
    volume_size_gib,
)
from connector.domain.manifest import BlockRef
from connector.errors import ConnectorError, NotFoundError, PermanentError
from connector.faults import crash_point
from connector.logging import get_logger, scrub
from connector.pipeline.context import Lander, RunRef, StageContext
from connector.ports import Landings, SnapshotTarget
from connector.store.repository import Repository, pack_key

log = get_logger(__name__)

TAG_SERVER = "connector:server"
TAG_RUN = "connector:run"
TAG_DISK = "connector:disk"
TAG_LICENSE = "connector:license-type"

BlockMapping = Mapping[int, BlockRef | None]


def run(ctx: StageContext, ref: RunRef) -> None:
    """Land the run when its job lands every run; otherwise nothing."""
    lander = ctx.lander
    if lander is None:
        return
    spec = lander.spec_for(ref.server_id)
    if spec.mode != LAND_EVERY:
        return
    land(ctx, lander, ref, spec)


def land(ctx: StageContext, lander: Lander, ref: RunRef, spec: LandingSpec) -> LandingRow:
    """Land one committed run (again: what is done already is not repeated)."""
    run_id, server_id = ref.run_id, ref.server_id
    landings = lander.landings
    done = landings.landing(run_id)
    if done is not None and done.state == LANDING_LANDED:
        return done
    if done is not None and done.state == LANDING_DELETED:
        raise PermanentError(f"run {run_id} was landed and its AMI removed by AMI retention")
    repo = ctx.repo()
    commit = repo.read_commit(server_id, run_id)
    disks = sorted((int(d["disk_key"]), int(d["capacity"])) for d in commit["disks"])
    if not disks:
        raise PermanentError(f"run {run_id} has no disks to land")
    names = device_names(len(disks))
    target = lander.target(spec)
    row = landings.start_landing(run_id, server_id, image_name(server_id, run_id))
    ctx.reporter.stage(run_id, "land", f"{len(disks)} disk(s) to EBS snapshots")
    try:
        earlier = [r for r in landings.landings(server_id) if r.run_id < run_id]
        for key, capacity in disks:
            _land_disk(ctx, lander, target, repo, ref, spec, row, earlier, key, capacity)
            row = _reload(landings, run_id)
        _sweep_abandoned(target, landings, row)
        row = _register(ctx, lander, target, ref, spec, row, names)
        landings.end_landing(run_id, LANDING_LANDED)
        ctx.reporter.stage(run_id, "land", f"AMI {row.image_id}")
    except ConnectorError as exc:
        landings.end_landing(run_id, LANDING_FAILED, scrub(str(exc)))
        _close(target)
        raise
    try:
        _retain(lander, target, server_id, spec.keep_amis)
    except ConnectorError as exc:  # the run is landed; the next landing retains again
        log.warning("land.retention_failed", run=run_id, error=scrub(str(exc)))
    finally:
        _close(target)
    return _reload(landings, run_id)


def _close(target: SnapshotTarget) -> None:
    closer = getattr(target, "close", None)
    if callable(closer):
        closer()


def release_staging(ctx: StageContext, ref: RunRef) -> None:
    """Temporary staging: once the run is landed (and its own lock is gone, so purge
    may delete at once), the staging data no later landing needs is released."""
    lander = ctx.lander
    if lander is None or lander.release_staging is None:
        return
    row = lander.landings.landing(ref.run_id)
    if row is None or row.state != LANDING_LANDED:
        return
    if lander.spec_for(ref.server_id).staging != STAGING_TEMPORARY:
        return
    try:
        lander.release_staging(ref.server_id, ref.run_id)
    except ConnectorError as exc:  # the next landing's release tries again
        log.warning("land.staging_not_released", run=ref.run_id, error=scrub(str(exc)))


def _reload(landings: Landings, run_id: str) -> LandingRow:
    row = landings.landing(run_id)
    assert row is not None
    return row


# -- one disk ------------------------------------------------------------------------------


def _land_disk(
    ctx: StageContext,
    lander: Lander,
    target: SnapshotTarget,
    repo: Repository,
    ref: RunRef,
    spec: LandingSpec,
    row: LandingRow,
    earlier: list[LandingRow],
    key: int,
    capacity: int,
) -> None:
    landings, run_id = lander.landings, ref.run_id
    disk = row.disk(key)
    attempt = row.attempt
    if disk is not None and disk.state == SNAP_COMPLETED:
        return
    if disk is not None and disk.snapshot_id:
        state = target.snapshot_state(disk.snapshot_id)
        if state == "completed":
            landings.set_snapshot_state(run_id, key, SNAP_COMPLETED)
            return
        if state == "pending" and disk.state == SNAP_SENT:
            target.complete_snapshot(disk.snapshot_id, disk.blocks_sent)
            _wait(ctx, lander, target, run_id, key, disk.snapshot_id)
            return
        if state != "pending":
            # Failed in AWS (its Timeout passed) or gone: a new attempt replaces it.
            landings.set_snapshot_state(run_id, key, SNAP_ABANDONED)
            target.delete_snapshot(disk.snapshot_id)
            landings.set_snapshot_state(run_id, key, SNAP_DELETED)
            attempt += 1
            landings.set_attempt(run_id, attempt)
            disk = None
    parent = parent_of(earlier, key, capacity)
    parent_map: BlockMapping | None = None
    if parent is not None:
        try:
            parent_map = repo.resolve_map(repo.read_manifest(ref.server_id, parent.run_id, key))
        except (NotFoundError, PermanentError) as exc:
            log.warning(
                "land.full_snapshot",
                run=run_id,
                disk=key,
                reason=f"the manifest of the parent run {parent.run_id} cannot be read: {exc}",
            )
            parent = None
    current = repo.resolve_map(repo.read_manifest(ref.server_id, run_id, key))
    token = disk.client_token if disk is not None else client_token(run_id, key, attempt)
    record = LandedDisk(
        run_id=run_id,
        disk_key=key,
        snapshot_id=disk.snapshot_id if disk is not None else None,
        state=SNAP_STARTED,
        client_token=token,
        parent_snapshot_id=parent.snapshot_id if parent else None,
        capacity=capacity,
    )
    if disk is None:
        landings.record_snapshot(record)  # the token, before the snapshot exists
    snapshot_id, _ = target.start_snapshot(
        volume_size=volume_size_gib(capacity),
        client_token=token,
        parent_snapshot_id=record.parent_snapshot_id,
        encrypted=spec.encrypted,
        kms_key_id=spec.kms_key_id,
        tags={
            TAG_SERVER: ref.server_id,
            TAG_RUN: run_id,
            TAG_DISK: str(key),
            TAG_LICENSE: spec.license_type,
        },
        description=f"connector run {run_id} disk {key}",
        timeout_minutes=lander.settings.snapshot_timeout_minutes,
    )
    record.snapshot_id = snapshot_id
    landings.record_snapshot(record)
    sent = _send(ctx, lander, target, repo, run_id, key, snapshot_id, parent_map, current)
    sent_count = len(sent)
    landings.set_snapshot_state(run_id, key, SNAP_SENT, blocks_sent=sent_count)
    target.complete_snapshot(snapshot_id, sent_count)
    _wait(ctx, lander, target, run_id, key, snapshot_id)


def _send(
    ctx: StageContext,
    lander: Lander,
    target: SnapshotTarget,
    repo: Repository,
    run_id: str,
    key: int,
    snapshot_id: str,
    parent_map: BlockMapping | None,
    current: BlockMapping,
) -> set[int]:
    """Write every EBS block whose bytes differ from the parent snapshot's; the indexes."""
    row = lander.landings.landing(run_id)
    assert row is not None
    disk = row.disk(key)
    assert disk is not None
    candidates = changed_ebs_blocks(parent_map, current, repo.block_size, disk.capacity)
    reader = _BlockReader(repo)
    sent: set[int] = set()
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(lander.settings.concurrency * 2)
    errors: list[BaseException] = []

    def put(index: int, data: bytes) -> None:
        try:
            target.put_block(snapshot_id, index, data)
            crash_point("land-block")
            with lock:
                sent.add(index)
        finally:
            slots.release()

    # Progress in bytes, as every stage reports it: the candidate blocks considered.
    total = len(candidates) * EBS_BLOCK
    with ThreadPoolExecutor(max_workers=lander.settings.concurrency) as pool:
        futures: list[Future[None]] = []
        for n, index in enumerate(candidates):
            if errors:
                break
            data = reader.ebs_block(current, index)
            known = (
                bytes(EBS_BLOCK) if parent_map is None else reader.parent_block(parent_map, index)
            )
            if not must_send(data, known):
                continue
            slots.acquire()
            fut = pool.submit(put, index, data)
            fut.add_done_callback(_note_failure(errors))
            futures.append(fut)
            ctx.reporter.disk_progress(run_id, key, (n + 1) * EBS_BLOCK, total)
        for fut in futures:
            fut.result()  # the first failure is raised here
    ctx.reporter.disk_progress(run_id, key, total, total)
    return sent


def _note_failure(errors: list[BaseException]) -> Callable[[Future[None]], None]:
    """A callback that keeps a failed put's error, so no more blocks are queued."""

    def note(fut: Future[None]) -> None:
        exc = fut.exception()
        if exc is not None:
            errors.append(exc)

    return note


class _BlockReader:
    """Reads store blocks (one cached: an EBS block is half of a 1 MiB store block)."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._cache: dict[bytes, bytes] = {}

    def _plain(self, ref: BlockRef | None) -> bytes:
        if ref is None:
            return bytes(self.repo.block_size)
        if ref.block_id in self._cache:
            return self._cache[ref.block_id]
        blob = self.repo.objects.get(pack_key(ref.pack_id), ref.offset, ref.length)
        plain = self.repo.open_block(ref, blob, f"block in pack {ref.pack_id}")
        self._cache = {ref.block_id: plain}
        return plain

    def ebs_block(self, full_map: BlockMapping, index: int) -> bytes:
        parts = []
        for store_index, start, end in covering(index, self.repo.block_size):
            block = self._plain(full_map.get(store_index))
            parts.append(block[start:end].ljust(end - start, b"\0"))
        return b"".join(parts)

    def parent_block(self, parent_map: BlockMapping, index: int) -> bytes | None:
        """The parent's bytes, or None when they cannot be read (its packs are gone)."""
        try:
            return self.ebs_block(parent_map, index)
        except NotFoundError:
            return None


def _wait(
    ctx: StageContext,
    lander: Lander,
    target: SnapshotTarget,
    run_id: str,
    key: int,
    snapshot_id: str,
) -> None:
    """Until AWS reports the snapshot completed (it completes asynchronously)."""
    settings = lander.settings
    deadline = time.monotonic() + settings.wait_timeout
    pause = settings.poll_interval
    while True:
        crash_point("land-wait")
        state = target.snapshot_state(snapshot_id)
        if state == "completed":
            lander.landings.set_snapshot_state(run_id, key, SNAP_COMPLETED)
            return
        if state != "pending":
            lander.landings.set_snapshot_state(run_id, key, SNAP_ABANDONED)
            raise PermanentError(
                f"snapshot {snapshot_id} of disk {key} ended {state or 'missing'} in AWS; "
                f"land the run again (`connector land ... --run {run_id}`) to replace it"
            )
        if time.monotonic() >= deadline:
            raise PermanentError(
                f"snapshot {snapshot_id} of disk {key} was not completed within "
                f"{settings.wait_timeout:.0f} s; land the run again later to wait for it"
            )
        time.sleep(pause)  # bounded by wait_timeout; a killed wait resumes
        pause = min(pause * 2, settings.poll_interval_max)


# -- the AMI, and cleanup ------------------------------------------------------------------


def _sweep_abandoned(target: SnapshotTarget, landings: Landings, row: LandingRow) -> None:
    """Delete the run's snapshots that no disk record names (earlier attempts)."""
    keep = set(row.snapshot_ids())
    for snapshot_id in target.snapshots_tagged(TAG_RUN, row.run_id):
        if snapshot_id not in keep:
            log.info("land.abandoned_snapshot_deleted", run=row.run_id, snapshot=snapshot_id)
            target.delete_snapshot(snapshot_id)


def _register(
    ctx: StageContext,
    lander: Lander,
    target: SnapshotTarget,
    ref: RunRef,
    spec: LandingSpec,
    row: LandingRow,
    names: tuple[str, ...],
) -> LandingRow:
    if row.image_id and target.describe_image(row.image_id) is not None:
        return row
    for d in row.disks:
        if d.state != SNAP_COMPLETED or not d.snapshot_id:
            raise PermanentError(f"disk {d.disk_key} of run {row.run_id} is not landed yet")
    crash_point("land-before-image")
    image_id = target.find_image(row.image_name)  # registered before a crash?
    if image_id is None:
        try:
            vm = ctx.hv.get_vm(ref.vm_uuid)
            guest, firmware = vm.guest_id, vm.firmware
        except ConnectorError:
            guest, firmware = None, None
        image_id = target.register_image(
            name=row.image_name,
            description=f"connector run {row.run_id}",
            mappings=[
                (name, d.snapshot_id or "")
                for name, d in zip(names, sorted(row.disks, key=lambda d: d.disk_key), strict=True)
            ],
            architecture=architecture(guest),
            boot_mode=boot_mode(firmware),
            ena_support=lander.settings.ena_support,
            tags={TAG_SERVER: ref.server_id, TAG_RUN: row.run_id, TAG_LICENSE: spec.license_type},
        )
    lander.landings.record_image(row.run_id, image_id)
    return _reload(lander.landings, row.run_id)


def _retain(lander: Lander, target: SnapshotTarget, server_id: str, keep: int) -> None:
    """Deregister the AMIs beyond the `keep` most recent and delete their snapshots,
    never one that a retained AMI uses."""
    landed = lander.landings.landings(server_id)
    removal = ami_retention(landed, keep)
    by_run = {r.run_id: r for r in landed}
    for run_id in removal.runs:
        image_id = by_run[run_id].image_id
        if image_id:
            target.deregister_image(image_id)
        lander.landings.end_landing(run_id, LANDING_DELETED)
    for snapshot_id in removal.snapshots:
        target.delete_snapshot(snapshot_id)
    for run_id in removal.runs:
        for d in by_run[run_id].disks:
            if d.snapshot_id in removal.snapshots:
                lander.landings.set_snapshot_state(run_id, d.disk_key, SNAP_DELETED)
