"""A replica store on the in-memory fakes, for fast tests of verify, retention and purge."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from connector.adapters.state import RunRow, StateStore
from connector.fakes import FakeDiskSource, FakeHypervisor, MemoryObjectStore
from connector.pipeline.context import PipelineSettings
from connector.pipeline.replicate import Replicator
from connector.pipeline.restore import restore_disk
from connector.store.keys import LocalKeyProvider, generate_key_file
from connector.store.repository import Repository
from tests.harness.pipeline import replicator

MiB = 1024 * 1024


class HookedObjects:
    """A MemoryObjectStore whose puts and lists can call a hook (to stage a race)."""

    def __init__(self, inner: MemoryObjectStore) -> None:
        self.inner = inner
        self.after_put: Callable[[str], None] | None = None
        self.before_list: Callable[[str], None] | None = None

    @property
    def objects(self) -> dict[str, bytes]:
        return self.inner.objects

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)
        if self.after_put is not None:
            self.after_put(key)

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(key, offset, length)

    def stat(self, key: str) -> int | None:
        return self.inner.stat(key)

    def list(self, prefix: str) -> Iterator[str]:
        if self.before_list is not None:
            self.before_list(prefix)
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)


class PauseAfterFirstPack:
    """Blocks the putting thread after its first pack upload until `resume` is set."""

    def __init__(self, objects: HookedObjects, timeout: float = 60) -> None:
        self.uploaded = threading.Event()
        self.resume = threading.Event()
        self.timeout = timeout
        self._armed = True
        objects.after_put = self

    def __call__(self, key: str) -> None:
        if self._armed and key.startswith("packs/"):
            self._armed = False
            self.uploaded.set()
            if not self.resume.wait(self.timeout):
                raise TimeoutError("the test never resumed the paused run")


@dataclass
class Env:
    hv: FakeHypervisor
    objects: HookedObjects
    provider: LocalKeyProvider
    state: StateStore
    rep: Replicator
    tmp: Path

    def repo(self) -> Repository:
        return Repository.open(self.objects, self.provider)

    def write_blocks(self, uuid: str, blocks: dict[int, bytes], key: int = 2000) -> None:
        for index, data in blocks.items():
            self.hv.write(uuid, key, index * MiB, data)

    def disk_sha(self, uuid: str, key: int = 2000) -> str:
        return hashlib.sha256(self.hv.vms[uuid].disks[key].data).hexdigest()

    def replicate(self, uuid: str) -> RunRow:
        run = self.rep.replicate(uuid)
        assert run.state == "COMPLETED", run.error
        return run

    def restore_sha(self, run: RunRow, key: int = 2000) -> str:
        out = self.tmp / f"{run.id}-{key}.img"
        out.unlink(missing_ok=True)
        return restore_disk(self.repo(), run.server_id, run.id, key, out).sha256

    def packs(self) -> set[str]:
        return {k.rsplit("/", 1)[1] for k in self.objects.objects if k.startswith("packs/")}


def make_env(tmp_path: Path) -> Env:
    hv = FakeHypervisor(page=2)
    objects = HookedObjects(MemoryObjectStore())
    generate_key_file(tmp_path / "key")
    provider = LocalKeyProvider(tmp_path / "key")
    state = StateStore.at_path(tmp_path / "state.db")
    rep = replicator(
        hv,
        FakeDiskSource(hv),
        lambda: Repository.open(objects, provider, create=True),
        state,
        PipelineSettings(pack_size=4 * MiB),
    )
    return Env(hv, objects, provider, state, rep, tmp_path)
