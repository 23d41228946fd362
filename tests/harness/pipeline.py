"""The replication pipeline over local sources, with a local-directory object store.

Used by the transport tests: the readers and transports are what is under test,
so the store is the fast local-directory adapter (the S3 adapter is covered by
its own contract suite and by the CLI tests).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connector.adapters.ledger import RunLedger
from connector.adapters.localstore import LocalDirObjectStore
from connector.adapters.state import RunRow, StateStore
from connector.pipeline.context import PipelineSettings, StageContext
from connector.pipeline.replicate import Replicator
from connector.pipeline.restore import restore_disk
from connector.ports import DiskSource, Hypervisor
from connector.store.keys import LocalKeyProvider, generate_key_file
from connector.store.repository import Repository

MiB = 1024 * 1024


def stage_context(
    hv: Hypervisor,
    source: DiskSource,
    open_repo: Callable[[], Repository],
    state: StateStore,
    settings: PipelineSettings | None = None,
    ledger: RunLedger | None = None,
    **extra: Any,
) -> StageContext:
    """A StageContext whose state ports are all one SQLite state store."""
    return StageContext(
        hv=hv,
        source=source,
        open_repo=open_repo,
        catalog=state,
        disks=state,
        runs=state,
        blocks=state,
        ledger=ledger or RunLedger(state),
        settings=settings or PipelineSettings(),
        **extra,
    )


def replicator(
    hv: Hypervisor,
    source: DiskSource,
    open_repo: Callable[[], Repository],
    state: StateStore,
    settings: PipelineSettings | None = None,
) -> Replicator:
    """A foreground Replicator over one SQLite state store."""
    return Replicator(stage_context(hv, source, open_repo, state, settings))


@dataclass
class Pipeline:
    workdir: Path
    objects: LocalDirObjectStore
    provider: LocalKeyProvider
    state: StateStore
    replicator: Replicator

    def repo(self) -> Repository:
        return Repository.open(self.objects, self.provider)

    def restore_sha(self, run: RunRow, key: int, name: str) -> str:
        out = self.workdir / "restored" / name
        out.parent.mkdir(exist_ok=True)
        sha = restore_disk(self.repo(), run.server_id, run.id, key, out).sha256
        out.unlink()
        return sha

    def object_keys(self, prefix: str = "") -> list[str]:
        return list(self.objects.list(prefix))


def make_pipeline(workdir: Path, hv: Hypervisor, source: DiskSource) -> Pipeline:
    workdir.mkdir(parents=True, exist_ok=True)
    objects = LocalDirObjectStore(workdir / "store")
    generate_key_file(workdir / "store.key")
    provider = LocalKeyProvider(workdir / "store.key")
    state = StateStore.at_path(workdir / "state" / "state.db")
    rep = replicator(
        hv,
        source,
        lambda: Repository.open(objects, provider, create=True),
        state,
        PipelineSettings(enable_cbt=False, needs_no_foreign_snapshots=False),
    )
    return Pipeline(workdir, objects, provider, state, rep)


_ZEROS = memoryview(bytes(8 * MiB))


def file_sha(path: Path) -> str:
    """SHA-256 of a (sparse) file; holes are hashed as zeros without reading them."""
    h = hashlib.sha256()
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                data = size  # no data after offset
            while offset < data:  # a hole
                n = min(len(_ZEROS), data - offset)
                h.update(_ZEROS[:n])
                offset += n
            if offset >= size:
                break
            hole = min(os.lseek(fd, offset, os.SEEK_HOLE), size)
            while offset < hole:
                n = os.preadv(fd, [view[: min(len(buf), hole - offset)]], offset)
                if n <= 0:
                    raise OSError(f"short read of {path}")
                h.update(view[:n])
                offset += n
    finally:
        os.close(fd)
    return h.hexdigest()
