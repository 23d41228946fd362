"""The shapes of the connector's identifiers, and the ranges of its counts (pure).

Every id that becomes part of an object key or reaches the state database from
outside (the command line, a job field) is checked here first, so that a
malformed one (`../../config`, a pasted VM name) is refused with a message
that says what an id looks like, instead of naming an object nobody meant.

The shapes, as the connector makes them:

- run id: `r-YYYYMMDDTHHMMSSmmmZ-` (UTC, milliseconds) and 8 hex digits;
- purge id: `p-` and the same time stamp and random part;
- server id: `s-` and 16 hex digits;
- job id: `j-` and 12 hex digits;
- pack id: 64 hex digits;
- disk key: the vSphere device key of the disk, 0 to 2**31 - 1.
"""

from __future__ import annotations

import re

from connector.errors import InvalidInputError

RUN_ID = re.compile(r"r-\d{8}T\d{9}Z-[0-9a-f]{8}")
PURGE_ID = re.compile(r"p-\d{8}T\d{9}Z-[0-9a-f]{8}")
SERVER_ID = re.compile(r"s-[0-9a-f]{16}")
JOB_ID = re.compile(r"j-[0-9a-f]{12}")
PACK_ID = re.compile(r"[0-9a-f]{64}")

# vSphere device keys are 32-bit signed integers; disks have positive ones (2000...).
MAX_DISK_KEY = 2**31 - 1
# Runs to keep per server: more than any schedule makes in a lifetime (24 a day for 100 years).
MAX_KEEP = 1_000_000

_SHAPES = {
    "run id": (RUN_ID, "r-YYYYMMDDTHHMMSSmmmZ-<8 hex digits>, as `connector runs` lists"),
    "purge id": (PURGE_ID, "p-YYYYMMDDTHHMMSSmmmZ-<8 hex digits>"),
    "server id": (SERVER_ID, "s-<16 hex digits>, as `connector vms` lists"),
    "job id": (JOB_ID, "j-<12 hex digits>, as `connector jobs list` shows"),
    "pack id": (PACK_ID, "64 hex digits"),
}


def _check(kind: str, value: object) -> str:
    pattern, shape = _SHAPES[kind]
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise InvalidInputError(f"{value!r} is not a {kind}; a {kind} looks like {shape}")
    return value


def check_run_id(value: object) -> str:
    """`value` when it is a run id, else InvalidInputError saying what one looks like."""
    return _check("run id", value)


def check_purge_id(value: object) -> str:
    """`value` when it is a purge id, else InvalidInputError."""
    return _check("purge id", value)


def check_server_id(value: object) -> str:
    """`value` when it is a server id, else InvalidInputError."""
    return _check("server id", value)


def check_job_id(value: object) -> str:
    """`value` when it is a job id, else InvalidInputError."""
    return _check("job id", value)


def check_pack_id(value: object) -> str:
    """`value` when it is a pack id, else InvalidInputError."""
    return _check("pack id", value)


def is_job_id(value: str) -> bool:
    """Whether `value` has the shape of a job id (rather than a VM name or UUID)."""
    return JOB_ID.fullmatch(value) is not None


def check_disk_key(value: object) -> int:
    """`value` when it is a disk key (an int from 0 to 2**31 - 1), else InvalidInputError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DISK_KEY:
        raise InvalidInputError(
            f"{value!r} is not a disk key; a disk key is the disk's vSphere device key, "
            f"0 to {MAX_DISK_KEY} (e.g. 2000), as `connector vms` lists"
        )
    return value


def check_keep(value: object, what: str = "runs to keep") -> int:
    """`value` when it is a count of runs to keep (0 keeps all), else InvalidInputError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_KEEP:
        raise InvalidInputError(
            f"{what} must be a whole number from 0 (keep all) to {MAX_KEEP}, not {value!r}"
        )
    return value
