"""Timestamps as the connector writes them: UTC, ISO 8601, with a trailing Z.

Two precisions, each with one use:
- `stamp` (microseconds): rows of the state database, so that rows written in
  the same second still sort in the order they were written;
- `iso` (seconds): documents users and other tools read (commit records, run
  locks, job seed times).
Run and purge ids carry `compact` (milliseconds, no separators).
"""

from __future__ import annotations

import datetime as dt


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def stamp(value: dt.datetime | None = None) -> str:
    """`2026-12-01T09:38:52.123456Z`: the state database's timestamps."""
    utc = (value or utcnow()).astimezone(dt.UTC)
    return f"{utc.year:04d}" + utc.strftime("-%m-%dT%H:%M:%S.%fZ")


def iso(value: dt.datetime | None = None) -> str:
    """`2026-12-01T09:38:52Z`: timestamps in documents."""
    utc = (value or utcnow()).astimezone(dt.UTC)
    return f"{utc.year:04d}" + utc.strftime("-%m-%dT%H:%M:%SZ")  # %Y is not padded below 1000


def compact(value: dt.datetime | None = None) -> str:
    """`20261201T093852123Z`: the time part of run and purge ids (milliseconds)."""
    now = (value or utcnow()).astimezone(dt.UTC)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"


def parse(text: str) -> dt.datetime:
    """A timestamp written by `stamp` or `iso` (or any ISO 8601 time with a zone)."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
