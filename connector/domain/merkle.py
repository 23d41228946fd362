"""The Merkle root over a disk's block hashes (RFC 6962 style, SHA-256)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root over `leaves` in order: leaf = H(0x00 || x), node = H(0x01 || l || r).

    An odd node at the end of a level is carried up unchanged. The root of an
    empty sequence is H(b"").
    """
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = [hashlib.sha256(b"\x00" + leaf).digest() for leaf in leaves]
    while len(level) > 1:
        nxt = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]
