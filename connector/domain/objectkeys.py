"""The rules every ObjectStore applies to keys and ranges (pure, shared by all stores).

One implementation, so the local directory store, S3 and the in-memory fake
refuse the same keys and the same ranges.
"""

from __future__ import annotations

MAX_KEY_BYTES = 1024


def validate_key(key: str) -> str:
    """Return `key` when it is a safe relative object key, else raise ValueError.

    A key is one or more `/`-separated segments; no segment is empty, `.` or
    `..` or starts with `.` (reserved for temporary files); no absolute paths,
    backslashes, NUL or other control characters.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} must be relative (no leading '/')")
    if "\\" in key or any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise ValueError(f"object key {key!r} contains a backslash or a control character")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"object key {key!r} has an empty, '.' or '..' segment")
        if segment.startswith("."):
            raise ValueError(f"object key {key!r} has a segment starting with '.'")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"object key is longer than {MAX_KEY_BYTES} bytes")
    return key


def check_range(offset: int, length: int | None) -> None:
    """Raise ValueError for a negative offset or length of a ranged get."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if length is not None and length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
