"""A purge that runs while a replication run is uploading leaves that run restorable.

The run is paused deterministically right after its first pack upload (an
ObjectStore wrapper waiting on an Event), after every dedup lookup. Purge then
runs as a separate process, with a retention that deletes the only run that
references the packs the paused run deduplicated against.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.adapters.state import RunRow
from connector.pipeline.verify import verify_store
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.integration.store_helpers import (
    MiB,
    app_for,
    disk_sha,
    objects,
    packs,
    replicate,
    restore_sha,
    write_blocks,
)

pytestmark = pytest.mark.integration


class PauseAfterFirstPack:
    """Wraps the S3 object store; the first pack put blocks until `resume` is set."""

    def __init__(self, inner: Any, timeout: float = 120) -> None:
        self.inner = inner
        self.uploaded = threading.Event()
        self.resume = threading.Event()
        self.timeout = timeout
        self._armed = True

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)
        if self._armed and key.startswith("packs/"):
            self._armed = False
            self.uploaded.set()
            if not self.resume.wait(self.timeout):
                raise TimeoutError("the test never resumed the paused run")

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data: bytes = self.inner.get(key, offset, length)
        return data

    def stat(self, key: str) -> int | None:
        size: int | None = self.inner.stat(key)
        return size

    def list(self, prefix: str) -> Iterator[str]:
        keys: Iterator[str] = self.inner.list(prefix)
        return keys

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def check_access(self) -> None:
        self.inner.check_access()


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> ConnectorEnv:
    return write_config(tmp_path / "connector", vcsim, moto, s3_bucket)


def test_purge_while_a_run_uploads_leaves_that_run_restorable(
    env: ConnectorEnv, vcsim: Any, moto: Any, tmp_path: Path
) -> None:
    rng = random.Random(71)
    name = "store-purge-race"
    uuid = vcsim.add_vm(name, [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    template = {0: rng.randbytes(MiB), 1: rng.randbytes(MiB)}
    app = app_for(env)
    try:
        write_blocks(vcsim, uuid, key, template)
        run1 = replicate(app, uuid)
        x_packs = set(packs(moto, env.bucket))
        write_blocks(vcsim, uuid, key, {0: rng.randbytes(MiB), 1: rng.randbytes(MiB)})
        replicate(app, uuid)  # run 1's pack is now referenced by run 1 only
    finally:
        app.close()
    # run 3 writes run 1's blocks again elsewhere (it will dedup against run 1's pack)
    write_blocks(vcsim, uuid, key, {i + 8: data for i, data in template.items()})
    write_blocks(vcsim, uuid, key, {12: rng.randbytes(MiB)})
    expected = disk_sha(vcsim, uuid, key)

    running = app_for(env)
    pause = PauseAfterFirstPack(running.objects)
    running.__dict__["objects"] = pause
    outcome: dict[str, Any] = {}

    def third_run() -> None:
        try:
            outcome["run"] = running.replicator().replicate(uuid)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=third_run, name="run-3")
    thread.start()
    try:
        assert pause.uploaded.wait(120), "run 3 uploaded no pack"
        locks = [k for k in objects(moto, env.bucket) if "/locks/" in f"/{k}"]
        assert len(locks) == 1
        report = env.cli_json("purge", name, "--keep", "1")
        assert report["retention"][0]["deleted"] == [run1.id]
        assert x_packs <= set(report["gc"]["condemned"])
        assert report["gc"]["deleted"] == []
        (pending,) = report["gc"]["pending"]
        run3_id = pending["waiting_for"][0]
        assert locks[0].endswith(run3_id)
        assert x_packs <= set(packs(moto, env.bucket))  # nothing deleted under the run
    finally:
        pause.resume.set()
        thread.join(180)
        running.close()
    run3: RunRow | None = outcome.get("run")
    assert run3 is not None, outcome.get("error")
    assert run3.state == "COMPLETED" and run3.id == run3_id
    assert run3.disks[0].blocks_dedup == 2

    # the next purge finds run 3 committed against the condemned pack: it stays
    report = env.cli_json("purge", name, "--keep", "1")
    assert x_packs <= set(report["gc"]["restored"])
    assert not set(report["gc"]["deleted"]) & x_packs
    assert x_packs <= set(packs(moto, env.bucket))
    assert not [k for k in objects(moto, env.bucket) if "/condemned/" in f"/{k}"]
    app = app_for(env)
    try:
        assert restore_sha(app, run3, key, tmp_path / "run3.img") == expected
        assert verify_store(app.repository(), {run3.server_id: None}, deep=True).ok
    finally:
        app.close()
