"""Deduplication across VMs: two clones of one template, replicated into moto_server."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config
from tests.integration.store_helpers import (
    MiB,
    app_for,
    disk_sha,
    packs,
    replicate,
    restore_sha,
    write_blocks,
)

pytestmark = pytest.mark.integration

# Sealing adds a 12-byte nonce and a 16-byte tag per block (zstd keeps random data raw,
# with a few bytes of framing); a pack adds its sealed header (56 bytes per block) and
# an 8-byte trailer.
PER_BLOCK_OVERHEAD = 12 + 16 + 32 + 56
PER_PACK_OVERHEAD = 12 + 16 + 32 + 8


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> ConnectorEnv:
    return write_config(tmp_path / "connector", vcsim, moto, s3_bucket)


def test_second_clone_of_a_template_stores_only_the_blocks_that_differ(
    env: ConnectorEnv, vcsim: Any, moto: Any, tmp_path: Path
) -> None:
    rng = random.Random(31)
    template = {i: rng.randbytes(MiB) for i in (0, 1, 2, 3, 5, 8, 9, 12)}
    first = vcsim.add_vm("store-clone-1", [16 * MiB])
    second = vcsim.add_vm("store-clone-2", [16 * MiB])
    (k1,) = vcsim.disk_keys(first)
    (k2,) = vcsim.disk_keys(second)
    write_blocks(vcsim, first, k1, template)
    write_blocks(vcsim, second, k2, template)
    differ = {3: rng.randbytes(MiB), 14: rng.randbytes(MiB)}  # one changed, one added
    write_blocks(vcsim, second, k2, differ)
    app = app_for(env)
    try:
        run1 = replicate(app, first)
        after_first = packs(moto, env.bucket)
        assert sum(after_first.values()) >= len(template) * MiB
        run2 = replicate(app, second)
        after_second = packs(moto, env.bucket)
        new = {p: s for p, s in after_second.items() if p not in after_first}
        stored = sum(new.values())
        # only the two differing blocks were stored, read from the bytes in the bucket
        assert len(differ) * MiB <= stored
        assert stored <= len(differ) * (MiB + PER_BLOCK_OVERHEAD) + len(new) * PER_PACK_OVERHEAD
        (d2,) = run2.disks
        assert (d2.blocks_new, d2.blocks_dedup) == (2, len(template) - 1)
        assert run2.stats["bytes_uploaded"] == stored
        # both clones restore byte-exact from the shared packs
        assert restore_sha(app, run1, k1, tmp_path / "1.img") == disk_sha(vcsim, first, k1)
        assert restore_sha(app, run2, k2, tmp_path / "2.img") == disk_sha(vcsim, second, k2)
    finally:
        app.close()
