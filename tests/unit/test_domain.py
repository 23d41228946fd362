from __future__ import annotations

import hashlib
import itertools

from hypothesis import given
from hypothesis import strategies as st

from connector.domain.extents import blocks_touched, merge, runs
from connector.domain.manifest import BlockRef, DiskManifest, apply_changes, diff_maps
from connector.domain.merkle import merkle_root
from connector.domain.model import Extent

extent_lists = st.lists(
    st.builds(Extent, st.integers(0, 10_000), st.integers(0, 3_000)), max_size=30
)


@given(extent_lists)
def test_merge_covers_exactly_the_same_bytes(extents):
    covered: set[int] = set()
    for e in extents:
        covered.update(range(e.offset, e.end))
    merged = merge(extents)
    after: set[int] = set()
    for e in merged:
        after.update(range(e.offset, e.end))
    assert covered == after
    assert all(a.end < b.offset for a, b in itertools.pairwise(merged))


@given(extent_lists, st.sampled_from([512, 1000, 4096]))
def test_blocks_touched_is_the_minimal_widening(extents, bs):
    cap = 12_000
    touched = set(blocks_touched(extents, bs, cap))
    expected: set[int] = set()
    for e in extents:
        for b in range(e.offset, min(e.end, cap)):
            expected.add(b // bs)
    assert touched == expected


def test_runs_groups_consecutive_indices():
    assert list(runs([1, 2, 3, 7, 8, 20], max_run=2)) == [(1, 2), (3, 1), (7, 2), (20, 1)]


def test_merkle_root_depends_on_order_and_content():
    a, b, c = (hashlib.sha256(x).digest() for x in (b"a", b"b", b"c"))
    assert merkle_root([a, b, c]) != merkle_root([b, a, c])
    assert merkle_root([a, b, c]) == merkle_root([a, b, c])
    assert merkle_root([a]) != merkle_root([a, a])


def test_manifest_round_trip_and_change_maps():
    r1 = BlockRef(b"\x01" * 32, "p" * 64, 0, 100)
    r2 = BlockRef(b"\x02" * 32, "q" * 64, 100, 50)
    old = {0: r1, 5: r2}
    new = {0: r1, 5: None, 9: r2}
    changes = diff_maps(old, new)
    assert changes == {5: None, 9: r2}
    assert apply_changes(old, changes) == {0: r1, 9: r2}
    m = DiskManifest(
        server_id="s-1",
        run_id="r-1",
        disk_key=2000,
        capacity=10 * 1024 * 1024,
        block_size=1024 * 1024,
        change_id="abc/3",
        snapshot_name="connector-r-1",
        snapshot_ref="snapshot-1",
        created_at="2026-01-01T00:00:00Z",
        merkle_root=b"\x07" * 32,
        base_run="r-0",
        entries=changes,
    )
    back = DiskManifest.decode(m.encode())
    assert back.entries == changes and back.base_run == "r-0" and back.change_id == "abc/3"
